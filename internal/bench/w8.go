package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/saga"
)

// W8's settings.
const (
	DefaultW8Sagas     = 10_000
	DefaultSagaWorkers = 64 // saga.Config.Workers
	W8Writers          = 8  // appending the starting events
	w8FailEvery        = 10 // saga n fails at step 3 and compensates when n % 10 == 0
	w8Definition       = "bench_w8"
	w8StartedBy        = "OrderPlaced"
	w8StreamPrefix     = "w8order"
	w8Stall            = 60 * time.Second // no saga ending for this long fails the run
)

// doomedPayload is Payload with another status, same length: the order whose
// saga fails at its third step.
var doomedPayload = []byte(strings.Replace(string(Payload), `"status":"placed"`, `"status":"doomed"`, 1))

// w8Saga is the W8 definition: reserve, charge and ship, each a local,
// idempotent action; the first two have compensations. Ship fails for good
// on a doomed order, so reserve and charge are undone.
func w8Saga() saga.Definition {
	var effects sync.Map // idempotency key → done: each effect happens once
	do := func(ctx context.Context, sc saga.StepContext) ([]byte, error) {
		effects.LoadOrStore(sc.Key, true)
		return nil, nil
	}
	ship := func(ctx context.Context, sc saga.StepContext) ([]byte, error) {
		var order struct {
			Status string `json:"status"`
		}
		if err := json.Unmarshal(sc.Input, &order); err != nil {
			return nil, bus.Permanent(err)
		}
		if order.Status == "doomed" {
			return nil, bus.Permanent(errors.New("no courier"))
		}
		return do(ctx, sc)
	}
	return saga.Definition{
		Name: w8Definition, StartedBy: w8StartedBy, Category: w8StreamPrefix,
		Steps: []saga.Step{
			{Name: "reserve", Action: saga.Do(do), Compensation: saga.Do(do)},
			{Name: "charge", Action: saga.Do(do), Compensation: saga.Do(do)},
			{Name: "ship", Action: saga.Do(ship)},
		},
	}
}

// w8tail follows the sagas' category in the feed and notes when each saga
// started and ended (their events' RecordedAt).
type w8tail struct {
	total   int
	started map[string]time.Time
	ended   map[string]time.Time
	endType map[string]string
	events  int
	lastEnd time.Time // when the tail saw the last saga end
	ends    atomic.Int64
	done    chan struct{}
	err     error
}

func (t *w8tail) run(ctx context.Context, store eventstore.Store) {
	defer close(t.done)
	read := eventstore.ReadAllOpts{Category: saga.Category(w8Definition), Limit: 1000}
	for {
		wake := store.WaitForAppend()
		page, err := store.ReadAll(ctx, read)
		if err != nil {
			t.err = err
			return
		}
		now := time.Now()
		for _, e := range page {
			t.events++
			switch e.Type {
			case saga.TypeStarted:
				t.started[e.StreamID] = e.RecordedAt
			case saga.TypeCompleted, saga.TypeCompensated, saga.TypeNeedsAttention:
				if _, ok := t.ended[e.StreamID]; !ok {
					t.ended[e.StreamID], t.endType[e.StreamID] = e.RecordedAt, e.Type
					t.ends.Add(1)
				}
			}
		}
		if len(page) > 0 {
			read.After = page[len(page)-1].Position
		}
		if len(t.ended) == t.total {
			t.lastEnd = now
			return
		}
		if len(page) == read.Limit {
			continue
		}
		// Every append wakes the tail: read at most every 5 ms, so that it
		// does not compete with the sagas for the database.
		pause := time.NewTimer(5 * time.Millisecond)
		select {
		case <-ctx.Done():
			pause.Stop()
			return
		case <-pause.C:
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		}
	}
}

// sagas (W8): a saga runner for w8Saga, then total starting events appended
// by 8 writers (one event per stream and append), one in ten of them doomed.
// It times the sagas from the first starting append to the last saga's end,
// and each saga from its saga.started to its completed or compensated event
// (their RecordedAt, on the store's clock). Every saga must end as expected:
// completed, or compensated with both compensations done.
func sagas(ctx context.Context, store eventstore.Store, db DB, total int, opts Options) (Result, error) {
	opts = opts.withDefaults()
	runner, err := saga.NewRunner(store, w8Saga(), saga.Config{DB: db.DB, Schema: db.Schema, Workers: opts.SagaWorkers, Logger: opts.Logger})
	if err != nil {
		return Result{}, err
	}
	if err := runner.Start(ctx); err != nil {
		return Result{}, err
	}
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		return runner.Stop(sctx)
	}
	defer stop()

	tailCtx, stopTail := context.WithCancel(ctx)
	defer stopTail()
	tail := &w8tail{total: total, started: map[string]time.Time{}, ended: map[string]time.Time{}, endType: map[string]string{}, done: make(chan struct{})}
	go tail.run(tailCtx, store)
	defer func() { stopTail(); <-tail.done }()

	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, W8Writers)
	for w := range W8Writers {
		wg.Go(func() {
			for n := w; n < total; n += W8Writers {
				data := Payload
				if n%w8FailEvery == 0 {
					data = doomedPayload
				}
				if _, err := store.Append(ctx, w8StreamPrefix+"-"+strconv.Itoa(n), eventstore.NoStream,
					[]eventstore.EventData{{Type: w8StartedBy, Data: data, Metadata: Meta}}); err != nil {
					errs[w] = fmt.Errorf("writer %d: %w", w, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return Result{}, err
	}

	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last, lastChange := int64(-1), time.Now()
wait:
	for {
		select {
		case <-tail.done:
			if tail.err != nil {
				return Result{}, fmt.Errorf("bench: W8 following the sagas: %w", tail.err)
			}
			if err := ctx.Err(); err != nil {
				return Result{}, err
			}
			break wait
		case <-tick.C:
			if err := runner.Err(); err != nil {
				return Result{}, fmt.Errorf("bench: W8 saga runner: %w", err)
			}
			if p := tail.ends.Load(); p != last {
				last, lastChange = p, time.Now()
			} else if time.Since(lastChange) > w8Stall {
				return Result{}, fmt.Errorf("bench: W8: %d of %d sagas ended, none for %s", p, total, w8Stall)
			}
		}
	}
	elapsed := tail.lastEnd.Sub(start)
	if err := stop(); err != nil {
		return Result{}, fmt.Errorf("bench: W8 stopping the runner: %w", err)
	}

	// Every saga ended as its order says, as saga.List reads them back.
	list, err := saga.List(ctx, store, w8Definition, "")
	if err != nil {
		return Result{}, err
	}
	if len(list) != total {
		return Result{}, fmt.Errorf("bench: W8: %d sagas, want %d", len(list), total)
	}
	completed, compensated := 0, 0
	for _, in := range list {
		n, err := strconv.Atoi(strings.TrimPrefix(in.ID, w8StreamPrefix+"-"))
		if err != nil {
			return Result{}, fmt.Errorf("bench: W8: unexpected saga %q", in.ID)
		}
		want := saga.Completed
		if n%w8FailEvery == 0 {
			want = saga.Compensated
		}
		if in.Status != want || (want == saga.Compensated && !(in.Compensated[0] && in.Compensated[1])) {
			return Result{}, fmt.Errorf("bench: W8: saga %s is %s (compensated steps %v, reason %q), want %s", in.ID, in.Status, in.Compensated, in.FailedReason, want)
		}
		if want == saga.Completed {
			completed++
		} else {
			compensated++
		}
	}

	durations := make([]time.Duration, 0, total)
	for stream, end := range tail.ended {
		begin, ok := tail.started[stream]
		if !ok {
			return Result{}, fmt.Errorf("bench: W8: saga stream %s ended without a saga.started", stream)
		}
		durations = append(durations, end.Sub(begin))
	}
	slices.Sort(durations)
	var firstStart, lastStart time.Time
	for _, at := range tail.started {
		if firstStart.IsZero() || at.Before(firstStart) {
			firstStart = at
		}
		if at.After(lastStart) {
			lastStart = at
		}
	}
	events := tail.events + total // the sagas' own events and the starting ones
	return Result{
		Workload: "W8", Events: events, Seconds: elapsed.Seconds(),
		EventsPerSec: float64(events) / elapsed.Seconds(),
		P50ms:        ms(percentile(durations, 0.50)), P99ms: ms(percentile(durations, 0.99)),
		PeakRSSMB: peakRSSMB(),
		W8Result: &W8Result{Sagas: total, SagasPerSec: float64(total) / elapsed.Seconds(), Completed: completed,
			Compensated: compensated, SagaWorkers: opts.SagaWorkers, StartWriters: W8Writers,
			StartSpanSeconds: lastStart.Sub(firstStart).Seconds()},
	}, nil
}
