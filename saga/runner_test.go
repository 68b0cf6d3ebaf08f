package saga_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/saga"
)

// These tests run started runners: in the background, on the real clock,
// with commands over an in-process Watermill bus.

// testLogger sends a runner's warnings to the test's log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

var _ io.Writer = testWriter{}

func newGoChannel(t *testing.T) *gochannel.GoChannel {
	ps := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, watermill.NopLogger{})
	t.Cleanup(func() { _ = ps.Close() })
	return ps
}

// responder is another service: it answers the commands on its topics with
// bus.Reply, or bus.ReplyError when handle fails. Subscribe it before the
// runner starts: a GoChannel drops what nobody listens to.
type responder struct {
	mu         sync.Mutex
	deliveries map[string]int // by topic
	keys       map[string]int // by idempotency key
	payloads   map[string][]string
}

func startResponder(t *testing.T, ps *gochannel.GoChannel, handle func(topic string, msg *message.Message) ([]byte, error), topics ...string) *responder {
	t.Helper()
	r := &responder{deliveries: map[string]int{}, keys: map[string]int{}, payloads: map[string][]string{}}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	for _, topic := range topics {
		msgs, err := ps.Subscribe(ctx, topic)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			for msg := range msgs {
				r.mu.Lock()
				r.deliveries[topic]++
				r.keys[msg.Metadata.Get(bus.KeyIdempotency)]++
				r.payloads[topic] = append(r.payloads[topic], string(msg.Payload))
				r.mu.Unlock()
				out, err := handle(topic, msg)
				if err != nil {
					err = bus.ReplyError(ps, msg, err)
				} else {
					err = bus.Reply(ps, msg, message.NewMessage(uuid.NewString(), out))
				}
				if err != nil {
					t.Errorf("replying to %s: %v", topic, err)
				}
				msg.Ack()
			}
		})
	}
	return r
}

func (r *responder) count(topic string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.deliveries[topic]
}

// duplicating publishes every message to topic twice, as a broker that
// redelivers does.
type duplicating struct {
	message.Publisher
	topic string
}

func (d duplicating) Publish(topic string, msgs ...*message.Message) error {
	if err := d.Publisher.Publish(topic, msgs...); err != nil || topic != d.topic {
		return err
	}
	copies := make([]*message.Message, len(msgs))
	for i, m := range msgs {
		copies[i] = m.Copy()
	}
	return d.Publisher.Publish(topic, copies...)
}

func startRunner(t *testing.T, store eventstore.Store, def saga.Definition, cfg saga.Config) *saga.Runner {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	r, err := saga.NewRunner(store, def, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopRunner(t, r) })
	return r
}

func stopRunner(t *testing.T, r *saga.Runner) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Stop(ctx); err != nil {
		t.Errorf("stopping the runner: %v", err)
	}
	if err := r.Err(); err != nil {
		t.Errorf("the runner failed: %v", err)
	}
}

func place(t *testing.T, store eventstore.Store, ids ...string) {
	t.Helper()
	for _, id := range ids {
		if _, err := store.Append(context.Background(), id, eventstore.NoStream,
			[]eventstore.EventData{{Type: "order_placed", Data: []byte(`{"order":"` + id + `"}`)}}); err != nil {
			t.Fatal(err)
		}
	}
}

func waitDone(t *testing.T, r *saga.Runner, ids ...string) map[string]*saga.Instance {
	t.Helper()
	out := map[string]*saga.Instance{}
	wait.Until(t, "sagas "+strings.Join(ids, ", ")+" to end", func() bool {
		for _, id := range ids {
			in, err := r.Load(context.Background(), id)
			if err != nil || !in.Status.Done() {
				return false
			}
			out[id] = in
		}
		return true
	})
	return out
}

// countType counts the history entries of type typ for step's action.
func countType(in *saga.Instance, typ, step string) int { return len(entries(in, typ, step, false)) }

// TestSendStepsOverGoChannel: commands leave through the saga's stream and
// the relay, a service answers them with bus.Reply, and the replies move
// the sagas on; the charge command is delivered twice (same idempotency
// key), answered twice, and has one effect; the second answer changes
// nothing. A permanent error reply compensates, by command too.
func TestSendStepsOverGoChannel(t *testing.T) {
	store := memstore.New(nil)
	ps := newGoChannel(t)
	fx := newEffects()
	svc := startResponder(t, ps, func(topic string, msg *message.Message) ([]byte, error) {
		key := msg.Metadata.Get(bus.KeyIdempotency)
		sagaID := strings.Split(key, ":")[1]
		switch topic {
		case "payments.charge":
			fx.apply(sagaID, "charge", key)
			return []byte("ch-" + sagaID), nil
		case "payments.refund":
			fx.apply(sagaID, "refund", key)
			return nil, nil
		default: // shipping.ship
			if sagaID == "order-2" {
				return nil, bus.Permanent(errors.New("no courier"))
			}
			fx.apply(sagaID, "ship", key)
			return nil, nil
		}
	}, "payments.charge", "payments.refund", "shipping.ship")

	def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: send("payments.charge"), Compensation: send("payments.refund")},
		{Name: "ship", Action: saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
			return "shipping.ship", message.NewMessage(uuid.NewString(), sc.Outputs["charge"]), nil
		})},
	}}
	r := startRunner(t, store, def, saga.Config{Publisher: duplicating{ps, "payments.charge"}, Subscriber: ps})
	place(t, store, "order-1", "order-2")
	done := waitDone(t, r, "order-1", "order-2")

	one, two := done["order-1"], done["order-2"]
	if one.Status != saga.Completed || two.Status != saga.Compensated {
		t.Fatalf("order-1 %s, order-2 %s (%s)", one.Status, two.Status, two.FailedReason)
	}
	wantEffects(t, fx, "order-1", "reserve", "charge", "ship")
	wantEffects(t, fx, "order-2", "reserve", "charge", "refund", "release")
	if string(one.Outputs[1]) != "ch-order-1" {
		t.Fatalf("charge's output %q, want the reply's payload", one.Outputs[1])
	}
	if two.FailedReason != "step ship failed permanently: bus: the responder failed: no courier" {
		t.Fatalf("order-2's reason %q", two.FailedReason)
	}
	svc.mu.Lock()
	defer svc.mu.Unlock()
	for _, id := range []string{"order-1", "order-2"} {
		if n := svc.keys["order:"+id+":charge"]; n != 2 {
			t.Fatalf("%s's charge delivered %d times, want 2 (a duplicate)", id, n)
		}
		if n := fx.callsOf("order:" + id + ":charge"); n != 2 {
			t.Fatalf("%s's charge answered %d times, want 2", id, n)
		}
		in := done[id]
		if n := countType(in, "step_succeeded", "charge"); n != 1 {
			t.Fatalf("%s's charge recorded as done %d times", id, n)
		}
	}
	if !slices.Contains(svc.payloads["shipping.ship"], "ch-order-1") {
		t.Fatalf("ship commands carried %q, want charge's output", svc.payloads["shipping.ship"])
	}
}

// TestAbortDuringALocalStep: an abort while a local action runs lets it
// finish, records its outcome without running it again, then compensates
// it and the steps before it; the next step never runs.
func TestAbortDuringALocalStep(t *testing.T) {
	store := memstore.New(nil)
	fx := newEffects()
	entered, release := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	calls := 0
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
			mu.Lock()
			calls++
			first := calls == 1
			mu.Unlock()
			if first {
				close(entered)
				<-release
			}
			fx.apply(sc.SagaID, "charge", sc.Key)
			return nil, nil
		}), Compensation: fx.do("refund")},
		{Name: "ship", Action: fx.do("ship")},
	}}
	r := startRunner(t, store, def, saga.Config{})
	place(t, store, "order-1")
	<-entered
	if err := saga.Abort(context.Background(), store, "order", "order-1", "customer cancelled"); err != nil {
		t.Fatal(err)
	}
	close(release)
	in := waitDone(t, r, "order-1")["order-1"]
	if in.Status != saga.Compensated || in.FailedReason != "aborted: customer cancelled" {
		t.Fatalf("%s: %s", in.Status, in.FailedReason)
	}
	wantEffects(t, fx, "order-1", "reserve", "charge", "refund", "release")
	if calls != 1 {
		t.Fatalf("the charge ran %d times, want once: its outcome was there to record", calls)
	}
}

// TestRestartResumes: a runner stopped while a local action runs leaves the
// attempt in flight; the next runner on the store runs it again with the
// same key and attempt, and finishes the saga, each effect once.
func TestRestartResumes(t *testing.T) {
	store := memstore.New(nil)
	fx := newEffects()
	ship, entered := blockOnce()
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: fx.do("charge")},
		{Name: "ship", Action: ship.action(fx)},
	}}
	first, err := saga.NewRunner(store, def, saga.Config{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	place(t, store, "order-1")
	<-entered
	stopRunner(t, first)
	in, err := first.Load(context.Background(), "order-1")
	if err != nil {
		t.Fatal(err)
	}
	if in.Status != saga.Running || !in.InFlight || in.Current != 2 {
		t.Fatalf("after the stop: %s, in flight %v, step %d", in.Status, in.InFlight, in.Current)
	}

	second := startRunner(t, store, def, saga.Config{})
	in = waitDone(t, second, "order-1")["order-1"]
	if in.Status != saga.Completed {
		t.Fatalf("after the restart: %s (%s)", in.Status, in.FailedReason)
	}
	wantEffects(t, fx, "order-1", "reserve", "charge", "ship")
	if got := ship.seen(); !slices.Equal(got, []string{"order:order-1:ship#1", "order:order-1:ship#1"}) {
		t.Fatalf("ship ran as %q, want attempt 1 twice, with one key", got)
	}
	if n := countType(in, "started", ""); n != 1 {
		t.Fatalf("the saga was started %d times", n)
	}
}

// blocker is a local action whose first call blocks until its context ends,
// as a runner stopping mid-action sees it.
type blocker struct {
	mu      sync.Mutex
	calls   []string
	entered chan struct{}
}

func blockOnce() (*blocker, <-chan struct{}) {
	b := &blocker{entered: make(chan struct{})}
	return b, b.entered
}

func (b *blocker) action(fx *effects) saga.Action {
	return saga.Do(func(ctx context.Context, sc saga.StepContext) ([]byte, error) {
		b.mu.Lock()
		b.calls = append(b.calls, sc.Key+"#"+string(rune('0'+sc.Attempt)))
		first := len(b.calls) == 1
		b.mu.Unlock()
		if first {
			close(b.entered)
			<-ctx.Done()
			return nil, ctx.Err()
		}
		fx.apply(sc.SagaID, sc.Step, sc.Key)
		return nil, nil
	})
}

func (b *blocker) seen() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.calls)
}

// TestRestartResumesOverPostgres: the same, over pgstore with the runner's
// checkpoint and its relay's lease in PostgreSQL, and a Send step: the
// second runner takes the relay over and continues after the first's
// checkpoint, and every effect happens once.
func TestRestartResumesOverPostgres(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema, PollInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	ps := newGoChannel(t)
	fx := newEffects()
	svc := startResponder(t, ps, func(topic string, msg *message.Message) ([]byte, error) {
		key := msg.Metadata.Get(bus.KeyIdempotency)
		fx.apply(strings.Split(key, ":")[1], "charge", key)
		return []byte("ch_1"), nil
	}, "payments.charge")
	ship, entered := blockOnce()
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: send("payments.charge")},
		{Name: "ship", Action: ship.action(fx)},
	}}
	cfg := saga.Config{Publisher: ps, Subscriber: ps, DB: db, Schema: schema, RescanInterval: 50 * time.Millisecond, Logger: testLogger(t)}

	first, err := saga.NewRunner(store, def, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Start(ctx); err != nil {
		t.Fatal(err)
	}
	place(t, store, "order-1")
	<-entered
	// The relay checkpoints once the broker took the command, which may
	// be after the reply came: wait for it, or the next relay sends it again.
	assertRelayRow(t, db, schema, 1)
	stopRunner(t, first)
	if n := svc.count("payments.charge"); n != 1 {
		t.Fatalf("charge delivered %d times before the restart, want 1", n)
	}
	var checkpoint int64
	if err := db.GetContext(ctx, &checkpoint, `SELECT position FROM `+schema+`.projection_checkpoints WHERE name = 'saga.order'`); err != nil || checkpoint == 0 {
		t.Fatalf("the runner's checkpoint: at %d, %v", checkpoint, err)
	}

	second := startRunner(t, store, def, cfg)
	place(t, store, "order-2")
	done := waitDone(t, second, "order-1", "order-2")
	for id, in := range done {
		if in.Status != saga.Completed {
			t.Fatalf("%s: %s (%s)", id, in.Status, in.FailedReason)
		}
		wantEffects(t, fx, id, "reserve", "charge", "ship")
		if n := countType(in, "started", ""); n != 1 {
			t.Fatalf("%s was started %d times", id, n)
		}
	}
	if got := ship.seen(); !slices.Equal(got[:2], []string{"order:order-1:ship#1", "order:order-1:ship#1"}) {
		t.Fatalf("ship ran as %q, want order-1's attempt 1 twice", got)
	}
	if n := svc.count("payments.charge"); n != 2 {
		t.Fatalf("charge delivered %d times in all, want once per saga: the relay resumed from its checkpoint", n)
	}
	assertRelayRow(t, db, schema, 2)
}

// assertRelayRow waits until the relay's row in PostgreSQL counts published
// commands (it checkpoints just after the broker took them).
func assertRelayRow(t *testing.T, db *sqlx.DB, schema string, published int64) {
	t.Helper()
	wait.Until(t, "the relay to checkpoint its commands", func() bool {
		var n int64
		err := db.Get(&n, `SELECT published FROM `+schema+`.outbox_relays WHERE name = 'saga.order'`)
		return err == nil && n == published
	})
}

// vclock is a clock a test moves by hand.
type vclock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *vclock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *vclock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// TestStartedRunnerKeepsToItsClock: a started runner's timers follow
// Config.Clock, not the wall clock: with the clock far from now, a retry
// still happens within a rescan of its time coming.
func TestStartedRunnerKeepsToItsClock(t *testing.T) {
	store := memstore.New(nil)
	clock := &vclock{now: time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC)}
	var mu sync.Mutex
	attempts := 0
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{Initial: time.Hour}, Steps: []saga.Step{
		{Name: "charge", Action: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) {
			mu.Lock()
			defer mu.Unlock()
			if attempts++; attempts == 1 {
				return nil, errors.New("busy")
			}
			return nil, nil
		})},
	}}
	r := startRunner(t, store, def, saga.Config{Clock: clock.Now, RescanInterval: 20 * time.Millisecond})
	place(t, store, "order-1")
	wait.Until(t, "the first attempt to fail", func() bool {
		in, err := r.Load(context.Background(), "order-1")
		return err == nil && !in.RetryAt.IsZero()
	})
	clock.Advance(2 * time.Hour)
	if in := waitDone(t, r, "order-1")["order-1"]; in.Status != saga.Completed {
		t.Fatalf("%s", in.Status)
	}
}

// TestStartedElsewhereIsDriven: a saga another runner started (and died
// before driving), after this runner looked for open sagas, is driven when
// this runner reads its start from the feed, though the start is not its
// own. Here the starting event and the other runner's saga.started commit
// together, so the runner finds the saga started when it tries to start it.
func TestStartedElsewhereIsDriven(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	fx := newEffects()
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{{Name: "charge", Action: fx.do("charge")}}}
	r, err := saga.NewRunner(store, def, saga.Config{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.RunDue(ctx); err != nil { // looks for open sagas: none yet
		t.Fatal(err)
	}
	tx := store.Begin()
	if _, err := tx.Append(ctx, "order-1", eventstore.NoStream, []eventstore.EventData{{Type: "order_placed", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Append(ctx, saga.StreamID("order", "order-1"), eventstore.NoStream,
		[]eventstore.EventData{{Type: saga.TypeStarted, Data: []byte(`{"input":{}}`)}}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := r.RunDue(ctx); err != nil {
		t.Fatal(err)
	}
	in, err := r.Load(ctx, "order-1")
	if err != nil {
		t.Fatal(err)
	}
	if in.Status != saga.Completed {
		t.Fatalf("the saga is %s, want it driven to completion", in.Status)
	}
	wantEffects(t, fx, "order-1", "charge")
}
