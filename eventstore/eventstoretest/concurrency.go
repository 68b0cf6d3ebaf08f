package eventstoretest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/uuid"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/wait"
)

// testConcurrentRacers: 8 writers append to one stream with the same expected
// version, round after round. Exactly one wins each round; the others get a
// conflict that names the winner's version.
func testConcurrentRacers(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	const racers = 8
	rounds := 1000
	if testing.Short() {
		rounds = 200
	}
	type outcome struct {
		err error
		res eventstore.AppendResult
	}
	for round := 1; round <= rounds; round++ {
		var wg sync.WaitGroup
		start := make(chan struct{})
		out := make([]outcome, racers)
		for i := range racers {
			wg.Go(func() {
				<-start
				res, err := s.Append(ctx, "race-1", eventstore.Exact(eventstore.Version(round-1)), []eventstore.EventData{Ev("won", i)})
				out[i] = outcome{err, res}
			})
		}
		close(start)
		wg.Wait()
		winners := 0
		for i, o := range out {
			var ce *eventstore.ConcurrencyError
			switch {
			case o.err == nil:
				winners++
				if o.res.FirstVersion != eventstore.Version(round) {
					t.Fatalf("round %d: racer %d won at version %d", round, i, o.res.FirstVersion)
				}
			case errors.As(o.err, &ce) && errors.Is(o.err, eventstore.ErrConcurrencyConflict):
				if ce.Actual != eventstore.Version(round) {
					t.Fatalf("round %d: racer %d lost seeing version %d, want %d", round, i, ce.Actual, round)
				}
			default:
				t.Fatalf("round %d: racer %d: %v", round, i, o.err)
			}
		}
		if winners != 1 {
			t.Fatalf("round %d: %d winners, want exactly 1", round, winners)
		}
	}
	evs, err := eventstore.LoadStream(ctx, s, "race-1")
	if err != nil || len(evs) != rounds {
		t.Fatalf("stream has %d events (%v), want %d", len(evs), err, rounds)
	}
	for i, e := range evs {
		if e.Version != eventstore.Version(i+1) {
			t.Fatalf("versions not contiguous: index %d holds v%d", i, e.Version)
		}
	}
}

// testConcurrentAnyAppends: many appends to one stream with Any at once (a
// peer once reported all of 20 such appends successful while storing half).
// Every append succeeds, every event is stored once, and each result names
// the versions its own events hold.
func testConcurrentAnyAppends(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	const writers = 32
	results := make([]eventstore.AppendResult, writers)
	batches := make([][]eventstore.EventData, writers)
	var wg sync.WaitGroup
	for i := range writers {
		batches[i] = []eventstore.EventData{Ev("a", i), Ev("b", i)}
		batches[i][0].ID, batches[i][1].ID = uuid.New(), uuid.New()
		wg.Go(func() {
			var err error
			if results[i], err = s.Append(ctx, "hot-1", eventstore.Any, batches[i]); err != nil {
				t.Errorf("writer %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	evs, err := eventstore.LoadStream(ctx, s, "hot-1")
	if err != nil || len(evs) != 2*writers {
		t.Fatalf("stream holds %d events (%v), want %d", len(evs), err, 2*writers)
	}
	byVersion := map[eventstore.Version]eventstore.Event{}
	for i, e := range evs {
		if e.Version != eventstore.Version(i+1) {
			t.Fatalf("versions not contiguous: index %d holds v%d", i, e.Version)
		}
		byVersion[e.Version] = e
	}
	for i, res := range results {
		first, last := byVersion[res.FirstVersion], byVersion[res.LastVersion]
		if res.LastVersion != res.FirstVersion+1 || first.ID != batches[i][0].ID || last.ID != batches[i][1].ID {
			t.Errorf("writer %d: result %d..%d does not hold its events", i, res.FirstVersion, res.LastVersion)
		}
		// Appends that shared a commit each report their own positions.
		if res.FirstPosition != first.Position || res.LastPosition != last.Position {
			t.Errorf("writer %d: result positions %s..%s, its events are at %s..%s", i, res.FirstPosition, res.LastPosition, first.Position, last.Position)
		}
	}
}

// collector follows the feed with Subscribe and records what it sees.
type collector struct {
	mu     sync.Mutex
	events []eventstore.Event
	err    error
	cancel context.CancelFunc
	done   chan struct{}
}

func subscribe(s eventstore.Store, opts eventstore.SubscribeOpts) *collector {
	ctx, cancel := context.WithCancel(context.Background())
	c := &collector{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		err := eventstore.Subscribe(ctx, s, opts, func(_ context.Context, e eventstore.Event) error {
			c.mu.Lock()
			c.events = append(c.events, e)
			c.mu.Unlock()
			return nil
		})
		if !errors.Is(err, context.Canceled) {
			c.mu.Lock()
			c.err = err
			c.mu.Unlock()
		}
	}()
	return c
}

// waitFor waits until the collector holds n events (or fails after a deadline)
// and returns them.
func (c *collector) waitFor(t *testing.T, n int) []eventstore.Event {
	t.Helper()
	wait.Until(t, fmt.Sprintf("the subscription to deliver %d events", n), func() bool {
		c.mu.Lock()
		got, err := len(c.events), c.err
		c.mu.Unlock()
		if err != nil {
			t.Fatalf("subscription failed: %v", err)
		}
		return got >= n
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]eventstore.Event(nil), c.events...)
}

func (c *collector) stop() {
	c.cancel()
	<-c.done
}

func sameIDs(t *testing.T, name string, got, want []eventstore.Event) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s saw %d events, ReadAll returns %d", name, len(got), len(want))
	}
	for i := range got {
		if got[i].ID != want[i].ID || got[i].Position != want[i].Position {
			t.Fatalf("%s differs from ReadAll at %d: %s v%d @%s, want %s v%d @%s", name, i,
				got[i].StreamID, got[i].Version, got[i].Position, want[i].StreamID, want[i].Version, want[i].Position)
		}
	}
}

// testSubscribers: subscribers started before, during and after a burst of
// concurrent appends each see exactly what ReadAll returns, in that order.
func testSubscribers(t *testing.T, b Backend) {
	s := b.NewStore(t)
	const writers, each = 8, 40
	before := subscribe(s, eventstore.SubscribeOpts{PageSize: 7})
	defer before.stop()
	var during *collector
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				if w == 0 && i == each/2 {
					during = subscribe(s, eventstore.SubscribeOpts{PageSize: 3})
				}
				stream := fmt.Sprintf("burst-%d", w*3+i%3)
				if _, err := s.Append(context.Background(), stream, eventstore.Any, Evs("tick", 1+i%3)); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
			}
		})
	}
	wg.Wait()
	defer during.stop()
	if t.Failed() {
		return
	}
	after := subscribe(s, eventstore.SubscribeOpts{})
	defer after.stop()
	total := 0
	for i := range each {
		total += 1 + i%3
	}
	want := readAllN(t, s, eventstore.ReadAllOpts{}, writers*total)
	sameIDs(t, "subscriber started before the burst", before.waitFor(t, len(want)), want)
	sameIDs(t, "subscriber started during the burst", during.waitFor(t, len(want)), want)
	sameIDs(t, "subscriber started after the burst", after.waitFor(t, len(want)), want)
	checkStreamOrder(t, want)

	// Category subscriptions see the category's part of the same order.
	cat := subscribe(s, eventstore.SubscribeOpts{Category: "burst"})
	defer cat.stop()
	sameIDs(t, "category subscriber", cat.waitFor(t, len(want)), want)
}

// checkStreamOrder fails if any stream's versions arrive out of order or with
// a gap, or if an event arrives twice.
func checkStreamOrder(t *testing.T, evs []eventstore.Event) {
	t.Helper()
	last := map[string]eventstore.Version{}
	seen := map[uuid.UUID]bool{}
	for _, e := range evs {
		if seen[e.ID] {
			t.Fatalf("event %s (%s v%d) delivered twice", e.ID, e.StreamID, e.Version)
		}
		seen[e.ID] = true
		if e.Version != last[e.StreamID]+1 {
			t.Fatalf("%s: v%d delivered after v%d", e.StreamID, e.Version, last[e.StreamID])
		}
		last[e.StreamID] = e.Version
	}
}

// testOutOfOrderCommits: transactions append, interleaved, then commit in
// another order, and one rolls back, while plain appends go on beside them and
// a subscriber follows the feed. Every committed event is delivered exactly
// once, each stream in version order, and nothing rolled back appears.
func testOutOfOrderCommits(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	sub := subscribe(s, eventstore.SubscribeOpts{PageSize: 5})
	defer sub.stop()
	rng := rand.New(rand.NewPCG(1, 2))
	iterations := 40
	if testing.Short() {
		iterations = 10
	}
	committed := map[uuid.UUID]bool{}
	rolledBack := map[uuid.UUID]bool{}
	var bgMu sync.Mutex
	bgStop := make(chan struct{})
	var bg sync.WaitGroup
	bg.Go(func() { // plain appends running beside the transactions
		for i := 0; ; i++ {
			select {
			case <-bgStop:
				return
			default:
			}
			res, err := s.Append(ctx, fmt.Sprintf("plain-%d", i%4), eventstore.Any, Evs("plain", 1))
			if err != nil {
				t.Errorf("plain append: %v", err)
				return
			}
			evs, _ := s.ReadStream(ctx, res.StreamID, eventstore.ReadStreamOpts{From: res.FirstVersion, Limit: 1})
			bgMu.Lock()
			for _, e := range evs {
				committed[e.ID] = true
			}
			bgMu.Unlock()
		}
	})
	for it := range iterations {
		const ntx = 4
		txs := make([]Tx, ntx)
		ids := make([][]uuid.UUID, ntx)
		for i := range txs {
			txs[i] = b.Begin(t, s)
		}
		// Each transaction owns different streams in this iteration, so none
		// waits for another's lock; their appends interleave at random.
		streams := rng.Perm(12)
		for step := range 3 * ntx {
			i := rng.IntN(ntx)
			stream := fmt.Sprintf("ooo-%d", streams[i*3+step%3])
			ev := Ev("ooo", it)
			ev.ID = uuid.New()
			if _, err := txs[i].Append(ctx, stream, eventstore.Any, []eventstore.EventData{ev}); err != nil {
				if eventstore.IsRetryable(err) {
					continue // the per-stream guard refused; nothing was written
				}
				t.Fatalf("iteration %d: tx %d append: %v", it, i, err)
			}
			ids[i] = append(ids[i], ev.ID)
		}
		rollback := rng.IntN(ntx)
		for _, i := range rng.Perm(ntx) {
			if i == rollback {
				if err := txs[i].Rollback(); err != nil {
					t.Fatal(err)
				}
				bgMu.Lock()
				for _, id := range ids[i] {
					rolledBack[id] = true
				}
				bgMu.Unlock()
				continue
			}
			if err := txs[i].Commit(); err != nil {
				t.Fatalf("iteration %d: commit tx %d: %v", it, i, err)
			}
			bgMu.Lock()
			for _, id := range ids[i] {
				committed[id] = true
			}
			bgMu.Unlock()
		}
	}
	close(bgStop)
	bg.Wait()
	want := readAllN(t, s, eventstore.ReadAllOpts{}, len(committed))
	got := sub.waitFor(t, len(committed))
	sameIDs(t, "subscriber", got, want)
	checkStreamOrder(t, got)
	for _, e := range got {
		if rolledBack[e.ID] {
			t.Fatalf("rolled-back event %s (%s) was delivered", e.ID, e.StreamID)
		}
		if !committed[e.ID] {
			t.Fatalf("unknown event %s delivered", e.ID)
		}
	}
}

// testPerStreamInversion: a transaction that took its id early (by writing
// another stream) appends to a stream after a newer transaction did. If the
// store accepted it, the feed (ordered by transaction id) would show the
// newer version first. The store must refuse it as retryable, or else the feed
// must still show the stream in version order.
func testPerStreamInversion(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	old := b.Begin(t, s)
	if _, err := old.Append(ctx, "side-1", eventstore.Any, Evs("side", 1)); err != nil {
		t.Fatal(err)
	}
	newer := b.Begin(t, s)
	if _, err := newer.Append(ctx, "hot-1", eventstore.Any, Evs("v1", 1)); err != nil {
		t.Fatal(err)
	}
	if err := newer.Commit(); err != nil {
		t.Fatal(err)
	}
	_, err := old.Append(ctx, "hot-1", eventstore.Any, Evs("v2", 1))
	total := 3
	switch {
	case err == nil:
		if err := old.Commit(); err != nil {
			t.Fatal(err)
		}
	case eventstore.IsRetryable(err):
		if err := old.Rollback(); err != nil {
			t.Fatal(err)
		}
		total = 2
		// Plain Append retries by itself.
		if _, err := s.Append(ctx, "hot-1", eventstore.Any, Evs("v2", 1)); err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("late append from an older transaction: %v", err)
	}
	all := readAllN(t, s, eventstore.ReadAllOpts{}, total)
	var hot []eventstore.Event
	for _, e := range all {
		if e.StreamID == "hot-1" {
			hot = append(hot, e)
		}
	}
	if versions(hot) != "1 2" {
		t.Fatalf("feed shows hot-1 as %s, want 1 2", versions(hot))
	}
}

// testEarlyXIDStress: many transactions take their ids early, then race to
// append to one hot stream while a subscriber follows. The hot stream must
// arrive in version order every time.
func testEarlyXIDStress(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	sub := subscribe(s, eventstore.SubscribeOpts{})
	defer sub.stop()
	const workers = 4
	each := 60
	if testing.Short() {
		each = 20
	}
	var wg sync.WaitGroup
	var refused atomic.Int64
	for w := range workers {
		wg.Go(func() {
			for i := 0; i < each; {
				tx := b.Begin(t, s)
				if _, err := tx.Append(ctx, fmt.Sprintf("own-%d", w), eventstore.Any, Evs("own", 1)); err != nil {
					_ = tx.Rollback()
					t.Errorf("worker %d: %v", w, err)
					return
				}
				_, err := tx.Append(ctx, "hot-1", eventstore.Any, []eventstore.EventData{Ev("hot", i)})
				if eventstore.IsRetryable(err) {
					refused.Add(1)
					_ = tx.Rollback()
					continue
				}
				if err != nil {
					_ = tx.Rollback()
					t.Errorf("worker %d: %v", w, err)
					return
				}
				if err := tx.Commit(); err != nil {
					t.Errorf("worker %d commit: %v", w, err)
					return
				}
				i++
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	t.Logf("%d appends refused by the per-stream order guard and retried", refused.Load())
	got := sub.waitFor(t, 2*workers*each)
	checkStreamOrder(t, got)
	sameIDs(t, "subscriber", got, readAllN(t, s, eventstore.ReadAllOpts{}, len(got)))
}
