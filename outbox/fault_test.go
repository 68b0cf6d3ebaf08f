package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/outbox"
)

// appender writes events to a few streams, some of them in transactions it
// rolls back, and remembers which event ids committed.
type appender struct {
	pause      time.Duration // between appends
	mu         sync.Mutex
	committed  map[string]bool
	rolledBack map[string]bool
}

func (a *appender) run(t *testing.T, ctx context.Context, store *pgstore.Store, db *sqlx.DB, prefix string, n int, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	for i := range n {
		time.Sleep(a.pause)
		id := uuid.New()
		stream := streamName(prefix, rng.IntN(10))
		data := []eventstore.EventData{{ID: id, Type: "tick", Data: fmt.Appendf(nil, `{"i":%d}`, i)}}
		if rng.IntN(4) == 0 { // inside a transaction that is rolled back
			tx, err := db.BeginTxx(ctx, nil)
			if err != nil {
				t.Error(err)
				return
			}
			_, err = store.AppendTx(ctx, tx, stream, eventstore.Any, data)
			_ = tx.Rollback()
			if err != nil {
				t.Error(err)
				return
			}
			a.mu.Lock()
			a.rolledBack[id.String()] = true
			a.mu.Unlock()
			continue
		}
		if _, err := store.Append(ctx, stream, eventstore.Any, data); err != nil {
			t.Error(err)
			return
		}
		a.mu.Lock()
		a.committed[id.String()] = true
		a.mu.Unlock()
	}
}

// inboxConsumer applies each message's effect through the PostgreSQL inbox:
// an effects row per event id whose counter would exceed 1 if a duplicate
// ever got past the inbox.
type inboxConsumer struct {
	raw    atomic.Int64
	handle message.HandlerFunc
}

func newInboxConsumer(t *testing.T, db *sqlx.DB, schema string) *inboxConsumer {
	t.Helper()
	testdb.Exec(t, db, `CREATE TABLE "`+schema+`".effects (event_id text PRIMARY KEY, applied int NOT NULL)`)
	in, err := outbox.NewInbox(db, schema, "effects")
	if err != nil {
		t.Fatal(err)
	}
	return &inboxConsumer{handle: in.Middleware(func(msg *message.Message) ([]*message.Message, error) {
		tx, ok := outbox.TxFromContext(msg.Context())
		if !ok {
			return nil, errors.New("no inbox transaction")
		}
		_, err := tx.ExecContext(msg.Context(), `INSERT INTO "`+schema+`".effects VALUES ($1, 1)
			ON CONFLICT (event_id) DO UPDATE SET applied = effects.applied + 1`, msg.UUID)
		return nil, err
	})}
}

func (c *inboxConsumer) consume(t *testing.T, sub message.Subscriber, topic string) {
	ctx, cancel := context.WithCancel(context.Background())
	msgs, err := sub.Subscribe(ctx, topic)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m := range msgs {
			c.raw.Add(1)
			if _, err := c.handle(m); err != nil {
				m.Nack()
				continue
			}
			m.Ack()
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
}

// TestRelayCrashesBetweenPublishAndCheckpoint kills the relay again and
// again while events are appended: sometimes right after a batch was
// published and before its checkpoint (a crash: the lease stays held until
// it runs out), sometimes by cancelling it at a random moment. Nothing
// committed is lost, nothing rolled back is published, duplicates stay under
// crashes × batch size, and the inbox leaves every effect applied once.
func TestRelayCrashesBetweenPublishAndCheckpoint(t *testing.T) {
	store, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	pubsub := newGoChannel(t)
	consumer := newInboxConsumer(t, db, schema)
	consumer.consume(t, pubsub, outbox.DefaultTopic)
	raw := collect(t, pubsub, outbox.DefaultTopic) // sees every delivery, duplicates included

	const batch = 20
	perAppender := 300
	if testing.Short() {
		perAppender = 100
	}
	ctx := context.Background()
	app := &appender{committed: map[string]bool{}, rolledBack: map[string]bool{}}
	var appenders sync.WaitGroup
	for i := range 2 {
		appenders.Go(func() { app.run(t, ctx, store, db, fmt.Sprintf("crash%d", i), perAppender, uint64(i)) })
	}
	appendersDone := make(chan struct{})
	go func() { appenders.Wait(); close(appendersDone) }()

	rng := rand.New(rand.NewPCG(42, 1))
	crashes, kills := 0, 0
	caughtUp := func() bool {
		select {
		case <-appendersDone:
		default:
			return false
		}
		app.mu.Lock()
		want := len(app.committed)
		app.mu.Unlock()
		return raw.unique() == want
	}
	for round := 0; !caughtUp() || round < 20; round++ {
		if round > 500 {
			t.Fatalf("no progress after %d relay restarts", round)
		}
		r, err := outbox.NewRelay(store, outbox.Config{Name: "crashy", Publisher: pubsub, DB: db, Schema: schema,
			BatchSize: batch, LeaseTTL: 150 * time.Millisecond, LeaseRetry: 10 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		crashAt := rng.IntN(4) // crash after this many checkpoints, or
		kill := rng.IntN(3) == 0
		commits := 0
		outbox.SetHooks(r, func() error {
			if commits++; !kill && commits > crashAt {
				return errors.New("killed between publish and checkpoint")
			}
			return nil
		}, nil)
		runCtx, cancel := context.WithCancel(ctx)
		life := 300 * time.Millisecond // a relay with nothing left to crash on is stopped
		if kill {
			life = time.Duration(5+rng.IntN(40)) * time.Millisecond
		}
		time.AfterFunc(life, cancel)
		err = r.Run(runCtx)
		cancel()
		switch {
		case errors.Is(err, outbox.ErrCrash):
			crashes++
		case errors.Is(err, context.Canceled):
			kills++
		default:
			t.Fatalf("relay ended with %v", err)
		}
	}
	// A last, healthy relay catches up with everything.
	r, err := outbox.NewRelay(store, outbox.Config{Name: "crashy", Publisher: pubsub, DB: db, Schema: schema,
		BatchSize: batch, LeaseTTL: 150 * time.Millisecond, LeaseRetry: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	wait.Until(t, "the relay's backlog drained", func() bool { st, err := r.Status(ctx); return err == nil && st.Backlog == 0 })

	app.mu.Lock()
	defer app.mu.Unlock()
	got := raw.deliveries()
	seen := map[string]bool{}
	for _, d := range got {
		if app.rolledBack[d.UUID] {
			t.Fatalf("published %s from a rolled-back transaction", d.UUID)
		}
		if !app.committed[d.UUID] {
			t.Fatalf("published %s, which nobody appended", d.UUID)
		}
		seen[d.UUID] = true
	}
	lost := 0
	for id := range app.committed {
		if !seen[id] {
			lost++
		}
	}
	dups := len(got) - len(seen)
	t.Logf("%d committed, %d rolled back, %d crashes, %d kills, %d deliveries, %d duplicates", len(app.committed),
		len(app.rolledBack), crashes, kills, len(got), dups)
	if lost != 0 {
		t.Fatalf("%d committed events never published", lost)
	}
	if crashes == 0 || kills == 0 {
		t.Fatalf("the test did not exercise both crashes (%d) and kills (%d)", crashes, kills)
	}
	if dups > (crashes+kills)*batch {
		t.Fatalf("%d duplicates after %d crashes and %d kills, want at most one batch (%d) each", dups, crashes, kills, batch)
	}
	checkStreamOrder(t, got)

	var effects, overApplied, inbox int
	testdbQuery(t, db, `SELECT count(*), count(*) FILTER (WHERE applied > 1) FROM "`+schema+`".effects`, &effects, &overApplied)
	testdbQuery(t, db, `SELECT count(*) FROM "`+schema+`".inbox WHERE consumer = 'effects'`, &inbox)
	wait.Until(t, "the consumer to apply every event", func() bool {
		testdbQuery(t, db, `SELECT count(*), count(*) FILTER (WHERE applied > 1) FROM "`+schema+`".effects`, &effects, &overApplied)
		return effects == len(app.committed)
	})
	if overApplied != 0 {
		t.Fatalf("%d effects applied more than once behind the inbox", overApplied)
	}
	if consumer.raw.Load() < int64(len(got)) {
		t.Fatalf("the inbox consumer saw %d messages, the raw collector %d", consumer.raw.Load(), len(got))
	}
}

func testdbQuery(t *testing.T, db *sqlx.DB, q string, dest ...any) {
	t.Helper()
	if err := db.QueryRowContext(context.Background(), q).Scan(dest...); err != nil {
		t.Fatal(err)
	}
}

// countingPublisher counts what passes through it once armed.
type countingPublisher struct {
	message.Publisher
	armed atomic.Bool
	after atomic.Int64
}

func (p *countingPublisher) Publish(topic string, msgs ...*message.Message) error {
	if p.armed.Load() {
		p.after.Add(int64(len(msgs)))
	}
	return p.Publisher.Publish(topic, msgs...)
}

// TestPausedRelayPublishesNothingAfterTakeover: relay A stops (as a stopped
// process or a long GC pause would) just before publishing; its lease runs
// out and relay B takes over. When A wakes up it publishes nothing more and
// cannot move the checkpoint: it goes back to waiting for the lease.
func TestPausedRelayPublishesNothingAfterTakeover(t *testing.T) {
	ctx := context.Background()
	store, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	pubsub := newGoChannel(t)
	c := collect(t, pubsub, outbox.DefaultTopic)
	appendN := func(n int) {
		for i := range n {
			if _, err := store.Append(ctx, streamName("paused", i%5), eventstore.Any,
				[]eventstore.EventData{{Type: "tick", Data: []byte(`{}`)}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// B renews its lease when half of it is left; the other half must cover
	// a slow renewal on a loaded machine, or A (waiting for the lease once
	// awake) takes it back legitimately and the test sees A publish.
	cfg := outbox.Config{Name: "fenced", DB: db, Schema: schema, BatchSize: 10, Lanes: 1,
		LeaseTTL: 2 * time.Second, LeaseRetry: 10 * time.Millisecond}

	pubA := &countingPublisher{Publisher: pubsub}
	cfgA := cfg
	cfgA.Publisher, cfgA.Owner = pubA, "relay-a"
	a, err := outbox.NewRelay(store, cfgA)
	if err != nil {
		t.Fatal(err)
	}
	paused, resume := make(chan struct{}), make(chan struct{})
	var publishes atomic.Int64
	outbox.SetHooks(a, nil, func() {
		if publishes.Add(1) == 3 { // the third publish call stops before sending
			close(paused)
			<-resume
		}
	})
	appendN(30) // A publishes two batches and stops before the third
	runRelay(t, a)
	<-paused

	cfgB := cfg
	cfgB.Publisher, cfgB.Owner = pubsub, "relay-b"
	b, err := outbox.NewRelay(store, cfgB)
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, b)
	wait.Until(t, "relay B to take over and publish the third batch", func() bool {
		st, err := b.Status(ctx)
		return err == nil && st.Owner == "relay-b" && st.Epoch == 2 && st.Backlog == 0 && c.unique() == 30
	})
	pubA.armed.Store(true)
	close(resume) // A wakes up, well past its lease
	appendN(20)
	wait.Until(t, "relay B to publish the next 20", func() bool {
		st, err := b.Status(ctx)
		return err == nil && st.Backlog == 0 && c.unique() == 50
	})
	if n := pubA.after.Load(); n != 0 {
		t.Fatalf("relay A published %d messages after losing its lease", n)
	}
	st, err := b.Status(ctx)
	if err != nil || st.Owner != "relay-b" || st.Epoch != 2 {
		t.Fatalf("after A woke up the lease is %+v (%v), want B's epoch 2", st, err)
	}
	checkStreamOrder(t, c.deliveries())
}
