package bench

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/projection"
)

// DB is the database a PostgreSQL run's read models go to: the schema the
// store uses. A memory run has none and projects into a Go map.
type DB struct {
	DB     *sqlx.DB
	Schema string
}

// readModel is the projection W5 and W6 run: per stream, how many events and
// the last one seen, upserted per event.
type readModel struct {
	db      DB
	table   string
	mu      sync.Mutex
	mem     map[string]int
	visible func(e eventstore.Event) // memory runs: called when an event takes effect
}

func newReadModel(ctx context.Context, db DB) (*readModel, error) {
	rm := &readModel{db: db, mem: map[string]int{}}
	if db.DB == nil {
		return rm, nil
	}
	rm.table = `"` + db.Schema + `".bench_read_model`
	_, err := db.DB.ExecContext(ctx, `CREATE SEQUENCE "`+db.Schema+`".bench_read_model_seq;
		CREATE TABLE `+rm.table+` (stream_id text PRIMARY KEY, events int NOT NULL,
		last_event uuid NOT NULL, seq bigint NOT NULL DEFAULT nextval('"`+db.Schema+`".bench_read_model_seq'))`)
	return rm, err
}

func (rm *readModel) handler() any {
	if rm.db.DB == nil {
		return projection.HandlerFunc(func(_ context.Context, e eventstore.Event) error {
			rm.mu.Lock()
			rm.mem[e.StreamID]++
			rm.mu.Unlock()
			if rm.visible != nil {
				rm.visible(e)
			}
			return nil
		})
	}
	// One statement per batch: per stream, the count and the last event.
	upsert := `INSERT INTO ` + rm.table + ` (stream_id, events, last_event)
		SELECT * FROM unnest($1::text[], $2::int[], $3::uuid[])
		ON CONFLICT (stream_id) DO UPDATE SET events = ` + rm.table + `.events + excluded.events,
		last_event = excluded.last_event, seq = nextval('"` + rm.db.Schema + `".bench_read_model_seq')`
	return batchHandler(func(ctx context.Context, tx *sqlx.Tx, events []eventstore.Event) error {
		idx := map[string]int{}
		var streams, ids []string
		var counts []int64
		for _, e := range events {
			i, ok := idx[e.StreamID]
			if !ok {
				i = len(streams)
				idx[e.StreamID] = i
				streams, counts, ids = append(streams, e.StreamID), append(counts, 0), append(ids, "")
			}
			counts[i]++
			ids[i] = e.ID.String()
		}
		_, err := tx.ExecContext(ctx, upsert, pq.StringArray(streams), pq.Int64Array(counts), pq.StringArray(ids))
		return err
	})
}

type batchHandler func(ctx context.Context, tx *sqlx.Tx, events []eventstore.Event) error

func (f batchHandler) HandleBatchTx(ctx context.Context, tx *sqlx.Tx, events []eventstore.Event) error {
	return f(ctx, tx, events)
}

func (rm *readModel) runner(store eventstore.Store, name string, batch int) (*projection.Runner, error) {
	return projection.NewRunner(store, rm.handler(), projection.Config{
		Name: name, DB: rm.db.DB, Schema: rm.db.Schema, BatchSize: batch, LeaseRetry: 50 * time.Millisecond,
	})
}

// rebuild (W5) seeds total events, then times a new projection reading them
// all from the start into the read model, in batches of 1,000.
func rebuild(ctx context.Context, store eventstore.Store, db DB, total int) (Result, error) {
	seeded, err := Seed(ctx, store, "rebuild", total)
	if err != nil {
		return Result{}, err
	}
	rm, err := newReadModel(ctx, db)
	if err != nil {
		return Result{}, err
	}
	head, err := store.Head(ctx)
	if err != nil {
		return Result{}, err
	}
	r, err := rm.runner(store, "bench_rebuild", 1000)
	if err != nil {
		return Result{}, err
	}
	start := time.Now()
	if err := r.Start(ctx); err != nil {
		return Result{}, err
	}
	defer r.Stop(context.WithoutCancel(ctx))
	for {
		st, err := r.Status(ctx)
		if err != nil {
			return Result{}, err
		}
		if st.Position == head {
			break
		}
		if st.Err != nil {
			return Result{}, st.Err
		}
		time.Sleep(10 * time.Millisecond)
	}
	elapsed := time.Since(start)
	return Result{Workload: "W5", Events: seeded, Seconds: elapsed.Seconds(),
		EventsPerSec: float64(seeded) / elapsed.Seconds(), PeakRSSMB: peakRSSMB()}, nil
}

// liveLatency (W6) runs W1 while a projection follows the feed, and times
// each event from its append's return to its effect in the read model.
func liveLatency(ctx context.Context, store eventstore.Store, db DB, total int) (Result, error) {
	rm, err := newReadModel(ctx, db)
	if err != nil {
		return Result{}, err
	}
	var mu sync.Mutex
	appended := map[eventstore.Position]time.Time{} // append returned
	seen := map[eventstore.Position]time.Time{}     // visible in the read model
	rm.visible = func(e eventstore.Event) {
		mu.Lock()
		seen[e.Position] = time.Now()
		mu.Unlock()
	}
	r, err := rm.runner(store, "bench_live", 100)
	if err != nil {
		return Result{}, err
	}
	if err := r.Start(ctx); err != nil {
		return Result{}, err
	}
	defer r.Stop(context.WithoutCancel(ctx))

	// With PostgreSQL, visibility is a committed row: watch the table.
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	var watch sync.WaitGroup
	if db.DB != nil {
		watch.Go(func() { watchTable(watchCtx, db.DB, rm.table, &mu, seen) })
	}
	res, err := writersHook(ctx, store, "W6", "live", 8, 1, total, func(p eventstore.Position) {
		mu.Lock()
		appended[p] = time.Now()
		mu.Unlock()
	})
	if err != nil {
		return Result{}, err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		mu.Lock()
		done := len(seen) >= len(appended)
		mu.Unlock()
		if done || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	stopWatch()
	watch.Wait()
	mu.Lock()
	defer mu.Unlock()
	var lat []time.Duration
	for p, t0 := range appended {
		if t1, ok := seen[p]; ok {
			lat = append(lat, max(t1.Sub(t0), 0))
		}
	}
	if len(lat) < len(appended) {
		return Result{}, fmt.Errorf("bench: W6 saw %d of %d events in the read model", len(lat), len(appended))
	}
	slices.Sort(lat)
	res.Workload = "W6"
	res.P50ms, res.P99ms = ms(percentile(lat, 0.5)), ms(percentile(lat, 0.99))
	res.PeakRSSMB = peakRSSMB()
	return res, nil
}

// watchTable records when each event becomes visible in the read model
// table, by polling the rows changed since the last look.
func watchTable(ctx context.Context, db *sqlx.DB, table string, mu *sync.Mutex, seen map[eventstore.Position]time.Time) {
	q := `SELECT m.seq, e.transaction_id::text, e.global_position FROM ` + table + ` m
		JOIN ` + table[:len(table)-len(`.bench_read_model`)] + `.events e ON e.event_id = m.last_event
		WHERE m.seq > $1 ORDER BY m.seq`
	var last int64
	for ctx.Err() == nil {
		rows, err := db.QueryContext(ctx, q, last)
		if err != nil {
			return
		}
		now := time.Now()
		for rows.Next() {
			var seq int64
			var xid string
			var p eventstore.Position
			if rows.Scan(&seq, &xid, &p.GlobalPosition) == nil {
				fmt.Sscan(xid, &p.TxID)
				mu.Lock()
				if _, ok := seen[p]; !ok {
					seen[p] = now
				}
				mu.Unlock()
				last = seq
			}
		}
		rows.Close()
		time.Sleep(time.Millisecond)
	}
}
