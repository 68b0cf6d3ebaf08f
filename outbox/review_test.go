package outbox_test

// Review tests: schedules that probe the relay's and the inboxes' guarantees
// (docs/outbox.md). A test here that fails names a bug in its comment.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/outbox"
)

// rvPublisher records every message it accepts, after an optional delay per
// Publish call; fail, when set, may refuse a call before anything is sent.
type rvPublisher struct {
	delay time.Duration
	fail  func(topic string, msgs []*message.Message) error

	mu    sync.Mutex
	got   []string // message UUIDs, duplicates included
	calls int
}

func (p *rvPublisher) Publish(topic string, msgs ...*message.Message) error {
	if p.delay > 0 {
		time.Sleep(p.delay)
	}
	if p.fail != nil {
		if err := p.fail(topic, msgs); err != nil {
			return err
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls++
	for _, m := range msgs {
		p.got = append(p.got, m.UUID)
	}
	return nil
}

func (p *rvPublisher) Close() error { return nil }

// counts returns deliveries and distinct ids.
func (p *rvPublisher) counts() (total, unique int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	seen := map[string]bool{}
	for _, id := range p.got {
		seen[id] = true
	}
	return len(p.got), len(seen)
}

// rvAppend appends n events to stream in one transaction (so a relay sees
// them in one page), waits until the feed shows them, and returns the last
// one's position.
func rvAppend(t *testing.T, store eventstore.Store, stream string, n int) eventstore.Position {
	t.Helper()
	ctx := context.Background()
	data := make([]eventstore.EventData, n)
	for i := range data {
		data[i] = eventstore.EventData{Type: "tick", Data: []byte(`{}`)}
	}
	res, err := store.Append(ctx, stream, eventstore.Any, data)
	if err != nil {
		t.Fatal(err)
	}
	if err := eventstore.WaitForPosition(ctx, store, res.LastPosition); err != nil {
		t.Fatal(err)
	}
	return res.LastPosition
}

// alternateTopics sends a stream's odd and even versions to two topics, so
// that a lane publishes each message in a Publish call of its own.
func alternateTopics(e eventstore.Event) string {
	if e.Version%2 == 0 {
		return "even"
	}
	return "odd"
}

// TestReviewPageLongerThanLeaseNeverCommits — BUG. The lease is renewed only
// at the top of the session loop (ensure), never while a page publishes. A
// page whose publishing takes longer than LeaseTTL hits errLeaseExpired
// part-way, the session renews and re-publishes the same page from its
// start, and hits the deadline again: the relay never checkpoints and
// re-sends the page's prefix forever, with no crash and no failure.
func TestReviewPageLongerThanLeaseNeverCommits(t *testing.T) {
	store := memstore.New(nil)
	pub := &rvPublisher{delay: 25 * time.Millisecond}
	rvAppend(t, store, "order-1", 10) // 10 Publish calls of 25ms: 250ms > LeaseTTL
	r, err := outbox.NewRelay(store, outbox.Config{Name: "slow", Publisher: pub, Lanes: 1, BatchSize: 10,
		LeaseTTL: 200 * time.Millisecond, TopicFor: alternateTopics})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	var st outbox.Status
	wait.Until(t, "the page of 10 to be checkpointed", func() bool {
		st, err = r.Status(context.Background())
		return err == nil && st.Published == 10
	})
	total, unique := pub.counts()
	t.Logf("checkpoint %s, published (checkpointed) %d, %d deliveries of %d events",
		st.Checkpoint, st.Published, total, unique)
	if st.Published != 10 {
		t.Errorf("the relay never checkpointed its first page (published %d, want 10)", st.Published)
	}
	if total-unique > 10 {
		t.Errorf("%d duplicates without any crash or publish failure (BatchSize 10)", total-unique)
	}
}

// TestReviewPageLongerThanHalfLeaseDuplicates — BUG, same cause on a normal
// schedule: a page starts while a bit more than half of the local lease is
// left (ensure does not renew then) and takes longer than what is left. The
// relay stops at the deadline, renews and publishes the whole page again:
// duplicates without any crash, which docs/outbox.md rules out ("a
// duplicate is possible only for the batches in flight at a crash").
func TestReviewPageLongerThanHalfLeaseDuplicates(t *testing.T) {
	store := memstore.New(nil)
	pub := &rvPublisher{delay: 10 * time.Millisecond}
	rvAppend(t, store, "order-1", 1)
	r, err := outbox.NewRelay(store, outbox.Config{Name: "half", Publisher: pub, Lanes: 1, BatchSize: 100,
		LeaseTTL: 600 * time.Millisecond, TopicFor: alternateTopics})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	runRelay(t, r) // takes the lease at once: local deadline ≈ t0+600ms
	wait.Until(t, "the first event", func() bool { _, u := pub.counts(); return u == 1 })
	// At t0+200ms, 400ms of the lease are left: more than half, so no
	// renewal before the next page, which takes 45 × 10ms = 450ms.
	time.Sleep(time.Until(t0.Add(200 * time.Millisecond)))
	rvAppend(t, store, "order-1", 45)
	wait.Until(t, "all 46 events checkpointed", func() bool {
		st, err := r.Status(context.Background())
		return err == nil && st.Published == 46
	})
	total, unique := pub.counts()
	t.Logf("%d deliveries of %d events, no crash, no failed publish", total, unique)
	if total != unique {
		t.Errorf("%d duplicates without a crash", total-unique)
	}
}

// TestReviewFailingLaneRepublishesTheOthers — BUG. Lanes publish in
// parallel and a page is retried whole when one lane fails: every retry
// re-sends what the healthy lanes had already published. While one stream's
// messages keep failing (a refused message, one topic down), duplicates grow
// with the number of retries, not with crashes.
func TestReviewFailingLaneRepublishesTheOthers(t *testing.T) {
	store := memstore.New(nil)
	const failures = 10
	var failed atomic.Int64
	pub := &rvPublisher{fail: func(_ string, msgs []*message.Message) error {
		for _, m := range msgs {
			if m.Metadata.Get(bus.KeyStreamID) == "bad-0" && failed.Load() < failures {
				failed.Add(1)
				return errors.New("broker refuses bad-0")
			}
		}
		return nil
	}}
	rvAppend(t, store, "bad-0", 1)
	for i := range 12 {
		rvAppend(t, store, streamName("ok", i), 1)
	}
	r, err := outbox.NewRelay(store, outbox.Config{Name: "lanes", Publisher: pub, Lanes: 4, BatchSize: 20,
		Backoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	wait.Until(t, "13 events checkpointed", func() bool {
		st, err := r.Status(context.Background())
		return err == nil && st.Published == 13
	})
	total, unique := pub.counts()
	t.Logf("%d failed publishes of bad-0: %d deliveries of %d events", failed.Load(), total, unique)
	if total-unique > 20 {
		t.Errorf("%d duplicates with no crash (BatchSize 20): each retry re-sent the healthy lanes", total-unique)
	}
}

// rvCountingStore counts ReadAll calls.
type rvCountingStore struct {
	eventstore.Store
	reads atomic.Int64
}

func (s *rvCountingStore) ReadAll(ctx context.Context, opts eventstore.ReadAllOpts) ([]eventstore.Event, error) {
	s.reads.Add(1)
	return s.Store.ReadAll(ctx, opts)
}

// rvStateDB opens a pool of its own for a relay's lease and checkpoint, so
// that a test can cut the relay off its state by closing it.
func rvStateDB(t *testing.T) (*sqlx.DB, string) {
	t.Helper()
	_, schema := pgSetup(t, nil) // migrates the schema (outbox_relays)
	db, err := sqlx.Open("postgres", testdb.DSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db, schema
}

// TestReviewRenewErrorSpins — BUG (load, not safety). When a renewal fails
// while the local deadline has not passed, ensure returns nil; the idle
// timer is max(until(deadline)-TTL/2, 1ms), already ≤ 0, so the session
// loops every millisecond (a failed renew plus a ReadAll each time) until
// the deadline: LeaseTTL/2 of busy looping (5s by default) against a state
// database that is failing.
func TestReviewRenewErrorSpins(t *testing.T) {
	stateDB, schema := rvStateDB(t)
	store := &rvCountingStore{Store: memstore.New(nil)}
	pub := &rvPublisher{}
	r, err := outbox.NewRelay(store, outbox.Config{Name: "spin", Publisher: pub, DB: stateDB, Schema: schema,
		LeaseTTL: 400 * time.Millisecond, LeaseRetry: 100 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	wait.Until(t, "the lease", func() bool { st, err := r.Status(context.Background()); return err == nil && st.Epoch == 1 })
	_ = stateDB.Close() // every renewal fails from now on
	before := store.reads.Load()
	time.Sleep(450 * time.Millisecond) // past the local deadline
	n := store.reads.Load() - before
	t.Logf("%d ReadAll calls in the 450ms after the state database went away (idle feed)", n)
	if n > 20 {
		t.Errorf("the idle relay read the feed %d times in 450ms: it spins while renewals fail", n)
	}
}

// TestReviewRenewErrorStopsPublishingAtLease: cut off from its state
// database, a relay keeps publishing only while its lease is valid in the
// database; after the database's lease_until has passed (when another relay
// may take over), it publishes nothing. Passes.
func TestReviewRenewErrorStopsPublishingAtLease(t *testing.T) {
	stateDB, schema := rvStateDB(t)
	shared := testdb.Open(t, "postgres")
	store := memstore.New(nil)
	pub := &rvPublisher{}
	r, err := outbox.NewRelay(store, outbox.Config{Name: "cut", Publisher: pub, DB: stateDB, Schema: schema,
		LeaseTTL: 300 * time.Millisecond, LeaseRetry: 50 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	rvAppend(t, store, "order-1", 3)
	wait.Until(t, "3 published", func() bool { _, u := pub.counts(); return u == 3 })
	_ = stateDB.Close()
	// Wait (on the database's clock) until the lease has run out there.
	wait.Until(t, "the lease to run out in the database", func() bool {
		var over bool
		testdbQuery(t, shared, `SELECT lease_until < now() FROM "`+schema+`".outbox_relays WHERE name = 'cut'`, &over)
		return over
	})
	total, _ := pub.counts()
	rvAppend(t, store, "order-1", 5)
	time.Sleep(300 * time.Millisecond)
	if after, _ := pub.counts(); after != total {
		t.Fatalf("published %d messages after its lease ran out in the database", after-total)
	}
}

// TestReviewReadStatusSingleCategoryBacklog — BUG (operations). A relay
// with one category reads the category feed, so its checkpoint stops at its
// category's last event. ReadStatus (`stele outbox status`) counts the
// backlog over the whole feed, so it reports the other categories' later
// events as a backlog that never drains and ages forever, while
// Relay.Status (which passes the category) reports 0. Relay.Status in turn
// contradicts Status.Backlog's doc ("before the relay's filters").
func TestReviewReadStatusSingleCategoryBacklog(t *testing.T) {
	ctx := context.Background()
	store, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	pub := &rvPublisher{}
	rvAppend(t, store, "order-1", 3)
	last := rvAppend(t, store, "user-1", 2)
	r, err := outbox.NewRelay(store, outbox.Config{Name: "orders", Publisher: pub, DB: db, Schema: schema,
		Categories: []string{"order"}})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	// The checkpoint moves past the other category's events in a commit of
	// its own, after the page's: wait for it, not for a fixed time.
	wait.Until(t, "the relay caught up past the other category", func() bool {
		st, err := r.Status(ctx)
		return err == nil && st.Published == 3 && st.Backlog == 0 && st.Checkpoint == last
	})
	sts, err := outbox.ReadStatus(ctx, store, db, schema, "orders")
	if err != nil {
		t.Fatal(err)
	}
	own, _ := r.Status(ctx)
	t.Logf("Relay.Status backlog %d; ReadStatus backlog %d, age %v", own.Backlog, sts[0].Backlog, sts[0].BacklogAge)
	if sts[0].Backlog != own.Backlog {
		t.Errorf("ReadStatus reports a backlog of %d for a relay that is caught up (Relay.Status: %d)", sts[0].Backlog, own.Backlog)
	}
}

// TestReviewReadStatusIgnoresFrom — BUG (operations). A relay started with
// From = Head keeps the checkpoint 0/0 in outbox_relays until it publishes
// its first page; ReadStatus does not know From and reports the whole log as
// backlog, while Relay.Status reports 0.
func TestReviewReadStatusIgnoresFrom(t *testing.T) {
	ctx := context.Background()
	store, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	rvAppend(t, store, "order-1", 5)
	head, err := store.Head(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r, err := outbox.NewRelay(store, outbox.Config{Name: "fromnow", Publisher: &rvPublisher{}, DB: db, Schema: schema, From: head})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	// The relay records From in a statement of its own, after the one that
	// took the lease: wait for both, as a status reader sees them.
	var sts []outbox.Status
	wait.Until(t, "the lease and From recorded", func() bool {
		sts, err = outbox.ReadStatus(ctx, store, db, schema, "fromnow")
		return err == nil && len(sts) == 1 && sts[0].Epoch == 1 && sts[0].Checkpoint == head
	})
	own, _ := r.Status(ctx)
	t.Logf("Relay.Status: checkpoint %s backlog %d; ReadStatus: checkpoint %s backlog %d", own.Checkpoint, own.Backlog, sts[0].Checkpoint, sts[0].Backlog)
	if sts[0].Backlog != own.Backlog {
		t.Errorf("ReadStatus reports a backlog of %d for a relay started at the head (Relay.Status: %d)", sts[0].Backlog, own.Backlog)
	}
}

// TestReviewCategoryPushdownWithTypesAndFilter: one category is read with
// the category feed; Types and Filter still apply, and each stream stays in
// order. Passes.
func TestReviewCategoryPushdownWithTypesAndFilter(t *testing.T) {
	ctx := context.Background()
	store, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	pubsub := newGoChannel(t)
	c := collect(t, pubsub, outbox.DefaultTopic)
	want := map[string]bool{}
	var last eventstore.Position
	for i := range 30 {
		stream := streamName([]string{"order", "user", "order"}[i%3], i%4)
		typ := []string{"placed", "noted"}[i%2]
		id := uuid.New()
		res, err := store.Append(ctx, stream, eventstore.Any, []eventstore.EventData{{ID: id, Type: typ, Data: []byte(`{}`)}})
		if err != nil {
			t.Fatal(err)
		}
		last = res.LastPosition
		if eventstore.Category(stream) == "order" && typ == "placed" && stream != "order-3" {
			want[id.String()] = true
		}
	}
	// Backlog counts only what the feed shows: wait until it shows all.
	if err := eventstore.WaitForPosition(ctx, store, last); err != nil {
		t.Fatal(err)
	}
	r, err := outbox.NewRelay(store, outbox.Config{Name: "pushdown", Publisher: pubsub, DB: db, Schema: schema,
		BatchSize: 3, Categories: []string{"order"}, Types: []string{"placed"},
		Filter: func(e eventstore.Event) bool { return e.StreamID != "order-3" }})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	wait.Until(t, "caught up", func() bool { st, err := r.Status(ctx); return err == nil && st.Backlog == 0 })
	got := c.deliveries()
	for _, d := range got {
		if !want[d.UUID] {
			t.Fatalf("published %s %s v%d, which the filters reject", d.Stream, d.Type, d.Version)
		}
	}
	if c.unique() != len(want) {
		t.Fatalf("published %d, want %d", c.unique(), len(want))
	}
}

// TestReviewMemoryInboxLosesReturnedMessages — BUG. Inbox refuses a handler
// that returns messages (ErrReturnedMessages): the router publishes them
// after the inbox recorded the id, and when that publish fails the
// redelivery is skipped, so they are lost. MemoryInbox marks the id done
// and hands the messages to the router anyway: the redelivery after a
// failed publish runs nothing and the output is gone.
func TestReviewMemoryInboxLosesReturnedMessages(t *testing.T) {
	in := outbox.NewMemoryInbox()
	runs := 0
	h := in.Middleware(func(msg *message.Message) ([]*message.Message, error) {
		runs++
		return []*message.Message{message.NewMessage(uuid.NewString(), []byte("out"))}, nil
	})
	msg := message.NewMessage(uuid.NewString(), nil)
	out1, err1 := h(msg)
	// The router's publish of out1 fails here, so it nacks msg; the broker
	// redelivers it.
	out2, err2 := h(msg.Copy())
	t.Logf("first delivery: %d messages, %v; redelivery: %d messages, %v; handler ran %d times", len(out1), err1, len(out2), err2, runs)
	if !errors.Is(err1, outbox.ErrReturnedMessages) && len(out2) == 0 {
		t.Errorf("the returned message is lost: the id is marked handled before the router published its output")
	}
}

// TestReviewMemoryInboxConcurrentDeliveries: many deliveries of one id at
// once, some handler runs failing: the handler succeeds exactly once and
// never runs twice at the same time, even as the inflight lock is deleted
// while others wait on it. Passes.
func TestReviewMemoryInboxConcurrentDeliveries(t *testing.T) {
	for round := range 200 {
		in := outbox.NewMemoryInbox()
		var running, succeeded, attempts atomic.Int64
		h := in.Middleware(func(*message.Message) ([]*message.Message, error) {
			if running.Add(1) != 1 {
				t.Errorf("two deliveries of one id ran the handler at once")
			}
			defer running.Add(-1)
			if attempts.Add(1)%3 == 1 { // the 1st, 4th, ... run fails
				return nil, errors.New("transient")
			}
			succeeded.Add(1)
			return nil, nil
		})
		id := uuid.NewString()
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() { _, _ = h(message.NewMessage(id, nil)) })
		}
		wg.Wait()
		// Late redeliveries after the inflight entry was removed.
		for range 3 {
			_, _ = h(message.NewMessage(id, nil))
		}
		if n := succeeded.Load(); n != 1 {
			t.Fatalf("round %d: the handler succeeded %d times for one id", round, n)
		}
	}
}

// TestReviewInboxConcurrentDeliveries: two consumers of a group get the same
// message at once. The second waits on the first's inbox row: it skips (and
// acknowledges, nil error) when the first committed, and runs when the
// first rolled back. The handler's effect is applied once. Passes.
func TestReviewInboxConcurrentDeliveries(t *testing.T) {
	_, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	testdb.Exec(t, db, `CREATE TABLE "`+schema+`".effects (id text PRIMARY KEY, n int NOT NULL)`)
	in, err := outbox.NewInbox(db, schema, "group")
	if err != nil {
		t.Fatal(err)
	}
	for _, firstFails := range []bool{false, true} {
		t.Run(fmt.Sprintf("firstFails=%v", firstFails), func(t *testing.T) {
			id := uuid.NewString()
			var runs atomic.Int64
			entered := make(chan struct{})
			h := in.Middleware(func(msg *message.Message) ([]*message.Message, error) {
				first := runs.Add(1) == 1
				tx, _ := outbox.TxFromContext(msg.Context())
				if _, err := tx.ExecContext(msg.Context(), `INSERT INTO "`+schema+`".effects VALUES ($1, 1)
					ON CONFLICT (id) DO UPDATE SET n = effects.n + 1`, msg.UUID); err != nil {
					return nil, err
				}
				if first {
					close(entered)
					time.Sleep(150 * time.Millisecond) // the second delivery arrives meanwhile
					if firstFails {
						return nil, errors.New("first delivery fails")
					}
				}
				return nil, nil
			})
			errs := make(chan error, 2)
			go func() { _, err := h(message.NewMessage(id, nil)); errs <- err }()
			<-entered
			go func() { _, err := h(message.NewMessage(id, nil)); errs <- err }()
			e1, e2 := <-errs, <-errs
			var n int
			testdbQuery(t, db, `SELECT coalesce((SELECT n FROM "`+schema+`".effects WHERE id = '`+id+`'), 0)`, &n)
			wantRuns := int64(1)
			if firstFails {
				wantRuns = 2
			}
			if n != 1 || runs.Load() != wantRuns {
				t.Fatalf("effect applied %d times, handler ran %d times (want 1, %d); errors %v, %v", n, runs.Load(), wantRuns, e1, e2)
			}
			if !firstFails && (e1 != nil || e2 != nil) {
				t.Fatalf("errors %v, %v: the skipped duplicate must be acknowledged", e1, e2)
			}
		})
	}
}
