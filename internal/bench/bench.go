// Package bench runs the standard workloads W1–W8 of ../shared/BENCHMARK.md
// against any eventstore.Store. `stele bench` is its command line.
package bench

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stele-dev/stele/eventstore"
)

// Payload is the 200-byte JSON document every workload appends, the same
// as the raw-limit reference (bench/sql/raw-w1.sql).
var Payload = []byte(`{"orderId":"ord-0000000001","customerId":"cust-000001","amount":37,"currency":"EUR","sku":"SKU-1","qty":2,"status":"placed","note":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}`)

// Meta is the ~60 bytes of metadata every event carries.
var Meta = eventstore.Metadata{CorrelationID: "0123456789abcdef0123456789abcdef", Keys: map[string]string{"source": "bench"}}

// Result is one workload's figures; it marshals to the JSON line of the
// output contract.
type Result struct {
	last eventstore.Position // the furthest position written, for waiting on the feed

	Workload     string  `json:"workload"`
	Store        string  `json:"store"`
	GroupCommit  bool    `json:"group_commit"`
	Events       int     `json:"events"`
	Seconds      float64 `json:"seconds"`
	EventsPerSec float64 `json:"events_per_sec"`
	P50ms        float64 `json:"p50_ms"`
	P99ms        float64 `json:"p99_ms"`
	PeakRSSMB    float64 `json:"peak_rss_mb"`

	// W7's and W8's own figures, flattened into the JSON line; nil (and
	// absent) for the other workloads.
	*W7Result
	*W8Result
}

// W7Result is what W7 reports beside Result's figures, where Events is the
// messages delivered, EventsPerSec the delivered msgs/s (from the first
// append to the last message consumed) and P50ms/P99ms the append-to-
// consume latency (consume time minus the message's recorded_at).
type W7Result struct {
	Bus        string  `json:"bus"`
	MsgsPerSec float64 `json:"msgs_per_sec"`
	Delivered  int     `json:"delivered"`  // distinct event ids consumed: always Events
	Duplicates int     `json:"duplicates"` // messages consumed again (at-least-once); over runs, the most
	// PollIntervalMs is the PostgreSQL bus subscriber's poll interval.
	PollIntervalMs float64 `json:"poll_interval_ms,omitempty"`
	// AppendSeconds is how long the writers took to append everything.
	AppendSeconds float64 `json:"append_seconds"`
	// AppendRate is the writers' pace in events/s in all; 0: unpaced (the
	// standard W7).
	AppendRate  float64 `json:"append_rate,omitempty"`
	Writers     int     `json:"writers"`
	AppendBatch int     `json:"append_batch"` // events per append
	RelayBatch  int     `json:"relay_batch"`  // outbox.Config.BatchSize
	RelayLanes  int     `json:"relay_lanes"`  // outbox.Config.Lanes
}

// W8Result is what W8 reports beside Result's figures, where Events is every
// event appended (starting events and the sagas' own), Seconds runs from the
// first starting append to the last saga's end, and P50ms/P99ms are saga
// durations (saga.started to completed or compensated).
type W8Result struct {
	Sagas        int     `json:"sagas"`
	SagasPerSec  float64 `json:"sagas_per_sec"`
	Completed    int     `json:"completed"`
	Compensated  int     `json:"compensated"`
	SagaWorkers  int     `json:"saga_workers"`  // saga.Config.Workers
	StartWriters int     `json:"start_writers"` // writers appending the starting events
	// StartSpanSeconds runs from the first saga.started to the last (the
	// runner appends them as its projection reads the starting events).
	StartSpanSeconds float64 `json:"start_span_seconds"`
}

// Workloads lists the workloads in the order `--workload all` runs them.
var Workloads = []string{"W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8"}

// Run runs one workload on store, which must be empty, with the default
// Options. scale shrinks or grows the event counts (0.1 for a smoke run).
// db holds W5's and W6's read model, W7's relay checkpoint and PostgreSQL bus
// tables, W8's runner checkpoint (the store's schema); zero for the
// in-memory store.
func Run(ctx context.Context, store eventstore.Store, db DB, workload string, scale float64) (Result, error) {
	return RunWith(ctx, store, db, workload, scale, Options{})
}

// RunWith is Run with W7's and W8's Options (W7 runs over one bus, opts.Bus).
func RunWith(ctx context.Context, store eventstore.Store, db DB, workload string, scale float64, opts Options) (Result, error) {
	n := func(x int) int { return max(1, int(float64(x)*scale)) }
	switch strings.ToUpper(workload) {
	case "W1":
		return writers(ctx, store, "W1", "order", 8, 1, n(80_000))
	case "W2":
		return writers(ctx, store, "W2", "batch", 8, 10, n(100_000))
	case "W3":
		return readAll(ctx, store, n(180_000))
	case "W4":
		return loadStream(ctx, store, 1000, 20)
	case "W5":
		return rebuild(ctx, store, db, n(1_000_000))
	case "W6":
		return liveLatency(ctx, store, db, n(80_000))
	case "W7":
		return outboxRelay(ctx, store, db, n(DefaultW7Events), opts)
	case "W8":
		return sagas(ctx, store, db, n(DefaultW8Sagas), opts)
	}
	return Result{}, fmt.Errorf("bench: unknown workload %q (want W1 to W8)", workload)
}

func events(k int) []eventstore.EventData {
	out := make([]eventstore.EventData, k)
	for i := range out {
		out[i] = eventstore.EventData{Type: "OrderPlaced", Data: Payload, Metadata: Meta}
	}
	return out
}

// writers: 8 writers; writer i appends to streams i, i+8, i+16, ... of 1,000
// in turn, perEvent events per append with an exact expected version, until
// total events are written. No two writers share a stream.
func writers(ctx context.Context, store eventstore.Store, name, prefix string, nWriters, perAppend, total int) (Result, error) {
	return writersHook(ctx, store, name, prefix, nWriters, perAppend, total, nil)
}

// writersHook is writers, calling appended (if set) with each append's last
// position as soon as it returns.
func writersHook(ctx context.Context, store eventstore.Store, name, prefix string, nWriters, perAppend, total int, appended func(eventstore.Position)) (Result, error) {
	const streams = 1000
	appendsPerWriter := max(1, total/perAppend/nWriters)
	lat := make([][]time.Duration, nWriters)
	errs := make([]error, nWriters)
	lasts := make([]eventstore.Position, nWriters)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range nWriters {
		wg.Go(func() {
			mine := streams / nWriters
			versions := make([]eventstore.Version, mine)
			lat[w] = make([]time.Duration, 0, appendsPerWriter)
			for i := range appendsPerWriter {
				k := i % mine
				id := prefix + "-" + strconv.Itoa(w+nWriters*k)
				t0 := time.Now()
				res, err := store.Append(ctx, id, eventstore.Exact(versions[k]), events(perAppend))
				if err != nil {
					errs[w] = fmt.Errorf("writer %d: %w", w, err)
					return
				}
				lat[w] = append(lat[w], time.Since(t0))
				if appended != nil {
					appended(res.LastPosition)
				}
				versions[k] = res.LastVersion
				if lasts[w].Less(res.LastPosition) {
					lasts[w] = res.LastPosition
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	for _, err := range errs {
		if err != nil {
			return Result{}, err
		}
	}
	all := slices.Concat(lat...)
	slices.Sort(all)
	written := appendsPerWriter * nWriters * perAppend
	last := slices.MaxFunc(lasts, func(a, b eventstore.Position) int {
		if a.Less(b) {
			return -1
		}
		if b.Less(a) {
			return 1
		}
		return 0
	})
	return Result{
		last:     last,
		Workload: name, Events: written, Seconds: elapsed.Seconds(),
		EventsPerSec: float64(written) / elapsed.Seconds(),
		P50ms:        ms(percentile(all, 0.50)), P99ms: ms(percentile(all, 0.99)),
		PeakRSSMB: peakRSSMB(),
	}, nil
}

// Seed appends about total events (rounded down to whole batches) in
// batches of 100 over 1,000 streams with 8 writers, as fast as the store
// takes them, and returns how many it wrote. It is set-up, not measured.
func Seed(ctx context.Context, store eventstore.Store, prefix string, total int) (int, error) {
	res, err := writers(ctx, store, "seed", prefix, 8, min(100, total), total)
	if err != nil {
		return 0, err
	}
	// The feed shows them once every older transaction on the server ended.
	return res.Events, eventstore.WaitForPosition(ctx, store, res.last)
}

// readAll reads the whole log from the start in global order, after seeding
// it with at least total events.
func readAll(ctx context.Context, store eventstore.Store, total int) (Result, error) {
	seeded, err := Seed(ctx, store, "seed", total)
	if err != nil {
		return Result{}, err
	}
	start := time.Now()
	read := 0
	for _, err := range eventstore.IterAll(ctx, store, eventstore.ReadAllOpts{Limit: 1000}) {
		if err != nil {
			return Result{}, err
		}
		read++
	}
	elapsed := time.Since(start)
	if read != seeded {
		return Result{}, fmt.Errorf("bench: W3 read %d events, seeded %d", read, seeded)
	}
	return Result{Workload: "W3", Events: read, Seconds: elapsed.Seconds(),
		EventsPerSec: float64(read) / elapsed.Seconds(), PeakRSSMB: peakRSSMB()}, nil
}

// loadStream loads one stream of size events, runs times, and reports the
// median (p50) and the slowest load (p99).
func loadStream(ctx context.Context, store eventstore.Store, size, runs int) (Result, error) {
	for v := 0; v < size; v += 100 {
		if _, err := store.Append(ctx, "load-1", eventstore.Exact(eventstore.Version(v)), events(min(100, size-v))); err != nil {
			return Result{}, err
		}
	}
	load := func() ([]eventstore.Event, error) { return eventstore.LoadStream(ctx, store, "load-1") }
	if l, ok := store.(interface {
		LoadStream(context.Context, string) ([]eventstore.Event, error)
	}); ok {
		load = func() ([]eventstore.Event, error) { return l.LoadStream(ctx, "load-1") }
	}
	lat := make([]time.Duration, 0, runs)
	start := time.Now()
	for range runs {
		t0 := time.Now()
		evs, err := load()
		if err != nil {
			return Result{}, err
		}
		if len(evs) != size {
			return Result{}, fmt.Errorf("bench: W4 loaded %d events, want %d", len(evs), size)
		}
		lat = append(lat, time.Since(t0))
	}
	elapsed := time.Since(start)
	slices.Sort(lat)
	return Result{Workload: "W4", Events: size * runs, Seconds: elapsed.Seconds(),
		EventsPerSec: float64(size*runs) / elapsed.Seconds(),
		P50ms:        ms(percentile(lat, 0.5)), P99ms: ms(lat[len(lat)-1]), PeakRSSMB: peakRSSMB()}, nil
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// peakRSSMB is the process's peak resident set (VmHWM), or 0 where
// /proc is missing.
func peakRSSMB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			return float64(kb) / 1024
		}
	}
	return 0
}

// RawLimit is what ../shared/bench/raw-limit.sh prints: plain INSERTs and a
// plain ordered scan on the same PostgreSQL, measured now.
type RawLimit struct {
	W1EventsPerSec   float64 `json:"w1_events_per_sec"`
	W1P99ms          float64 `json:"w1_p99_ms"`
	W2EventsPerSec   float64 `json:"w2_events_per_sec"`
	ReadEventsPerSec float64 `json:"read_events_per_sec"`
}

// Summary is the median of several runs of one workload, with its ratios to
// the raw limit measured in the same invocation.
type Summary struct {
	Result
	Runs          int      `json:"runs"`
	RatioToRaw    *float64 `json:"ratio_to_raw,omitempty"`     // events/s over raw events/s
	P99RatioToRaw *float64 `json:"p99_ratio_to_raw,omitempty"` // W1 only: p99 over raw p99
	// RawW1EventsPerSec is given with W7 and W8, which have no raw limit of
	// their own: the raw W1 events/s measured in the same invocation, as
	// context only. No ratio is taken: a relayed message or a saga is not
	// a single-row INSERT, so a quotient of the two would mean nothing.
	RawW1EventsPerSec *float64 `json:"raw_w1_events_per_sec,omitempty"`
}

// Summarize takes the median of each figure over runs and, given a raw
// limit, the ratios the docs quote.
func Summarize(runs []Result, raw *RawLimit) Summary {
	med := func(get func(Result) float64) float64 {
		v := make([]float64, len(runs))
		for i, r := range runs {
			v[i] = get(r)
		}
		slices.Sort(v)
		if len(v)%2 == 1 {
			return v[len(v)/2]
		}
		return (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	s := Summary{Result: runs[0], Runs: len(runs)}
	s.Seconds = med(func(r Result) float64 { return r.Seconds })
	s.EventsPerSec = med(func(r Result) float64 { return r.EventsPerSec })
	s.P50ms = med(func(r Result) float64 { return r.P50ms })
	s.P99ms = med(func(r Result) float64 { return r.P99ms })
	s.PeakRSSMB = slices.MaxFunc(runs, func(a, b Result) int { return cmpFloat(a.PeakRSSMB, b.PeakRSSMB) }).PeakRSSMB
	if s.W7Result != nil {
		w := *s.W7Result
		w.MsgsPerSec = med(func(r Result) float64 { return r.W7Result.MsgsPerSec })
		w.AppendSeconds = med(func(r Result) float64 { return r.W7Result.AppendSeconds })
		for _, r := range runs {
			w.Duplicates = max(w.Duplicates, r.W7Result.Duplicates)
		}
		s.W7Result = &w
	}
	if s.W8Result != nil {
		w := *s.W8Result
		w.SagasPerSec = med(func(r Result) float64 { return r.W8Result.SagasPerSec })
		w.StartSpanSeconds = med(func(r Result) float64 { return r.W8Result.StartSpanSeconds })
		s.W8Result = &w
	}
	if raw == nil {
		return s
	}
	ratio := func(a, b float64) *float64 {
		if b <= 0 {
			return nil
		}
		r := float64(int(a/b*100+0.5)) / 100
		return &r
	}
	switch s.Workload {
	case "W1":
		s.RatioToRaw = ratio(s.EventsPerSec, raw.W1EventsPerSec)
		s.P99RatioToRaw = ratio(s.P99ms, raw.W1P99ms)
	case "W2":
		s.RatioToRaw = ratio(s.EventsPerSec, raw.W2EventsPerSec)
	case "W3":
		s.RatioToRaw = ratio(s.EventsPerSec, raw.ReadEventsPerSec)
	case "W7", "W8":
		if raw.W1EventsPerSec > 0 {
			w1 := raw.W1EventsPerSec
			s.RawW1EventsPerSec = &w1
		}
	}
	return s
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
