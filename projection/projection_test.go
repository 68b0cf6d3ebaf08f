package projection_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/projection"
)

func TestMain(m *testing.M) { testdb.VerifyMain(m) }

func appendN(t *testing.T, s eventstore.Store, prefix string, n int) eventstore.Position {
	t.Helper()
	var last eventstore.Position
	for i := range n {
		res, err := s.Append(context.Background(), fmt.Sprintf("%s-%d", prefix, i%7), eventstore.Any,
			[]eventstore.EventData{{Type: "counted", Data: fmt.Appendf(nil, `{"n":%d}`, i)}})
		if err != nil {
			t.Fatal(err)
		}
		last = res.LastPosition
	}
	return last
}

// TestHandlerFollowsTheFeed: on the in-memory store, a Handler gets every
// event in feed order, catching up and then live, and Status reports no lag.
func TestHandlerFollowsTheFeed(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	appendN(t, store, "acct", 120)
	var mu sync.Mutex
	var got []eventstore.Event
	r, err := projection.NewRunner(store, projection.HandlerFunc(func(_ context.Context, e eventstore.Event) error {
		mu.Lock()
		got = append(got, e)
		mu.Unlock()
		return nil
	}), projection.Config{Name: "seen", BatchSize: 25})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer r.Stop(ctx)
	appendN(t, store, "late", 30) // live
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(got) }
	wait.Until(t, "150 events", func() bool { return count() == 150 })
	var want []eventstore.Event
	for e, err := range eventstore.IterAll(ctx, store, eventstore.ReadAllOpts{}) {
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, e)
	}
	mu.Lock()
	for i := range want {
		if got[i].ID != want[i].ID {
			t.Fatalf("event %d out of feed order", i)
		}
	}
	mu.Unlock()
	st, err := r.Status(ctx)
	if err != nil || st.State != projection.StateRunning || st.LagEvents != 0 || st.Position != want[len(want)-1].Position {
		t.Fatalf("status %+v (%v)", st, err)
	}
}

// pgSetup migrates a schema of the test's own, with a read model table.
func pgSetup(t *testing.T, db *sqlx.DB) (*pgstore.Store, string) {
	t.Helper()
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(context.Background(), db, schema); err != nil {
		t.Fatal(err)
	}
	testdb.Exec(t, db,
		`CREATE TABLE "`+schema+`".totals (stream_id text PRIMARY KEY, events int NOT NULL, sum bigint NOT NULL)`,
		`CREATE TABLE "`+schema+`".applied (event_id uuid PRIMARY KEY)`)
	s, err := pgstore.New(db, &pgstore.Config{Schema: schema, PollInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, schema
}

// totals is the read model: per stream, how many events and the sum of their
// n. applied has one row per event handled; a second apply of one event
// would fail on its primary key.
func totals(schema string, onHandle func(e eventstore.Event) error) projection.TxHandlerFunc {
	return func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
		if err := onHandle(e); err != nil {
			return err
		}
		var n int
		fmt.Sscanf(string(e.Data), `{"n":%d}`, &n)
		if _, err := tx.ExecContext(ctx, `INSERT INTO "`+schema+`".applied VALUES ($1)`, e.ID); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO "`+schema+`".totals VALUES ($1, 1, $2)
			ON CONFLICT (stream_id) DO UPDATE SET events = totals.events + 1, sum = totals.sum + excluded.sum`, e.StreamID, n)
		return err
	}
}

// checkReadModel compares the read model with a pure fold of the log.
func checkReadModel(t *testing.T, db *sqlx.DB, store eventstore.Store, schema string) {
	t.Helper()
	want := map[string][2]int64{}
	total := 0
	for e, err := range eventstore.IterAll(context.Background(), store, eventstore.ReadAllOpts{}) {
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		fmt.Sscanf(string(e.Data), `{"n":%d}`, &n)
		w := want[e.StreamID]
		want[e.StreamID] = [2]int64{w[0] + 1, w[1] + n}
		total++
	}
	rows, err := db.Queryx(`SELECT stream_id, events, sum FROM "` + schema + `".totals`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[string][2]int64{}
	for rows.Next() {
		var id string
		var ev, sum int64
		if err := rows.Scan(&id, &ev, &sum); err != nil {
			t.Fatal(err)
		}
		got[id] = [2]int64{ev, sum}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("read model %v, fold of the log %v", got, want)
	}
	var applied int
	db.Get(&applied, `SELECT count(*) FROM "`+schema+`".applied`)
	if applied != total {
		t.Fatalf("%d events applied, %d in the log", applied, total)
	}
}

// TestExactlyOnceThroughCrashes: the runner is killed again and again between
// handling events and committing (its context cancelled inside the handler),
// while appends go on; each time a new runner resumes. The read model ends
// equal to a pure fold of the log, with no event applied twice.
func TestExactlyOnceThroughCrashes(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			db := testdb.Open(t, driver)
			store, schema := pgSetup(t, db)
			lastAppended := appendN(t, store, "acct", 300)
			stopAppends := make(chan struct{})
			var appends sync.WaitGroup
			appends.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stopAppends:
						return
					default:
					}
					lastAppended = appendN(t, store, fmt.Sprintf("live%d", i%3), 5)
				}
			})
			rng := rand.New(rand.NewPCG(7, 7))
			crashes := 0
			for round := 0; crashes < 25 && round < 200; round++ {
				ctx, kill := context.WithCancel(context.Background())
				var rngMu sync.Mutex
				r, err := projection.NewRunner(store, totals(schema, func(eventstore.Event) error {
					rngMu.Lock()
					defer rngMu.Unlock()
					if rng.IntN(40) == 0 {
						kill() // dies between the handler's writes and the commit
					}
					return nil
				}), projection.Config{Name: "totals", DB: db, Schema: schema, BatchSize: 20, LeaseRetry: 10 * time.Millisecond})
				if err != nil {
					t.Fatal(err)
				}
				r.Start(ctx)
				select {
				case <-r.Done():
					crashes++
				case <-time.After(2 * time.Second):
					kill()
					<-r.Done()
				}
				if r.Err() != nil {
					t.Fatalf("runner failed: %v", r.Err())
				}
			}
			close(stopAppends)
			appends.Wait()
			// A last runner with no crashes catches up.
			r, _ := projection.NewRunner(store, totals(schema, func(eventstore.Event) error { return nil }),
				projection.Config{Name: "totals", DB: db, Schema: schema, LeaseRetry: 10 * time.Millisecond})
			ctx := context.Background()
			r.Start(ctx)
			defer r.Stop(ctx)
			// Not Head: the feed may still hold back the last appends while
			// other transactions on the server finish.
			wait.Until(t, "the last runner to catch up", func() bool {
				st, _ := r.Status(ctx)
				return st.Position == lastAppended
			})
			t.Logf("%d crashes", crashes)
			checkReadModel(t, db, store, schema)
		})
	}
}

var errPoison = errors.New("cannot handle poison")

// TestPoisonEvent: an event whose handler always fails is parked and the
// projection goes on (PolicyPark), or the projection stops before it
// (PolicyStop). A parked event can be retried once fixed, or discarded.
func TestPoisonEvent(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	for _, policy := range []projection.Policy{projection.PolicyPark, projection.PolicyStop} {
		t.Run(fmt.Sprint(policy), func(t *testing.T) {
			store, schema := pgSetup(t, db)
			appendN(t, store, "acct", 10)
			if _, err := store.Append(ctx, "acct-poison", eventstore.NoStream, []eventstore.EventData{{Type: "unknown.type", Data: []byte(`{"n":1000}`)}}); err != nil {
				t.Fatal(err)
			}
			last := appendN(t, store, "after", 10)
			var fixed atomic.Bool
			h := totals(schema, func(e eventstore.Event) error {
				if e.Type == "unknown.type" && !fixed.Load() {
					return errPoison
				}
				return nil
			})
			r, _ := projection.NewRunner(store, h, projection.Config{
				Name: "totals", DB: db, Schema: schema, Policy: policy, Retries: 2, Backoff: time.Millisecond, BatchSize: 4,
			})
			r.Start(ctx)
			defer r.Stop(ctx)
			if policy == projection.PolicyStop {
				<-r.Done()
				st, _ := r.Status(ctx)
				if !errors.Is(r.Err(), errPoison) || st.State != projection.StateFailed || !strings.Contains(r.Err().Error(), "acct-poison") {
					t.Fatalf("stopped with %v, state %s", r.Err(), st.State)
				}
				var applied int
				db.Get(&applied, `SELECT count(*) FROM "`+schema+`".applied`)
				if applied != 10 {
					t.Fatalf("%d events applied before the poison, want 10", applied)
				}
				// What `stele projections status` shows from another process.
				var state, why string
				db.QueryRow(`SELECT state, coalesce(state_error, '') FROM "`+schema+`".projection_checkpoints WHERE name = 'totals'`).Scan(&state, &why)
				if state != "failed" || !strings.Contains(why, "poison") {
					t.Fatalf("recorded state %q (%q), want failed with the error", state, why)
				}
				return
			}
			wait.Until(t, "the runner to pass the poison", func() bool {
				st, _ := r.Status(ctx)
				return st.Position == last
			})
			dls, err := projection.ListDeadLetters(ctx, db, schema, "totals")
			if err != nil || len(dls) != 1 || dls[0].StreamID != "acct-poison" || dls[0].Attempts != 3 || !strings.Contains(dls[0].Error, "poison") {
				t.Fatalf("dead letters %+v (%v)", dls, err)
			}
			if st, _ := r.Status(ctx); st.DeadLetters != 1 {
				t.Fatalf("status counts %d dead letters", st.DeadLetters)
			}
			var applied int
			db.Get(&applied, `SELECT count(*) FROM "`+schema+`".applied`)
			if applied != 20 {
				t.Fatalf("%d events applied, want the 20 healthy ones", applied)
			}
			// An operator asks for a retry (stele dlq retry) before the fix:
			// the running projection tries, fails, and keeps the dead letter.
			if err := projection.RequestRetry(ctx, db, schema, dls[0].ID); err != nil {
				t.Fatal(err)
			}
			wait.Until(t, "the failed retry", func() bool {
				d, _ := projection.ListDeadLetters(ctx, db, schema, "totals")
				return len(d) == 1 && d[0].Attempts == 4
			})
			fixed.Store(true)
			if err := projection.RequestRetry(ctx, db, schema, dls[0].ID); err != nil {
				t.Fatal(err)
			}
			wait.Until(t, "the retried dead letter to go", func() bool {
				d, _ := projection.ListDeadLetters(ctx, db, schema, "totals")
				return len(d) == 0
			})
			checkReadModel(t, db, store, schema)
			if err := projection.DiscardDeadLetter(ctx, db, schema, dls[0].ID); !errors.Is(err, projection.ErrNoDeadLetter) {
				t.Fatalf("discarding a retried dead letter: %v", err)
			}
		})
	}
}

// TestTakeover: of two runners with one name (as in two processes: each with
// its own connection pool), one works; when it stops, the other takes over
// from its checkpoint within seconds and nothing is applied twice.
func TestTakeover(t *testing.T) {
	db := testdb.Open(t, "postgres")
	other, err := sqlx.Open("postgres", testdb.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	ctx := context.Background()
	store, schema := pgSetup(t, db)
	var handledBy [2]atomic.Int64
	pools := [2]*sqlx.DB{db, other}
	runner := func(i int) *projection.Runner {
		r, err := projection.NewRunner(store, totals(schema, func(eventstore.Event) error {
			handledBy[i].Add(1)
			return nil
		}), projection.Config{Name: "totals", DB: pools[i], Schema: schema, LeaseRetry: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	first, second := runner(0), runner(1)
	first.Start(ctx)
	wait.Until(t, "the first runner to take the lease", func() bool { st, _ := first.Status(ctx); return st.State == projection.StateRunning })
	second.Start(ctx)
	defer second.Stop(ctx)
	wait.Until(t, "the second runner to wait for the lease", func() bool { st, _ := second.Status(ctx); return st.State == projection.StateWaiting })
	last := appendN(t, store, "acct", 50)
	wait.Until(t, "the first runner to handle 50", func() bool { st, _ := first.Status(ctx); return st.Position == last })
	if st, _ := second.Status(ctx); st.State != projection.StateWaiting || handledBy[1].Load() != 0 {
		t.Fatalf("the second runner is %s and handled %d events while the first held the lease", st.State, handledBy[1].Load())
	}
	stopped := time.Now()
	first.Stop(ctx)
	last = appendN(t, store, "acct", 50)
	wait.Until(t, "the second runner to take over", func() bool { st, _ := second.Status(ctx); return st.Position == last })
	t.Logf("took over within %s", time.Since(stopped).Round(time.Millisecond))
	if handledBy[1].Load() != 50 {
		t.Fatalf("the second runner handled %d events, want the 50 new ones", handledBy[1].Load())
	}
	checkReadModel(t, db, store, schema)
}

// TestReplayFromAPointIntoAFreshReadModel: a projection under a new name
// starts after a given position, or from a time, and sees exactly the events
// after it.
func TestReplayFromAPointIntoAFreshReadModel(t *testing.T) {
	ctx := context.Background()
	var clock atomic.Int64 // RecordedAt comes from this clock, so the two halves are apart
	clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	store := memstore.New(&memstore.Config{Now: func() time.Time { return time.Unix(0, clock.Load()) }})
	mid := appendN(t, store, "early", 40)
	clock.Add(int64(time.Hour))
	since := time.Unix(0, clock.Load())
	last := appendN(t, store, "late", 25)
	for name, cfg := range map[string]projection.Config{
		"from-position": {Name: "audit-pos", From: mid},
		"since-time":    {Name: "audit-time", Since: since},
	} {
		t.Run(name, func(t *testing.T) {
			var n atomic.Int64
			r, err := projection.NewRunner(store, projection.HandlerFunc(func(_ context.Context, e eventstore.Event) error {
				if !strings.HasPrefix(e.StreamID, "late-") {
					t.Errorf("replay saw %s", e.StreamID)
				}
				n.Add(1)
				return nil
			}), cfg)
			if err != nil {
				t.Fatal(err)
			}
			r.Start(ctx)
			defer r.Stop(ctx)
			wait.Until(t, "the replay", func() bool { st, _ := r.Status(ctx); return st.Position == last })
			if n.Load() != 25 {
				t.Fatalf("replay handled %d events, want 25", n.Load())
			}
		})
	}
}

// TestConcurrentRetriesApplyOnce: two operators retry the same dead letter
// at once; the event takes effect once.
func TestConcurrentRetriesApplyOnce(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	store, schema := pgSetup(t, db)
	appendN(t, store, "acct", 3)
	var poison atomic.Bool
	poison.Store(true)
	h := totals(schema, func(e eventstore.Event) error {
		if poison.Load() {
			return errPoison
		}
		return nil
	})
	r, _ := projection.NewRunner(store, h, projection.Config{Name: "totals", DB: db, Schema: schema, Policy: projection.PolicyPark, Retries: 1, Backoff: time.Millisecond})
	r.Start(ctx)
	wait.Until(t, "three dead letters", func() bool { d, _ := projection.ListDeadLetters(ctx, db, schema, "totals"); return len(d) == 3 })
	r.Stop(ctx)
	poison.Store(false)
	dls, _ := projection.ListDeadLetters(ctx, db, schema, "totals")
	for _, d := range dls {
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i := range errs {
			wg.Go(func() { errs[i] = projection.RetryDeadLetter(ctx, store, db, schema, d.ID, h) })
		}
		wg.Wait()
		if (errs[0] == nil) == (errs[1] == nil) || !(errors.Is(errs[0], projection.ErrNoDeadLetter) || errors.Is(errs[1], projection.ErrNoDeadLetter)) {
			t.Fatalf("two retries of dead letter %d: %v, %v; want one success and one ErrNoDeadLetter", d.ID, errs[0], errs[1])
		}
	}
	checkReadModel(t, db, store, schema)
}

// slotted is the totals read model in tables of a slot: totals_<slot>.
func slotted(schema string) func(slot string) (any, error) {
	return func(slot string) (any, error) {
		table := `"` + schema + `".totals_` + slot
		return projection.TxHandlerFunc(func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
			var n int
			fmt.Sscanf(string(e.Data), `{"n":%d}`, &n)
			_, err := tx.ExecContext(ctx, `INSERT INTO `+table+` VALUES ($1, 1, $2)
				ON CONFLICT (stream_id) DO UPDATE SET events = `+table+`.events + 1, sum = `+table+`.sum + excluded.sum`, e.StreamID, n)
			return err
		}), nil
	}
}

func rows(t *testing.T, db *sqlx.DB, table string) string {
	t.Helper()
	var out []string
	if err := db.Select(&out, `SELECT stream_id || ':' || events || ':' || sum FROM `+table+` ORDER BY stream_id`); err != nil {
		t.Fatal(err)
	}
	return strings.Join(out, " ")
}

// TestRebuildWhileAppending: a new version of the read model is built by
// replay while the live one serves and appends go on; after the switch the
// view shows the new version, both versions converge to the same rows, and a
// second rebuild produces identical rows (replay is deterministic).
func TestRebuildWhileAppending(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	store, schema := pgSetup(t, db)
	for _, slot := range []string{"a", "b", "c"} {
		testdb.Exec(t, db, `CREATE TABLE "`+schema+`".totals_`+slot+` (stream_id text PRIMARY KEY, events int NOT NULL, sum bigint NOT NULL)`)
	}
	testdb.Exec(t, db, `CREATE VIEW "`+schema+`".totals_current AS SELECT * FROM "`+schema+`".totals_a`)
	cfg := projection.RebuildConfig{
		Config:  projection.Config{Name: "totals", DB: db, Schema: schema, BatchSize: 50, LeaseRetry: 20 * time.Millisecond},
		Handler: slotted(schema),
		Switch: func(ctx context.Context, tx *sqlx.Tx, slot string) error {
			_, err := tx.ExecContext(ctx, `CREATE OR REPLACE VIEW "`+schema+`".totals_current AS SELECT * FROM "`+schema+`".totals_`+slot)
			return err
		},
	}
	live := func(slot string) *projection.Runner {
		h, _ := cfg.Handler(slot)
		c := cfg.Config
		c.Name = projection.SlotName("totals", slot)
		r, err := projection.NewRunner(store, h, c)
		if err != nil {
			t.Fatal(err)
		}
		r.Start(ctx)
		return r
	}
	a := live("a")
	defer a.Stop(ctx)
	lastAppended := appendN(t, store, "acct", 400)
	stop := make(chan struct{})
	var appends sync.WaitGroup
	appends.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			lastAppended = appendN(t, store, fmt.Sprintf("more%d", i%4), 3)
		}
	})
	var reports atomic.Int64
	cfg.Progress = func(projection.Progress) { reports.Add(1) }
	b, err := projection.Rebuild(ctx, store, cfg, "b")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop(ctx)
	if slot, err := projection.CurrentSlot(ctx, db, schema, "totals"); err != nil || slot != "b" {
		t.Fatalf("current slot %q (%v), want b", slot, err)
	}
	close(stop)
	appends.Wait()
	for _, r := range []*projection.Runner{a, b} {
		wait.Until(t, "both versions to catch up", func() bool { st, _ := r.Status(ctx); return st.Position == lastAppended })
	}
	va, vb := rows(t, db, `"`+schema+`".totals_a`), rows(t, db, `"`+schema+`".totals_b`)
	if va != vb || va == "" {
		t.Fatalf("the rebuilt version differs from the live one:\n a: %s\n b: %s", va, vb)
	}
	if view := rows(t, db, `"`+schema+`".totals_current`); view != vb {
		t.Fatal("the view does not show the rebuilt version")
	}
	c, err := projection.Rebuild(ctx, store, cfg, "c")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop(ctx)
	if vc := rows(t, db, `"`+schema+`".totals_c`); vc != vb {
		t.Fatalf("a second replay differs:\n b: %s\n c: %s", vb, vc)
	}
	if reports.Load() == 0 {
		t.Error("no progress was reported")
	}
}

// TestRebuildOfACategory: a projection fed one category finishes its rebuild
// even when the newest event of the log is in another category; a slot used
// before is refused.
func TestRebuildOfACategory(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, schema := pgSetup(t, db)
	for _, slot := range []string{"x", "y"} {
		testdb.Exec(t, db, `CREATE TABLE "`+schema+`".totals_`+slot+` (stream_id text PRIMARY KEY, events int NOT NULL, sum bigint NOT NULL)`)
	}
	appendN(t, store, "acct", 30)
	last := appendN(t, store, "other", 5) // the newest events are not in the category
	// A rebuild is done at the feed's head when it starts; the feed shows
	// the appends once older transactions on the server have ended.
	if err := eventstore.WaitForPosition(ctx, store, last); err != nil {
		t.Fatal(err)
	}
	cfg := projection.RebuildConfig{
		Config:  projection.Config{Name: "accounts", Category: "acct", DB: db, Schema: schema},
		Handler: slotted(schema),
		Switch:  func(context.Context, *sqlx.Tx, string) error { return nil },
	}
	r, err := projection.Rebuild(ctx, store, cfg, "x")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Stop(context.Background())
	if got := rows(t, db, `"`+schema+`".totals_x`); strings.Contains(got, "other") || !strings.Contains(got, "acct-0:") {
		t.Fatalf("rebuilt rows %q", got)
	}
	if _, err := projection.Rebuild(ctx, store, cfg, "x"); err == nil {
		t.Fatal("a rebuild into the current slot was accepted")
	}
}
