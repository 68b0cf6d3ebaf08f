package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/aggregate/aggregatetest"
	"github.com/stele-dev/stele/aggregate/pgsnapshot"
	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/testsvc"
	"github.com/stele-dev/stele/telemetry"
)

func TestMain(m *testing.M) { testdb.VerifyMain(m) }

const wantDemo = `opened ada for Ada Lovelace with 500 (overdraft limit 0)
opened bob for Bob Bitdiddle with 200 (overdraft limit 100)
opened cy for Cy D. Fect with 50 (overdraft limit 0)
deposited 300 to cy
withdrew 50 from cy
transfer t-1: 120 from ada to bob
transfer t-2: 300 from bob to cy
transfer t-3: 100 from bob to ada
refused: transfer t-4: debiting ada: bank: overdraft limit exceeded: ada has 480 with an overdraft limit of 0, cannot take 600
balances:
  ada  Ada Lovelace     480
  bob  Bob Bitdiddle    -80
  cy   Cy D. Fect       600
  total                1000
read model "balances":
  ada    480 at v4
  bob    -80 at v5
  cy     600 at v5
statements (14 messages over the gochannel bus):
  ada  account opened, +500 opening-ada, -120 t-1, +100 t-3
  bob  account opened, +200 opening-bob, +120 t-1, -300 t-2, -100 t-3
  cy   account opened, +50 opening-cy, +300 salary-1, -50 atm-1, +300 t-2
`

func checkDemo(t *testing.T, store eventstore.Store, snaps aggregate.SnapshotStore) {
	t.Helper()
	checkDemoOver(t, store, snaps, broker.Config{Kind: broker.GoChannel}, wantDemo)
}

func checkDemoOver(t *testing.T, store eventstore.Store, snaps aggregate.SnapshotStore, busCfg broker.Config, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	busCfg.Logger = slog.New(slog.DiscardHandler)
	b, err := broker.Open(ctx, busCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var out strings.Builder
	if err := run(ctx, &out, store, snaps, b); err != nil {
		t.Fatalf("run: %v\noutput so far:\n%s", err, out.String())
	}
	if out.String() != want {
		t.Errorf("output:\n%s\nwant:\n%s", out.String(), want)
	}
}

// TestDemoOverBrokers: the same story with the events in PostgreSQL and the
// statements service on the other side of a real broker, deduping through
// the PostgreSQL inbox; its lines are in its own table too.
func TestDemoOverBrokers(t *testing.T) {
	for _, c := range []struct {
		name, addr string
		cfg        broker.Config
	}{
		{"amqp", "127.0.0.1:5672", broker.Config{URL: "amqp://guest:guest@127.0.0.1:5672/"}},
		{"nats", "127.0.0.1:4222", broker.Config{URL: "nats://127.0.0.1:4222"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			testsvc.Require(t, c.name, c.addr)
			// A topic (and so an exchange, queue or stream) of this run's
			// own: another run on the same broker must not share the
			// statements group's queue, nor delete it.
			topic := testsvc.Name("bank.public.")
			defer func(was string) { PublicTopic = was }(PublicTopic)
			PublicTopic = topic
			t.Cleanup(func() { dropPublicTopic(c.name, topic) })
			store, snaps := pgBackend(t, "postgres")
			want := strings.Replace(wantDemo, "over the gochannel bus", "over the "+c.name+" bus", 1)
			checkDemoOver(t, store, snaps, c.cfg, want)
			pg := store.(*pgstore.Store)
			var lines, inbox int
			if err := pg.DB().QueryRow(`SELECT (SELECT count(*) FROM "`+pg.Schema()+`".statement_lines),
				(SELECT count(*) FROM "`+pg.Schema()+`".inbox WHERE consumer = 'statements')`).Scan(&lines, &inbox); err != nil {
				t.Fatal(err)
			}
			if lines != 14 || inbox != 14 {
				t.Fatalf("%d statement lines and %d inbox rows, want 14 of each", lines, inbox)
			}
		})
	}
}

func TestDemoMemstore(t *testing.T) {
	checkDemo(t, memstore.New(nil), aggregate.NewMemorySnapshots())
}

func TestDemoPostgres(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			store, snaps := pgBackend(t, driver)
			checkDemo(t, store, snaps)
		})
	}
}

// pgBackend returns a store and snapshot store in a fresh schema, dropped
// when the test ends.
func pgBackend(t *testing.T, driver string) (eventstore.Store, aggregate.SnapshotStore) {
	t.Helper()
	db := testdb.Open(t, driver)
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(context.Background(), db, schema); err != nil {
		t.Fatal(err)
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	snaps, err := pgsnapshot.New(db, schema)
	if err != nil {
		t.Fatal(err)
	}
	return store, snaps
}

// TestOpenRefusesAnEarlierRun runs the program's own --dsn path twice on one
// schema: the second run is refused before it writes anything.
func TestOpenRefusesAnEarlierRun(t *testing.T) {
	ctx := context.Background()
	schema := testdb.Schema(t, testdb.Open(t, "postgres"))
	store, snaps, closeStore, err := open(ctx, testdb.DSN(), schema)
	if err != nil {
		t.Fatal(err)
	}
	b, err := broker.Open(ctx, broker.Config{Kind: broker.GoChannel})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var out strings.Builder
	err = run(ctx, &out, store, snaps, b)
	closeStore()
	if err != nil || out.String() != wantDemo {
		t.Fatalf("first run: %v\n%s", err, out.String())
	}
	if _, _, closeStore, err := open(ctx, testdb.DSN(), schema); err == nil || !strings.Contains(err.Error(), "earlier run") {
		if err == nil {
			closeStore()
		}
		t.Fatalf("second open: %v, want a refusal naming the earlier run", err)
	}
}

// TestConcurrentTransfers: 16 goroutines move money at random between 6
// accounts at once, with conflicts and refusals. No money is made or lost,
// no rule is broken, snapshots agree with the events, and every transfer
// that succeeded is stored exactly once on each side.
func TestConcurrentTransfers(t *testing.T) {
	t.Run("memory", func(t *testing.T) {
		checkConcurrentTransfers(t, memstore.New(nil), aggregate.NewMemorySnapshots())
	})
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			store, snaps := pgBackend(t, driver)
			checkConcurrentTransfers(t, store, snaps)
		})
	}
}

type transfer struct {
	id, from, to string
	amount       int
}

// move is one side of a transfer as stored.
type move struct {
	account string
	amount  int
}

func checkConcurrentTransfers(t *testing.T, store eventstore.Store, snaps aggregate.SnapshotStore) {
	const (
		accounts  = 6
		opening   = 1000
		workers   = 16
		perWorker = 40
	)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bank, err := NewBank(store, snaps)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, accounts)
	for i := range ids {
		ids[i] = fmt.Sprintf("acc%d", i)
		if err := bank.Open(ctx, ids[i], "owner "+ids[i], 0, opening); err != nil {
			t.Fatal(err)
		}
	}

	var (
		mu      sync.Mutex
		done    = map[string]transfer{}
		refused = map[string]transfer{}
		wg      sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(2024, uint64(w)))
			for i := range perWorker {
				from := rng.IntN(accounts)
				to := (from + 1 + rng.IntN(accounts-1)) % accounts
				tr := transfer{id: fmt.Sprintf("t-%d-%d", w, i), from: ids[from], to: ids[to], amount: 1 + rng.IntN(500)}
				err := bank.Transfer(ctx, tr.id, tr.from, tr.to, tr.amount)
				mu.Lock()
				switch {
				case err == nil:
					done[tr.id] = tr
				case errors.Is(err, ErrOverdraft):
					refused[tr.id] = tr
				default:
					t.Errorf("%+v: %v", tr, err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	t.Logf("%d transfers done, %d refused for overdraft", len(done), len(refused))
	if len(done) == 0 || len(refused) == 0 {
		t.Fatalf("%d done, %d refused: the burst should have both", len(done), len(refused))
	}

	// Read back every account three ways: through snapshots, by a fresh fold
	// in a repository without snapshots, and from the raw events.
	plain, err := NewBank(store, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := eventCodec()
	debits, credits := map[string][]move{}, map[string][]move{}
	total := 0
	for _, id := range ids {
		cached, err := bank.Account(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		folded, err := plain.Account(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := describeAccount(cached), describeAccount(folded); got != want {
			t.Errorf("%s through snapshots: %s; folded from events: %s", id, got, want)
		}
		if cached.Balance < -cached.OverdraftLimit {
			t.Errorf("%s: balance %d is below its overdraft limit %d", id, cached.Balance, cached.OverdraftLimit)
		}
		total += cached.Balance

		stored, err := eventstore.LoadStream(ctx, store, "account-"+id)
		if err != nil {
			t.Fatal(err)
		}
		history := make([]any, len(stored))
		balance := 0
		for i, e := range stored {
			v, err := reg.Decode(e)
			if err != nil {
				t.Fatal(err)
			}
			history[i] = v
			switch v := v.(type) {
			case Credited:
				balance += v.Amount
				credits[v.Ref] = append(credits[v.Ref], move{id, v.Amount})
			case Debited:
				balance -= v.Amount
				debits[v.Ref] = append(debits[v.Ref], move{id, v.Amount})
				if e.Metadata.CorrelationID != v.Ref {
					t.Errorf("%s v%d: correlation id %q, want the transfer id %q", id, e.Version, e.Metadata.CorrelationID, v.Ref)
				}
			}
		}
		if balance != cached.Balance || eventstore.Version(len(stored)) != cached.Version() {
			t.Errorf("%s: events sum to %d over %d events; loaded %d at v%d", id, balance, len(stored), cached.Balance, cached.Version())
		}
		checkSnapshot(t, snaps, id, history)
	}
	if total != accounts*opening {
		t.Errorf("balances sum to %d, want %d", total, accounts*opening)
	}

	for _, tr := range done {
		if d := debits[tr.id]; len(d) != 1 || d[0] != (move{tr.from, tr.amount}) {
			t.Errorf("%+v: debits stored %+v, want exactly one", tr, d)
		}
		if c := credits[tr.id]; len(c) != 1 || c[0] != (move{tr.to, tr.amount}) {
			t.Errorf("%+v: credits stored %+v, want exactly one", tr, c)
		}
	}
	for ref, d := range debits {
		if _, ok := done[ref]; !ok {
			t.Errorf("debit %s %+v stored for no successful transfer", ref, d)
		}
	}
	for ref, c := range credits {
		if _, ok := done[ref]; !ok && !strings.HasPrefix(ref, "opening-") {
			t.Errorf("credit %s %+v stored for no successful transfer", ref, c)
		}
	}
}

// checkSnapshot: the account's stored snapshot is its state folded from the
// events up to the snapshot's version.
func checkSnapshot(t *testing.T, snaps aggregate.SnapshotStore, id string, history []any) {
	t.Helper()
	snap, ok, err := snaps.LoadSnapshot(context.Background(), "account-"+id)
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		if len(history) >= SnapshotEvery {
			t.Errorf("%s: no snapshot after %d events, want one every %d", id, len(history), SnapshotEvery)
		}
		return
	}
	if snap.SchemaVersion != 1 || snap.Version < SnapshotEvery || int(snap.Version) > len(history) || len(history)-int(snap.Version) >= SnapshotEvery {
		t.Errorf("%s: snapshot at v%d (schema v%d) of %d events, want one at most %d events old", id, snap.Version, snap.SchemaVersion, len(history), SnapshotEvery)
		return
	}
	var fromSnap Account
	if err := json.Unmarshal(snap.Data, &fromSnap); err != nil {
		t.Fatalf("%s: snapshot %s: %v", id, snap.Data, err)
	}
	var folded Account
	aggregate.Rehydrate(&folded, id, history[:snap.Version]...)
	if got, want := state(&fromSnap), state(&folded); got != want {
		t.Errorf("%s: snapshot at v%d holds %s; the events up to it fold to %s", id, snap.Version, got, want)
	}
}

// state is the account's state without its version.
func state(a *Account) string {
	return fmt.Sprintf("{Opened:%t Owner:%q OverdraftLimit:%d Balance:%d}", a.Opened, a.Owner, a.OverdraftLimit, a.Balance)
}

func describeAccount(a *Account) string {
	return fmt.Sprintf("%s v%d", state(a), a.Version())
}

// TestTransferRefusals: a transfer that breaks a rule writes nothing.
func TestTransferRefusals(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	bank, err := NewBank(store, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := bank.Open(ctx, "ada", "Ada Lovelace", 0, 100); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		from, to string
		amount   int
		want     error
	}{
		{"ada", "nobody", 10, aggregate.ErrNotFound},
		{"nobody", "ada", 10, ErrNotOpen},
		{"ada", "ada", 10, ErrSameAccount},
		{"ada", "ada", 0, ErrSameAccount},
	} {
		if err := bank.Transfer(ctx, "t", tc.from, tc.to, tc.amount); !errors.Is(err, tc.want) {
			t.Errorf("transfer %d from %s to %s: %v, want %v", tc.amount, tc.from, tc.to, err, tc.want)
		}
	}
	if err := bank.Open(ctx, "bob", "Bob Bitdiddle", 0, 0); err != nil {
		t.Fatal(err)
	}
	for _, amount := range []int{0, -5} {
		if err := bank.Transfer(ctx, "t", "ada", "bob", amount); !errors.Is(err, ErrInvalidAmount) {
			t.Errorf("transfer of %d: %v, want ErrInvalidAmount", amount, err)
		}
	}
	for stream, want := range map[string]eventstore.Version{"account-ada": 2, "account-bob": 1, "account-nobody": 0} {
		if v, err := store.StreamVersion(ctx, stream); err != nil || v != want {
			t.Errorf("%s at v%d (%v), want v%d: a refused transfer wrote", stream, v, err, want)
		}
	}
}

// The rules, as given events, when a command, then events or an error.

var opened = AccountOpened{Owner: "Ada Lovelace", OverdraftLimit: 100}

func TestAccountRules(t *testing.T) {
	for _, tc := range []struct {
		name  string
		given []any
		when  func(*Account) error
		then  []any // the events recorded, if err is nil
		err   error
	}{
		{"open", nil, func(a *Account) error { return a.Open("Ada Lovelace", 100) }, []any{opened}, nil},
		{"open twice", []any{opened}, func(a *Account) error { return a.Open("Ada Lovelace", 100) }, nil, ErrAlreadyOpen},
		{"negative overdraft limit", nil, func(a *Account) error { return a.Open("Ada Lovelace", -1) }, nil, ErrInvalidAmount},
		{"deposit", []any{opened}, func(a *Account) error { return a.Deposit(5, "d") }, []any{Credited{5, "d"}}, nil},
		{"deposit zero", []any{opened}, func(a *Account) error { return a.Deposit(0, "d") }, nil, ErrInvalidAmount},
		{"deposit negative", []any{opened}, func(a *Account) error { return a.Deposit(-5, "d") }, nil, ErrInvalidAmount},
		{"deposit to an unopened account", nil, func(a *Account) error { return a.Deposit(5, "d") }, nil, ErrNotOpen},
		{"withdraw to the overdraft limit", []any{opened, Credited{50, "d"}}, func(a *Account) error { return a.Withdraw(150, "w") }, []any{Debited{150, "w"}}, nil},
		{"withdraw past the overdraft limit", []any{opened, Credited{50, "d"}}, func(a *Account) error { return a.Withdraw(151, "w") }, nil, ErrOverdraft},
		{"withdraw when overdrawn", []any{opened, Debited{100, "w"}}, func(a *Account) error { return a.Withdraw(1, "w") }, nil, ErrOverdraft},
		{"no overdraft allowed", []any{AccountOpened{Owner: "Cy", OverdraftLimit: 0}, Credited{10, "d"}}, func(a *Account) error { return a.Withdraw(11, "w") }, nil, ErrOverdraft},
		{"withdraw zero", []any{opened, Credited{50, "d"}}, func(a *Account) error { return a.Withdraw(0, "w") }, nil, ErrInvalidAmount},
		{"withdraw from an unopened account", nil, func(a *Account) error { return a.Withdraw(5, "w") }, nil, ErrNotOpen},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := aggregatetest.Given(t, new(Account), tc.given...).When(tc.when)
			if tc.err != nil {
				f.ThenError(tc.err)
				return
			}
			f.Then(tc.then...)
		})
	}
}

func TestWithdrawFoldsAndExplains(t *testing.T) {
	a := aggregatetest.Given(t, new(Account), opened, Credited{50, "d"}).
		When(func(a *Account) error { return a.Withdraw(150, "w") }).
		Then(Debited{150, "w"})
	if a.Balance != -100 {
		t.Errorf("balance %d after the withdrawal, want -100", a.Balance)
	}

	var b Account
	aggregate.Rehydrate(&b, "ada", opened, Credited{50, "d"})
	var over *OverdraftError
	if err := b.Withdraw(200, "w"); !errors.As(err, &over) || *over != (OverdraftError{Account: "ada", Balance: 50, Amount: 200, Limit: 100}) {
		t.Errorf("Withdraw(200): %v, want an *OverdraftError with the numbers", err)
	}
}

// TestGoldenHistory: events stored by earlier versions of this program
// still decode and fold.
func TestGoldenHistory(t *testing.T) {
	a := aggregatetest.ReplayGolden(t, eventCodec(), "testdata/account-history-v1.json", new(Account))
	if a.Owner != "Ada Lovelace" || a.OverdraftLimit != 100 || a.Balance != -70 || a.Version() != 5 {
		t.Errorf("golden history folds to %s", describeAccount(a))
	}
}

// TestDemoTraced: with --trace the story is the same, and then each
// command's trace is printed as a tree. A transfer's tree holds, for each
// side, the append; under it the read model applying the event, and the
// relay's publish with the statements service's handling under that.
func TestDemoTraced(t *testing.T) {
	for _, c := range []struct {
		name    string
		backend func(t *testing.T) (eventstore.Store, aggregate.SnapshotStore)
	}{
		{"memory", func(*testing.T) (eventstore.Store, aggregate.SnapshotStore) {
			return memstore.New(nil), aggregate.NewMemorySnapshots()
		}},
		{"postgres", func(t *testing.T) (eventstore.Store, aggregate.SnapshotStore) { return pgBackend(t, "postgres") }},
	} {
		t.Run(c.name, func(t *testing.T) {
			store, snaps := c.backend(t)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			b, err := broker.Open(ctx, broker.Config{Kind: broker.GoChannel, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			var story, traces strings.Builder
			tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(telemetry.NewTreeExporter(&traces)))
			if err := runTraced(ctx, &story, store, snaps, b, tp); err != nil {
				t.Fatalf("run: %v\noutput so far:\n%s", err, story.String())
			}
			if story.String() != wantDemo {
				t.Errorf("output:\n%s\nwant:\n%s", story.String(), wantDemo)
			}
			if err := tp.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			trees := strings.Split(strings.TrimSpace(traces.String()), "\n\n")
			if len(trees) != 9 {
				t.Errorf("%d traces, want one per command (9)", len(trees))
			}
			var tree []node
			for _, tr := range trees {
				if nodes := parseTree(tr); len(nodes) > 0 && strings.HasPrefix(nodes[0].text, "transfer t-1 ") {
					tree = nodes
				}
			}
			if tree == nil {
				t.Fatalf("no trace of transfer t-1:\n%s", traces.String())
			}
			for _, account := range []string{"account-ada", "account-bob"} {
				app := child(tree, 0, "stele.append ", "stream="+account)
				if app < 0 {
					t.Errorf("transfer t-1's trace has no append to %s under the command:\n%s", account, dump(tree))
					continue
				}
				if child(tree, app, "stele.project balances ", "stream="+account) < 0 {
					t.Errorf("no projection of the %s event under its append:\n%s", account, dump(tree))
				}
				pub := child(tree, app, "stele.publish bank.public ", "stream="+account)
				if pub < 0 || child(tree, pub, "stele.handle statements ", "topic=bank.public") < 0 {
					t.Errorf("no publish of the %s event with the statements service's handling under it:\n%s", account, dump(tree))
				}
			}
		})
	}
}

// node is a line of a printed trace tree (after its header).
type node struct {
	text   string
	parent int // -1 for a root
}

func parseTree(tree string) []node {
	var nodes []node
	var stack []int // the open nodes, by depth
	for _, line := range strings.Split(tree, "\n")[1:] {
		rest := strings.TrimLeft(line, "│├└─ ")
		depth := len([]rune(line[:len(line)-len(rest)])) / 3
		stack = stack[:min(depth, len(stack))]
		parent := -1
		if depth > 0 && len(stack) == depth {
			parent = stack[depth-1]
		}
		nodes = append(nodes, node{text: rest, parent: parent})
		stack = append(stack, len(nodes)-1)
	}
	return nodes
}

// child returns the index of a child of parent whose text starts with
// prefix and contains has, or -1.
func child(nodes []node, parent int, prefix, has string) int {
	for i, n := range nodes {
		if n.parent == parent && strings.HasPrefix(n.text, prefix) && strings.Contains(n.text, has) {
			return i
		}
	}
	return -1
}

func dump(nodes []node) string {
	var b strings.Builder
	for i, n := range nodes {
		fmt.Fprintf(&b, "%d (parent %d) %s\n", i, n.parent, n.text)
	}
	return b.String()
}

// dropPublicTopic removes the bank's topic from a shared broker: its NATS
// stream, or its RabbitMQ exchange and the statements queue.
func dropPublicTopic(kind, topic string) {
	switch kind {
	case "nats":
		nc, err := nats.Connect(testsvc.NATSURL)
		if err != nil {
			return
		}
		defer nc.Close()
		if js, err := nc.JetStream(); err == nil {
			_ = js.DeleteStream(broker.NATSStreamName(topic))
		}
	case "amqp":
		conn, err := amqp091.Dial(testsvc.AMQPURL)
		if err != nil {
			return
		}
		defer conn.Close()
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(broker.AMQPQueueName(topic, "statements"), false, false, false)
			_ = ch.ExchangeDelete(topic, false, false)
		}
	}
}
