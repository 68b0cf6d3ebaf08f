package projection

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
)

// RebuildConfig describes a blue/green rebuild: a new version (a "slot") of
// the read model is built by replaying the whole log into its own tables while
// the current version keeps serving, then readers are switched to it in one
// transaction.
type RebuildConfig struct {
	// Config is the projection's configuration; Name is its base name. The
	// rebuild runs as Name + "@" + slot, with a checkpoint of its own.
	Config
	// Handler returns the handler (Handler, TxHandler or BatchTxHandler) that
	// writes version slot of the read model, e.g. into tables suffixed with
	// the slot.
	Handler func(slot string) (any, error)
	// Switch makes slot the version readers see, inside tx: for example
	// CREATE OR REPLACE VIEW balances AS SELECT * FROM balances_<slot>.
	Switch func(ctx context.Context, tx *sqlx.Tx, slot string) error
	// Progress, when set, is called about every 100 ms while catching up.
	Progress func(Progress)
}

// Progress of a rebuild, for a progress bar.
type Progress struct {
	Done  int64         // events handled so far (by global position)
	Total int64         // events to reach the head when the rebuild began
	Rate  float64       // events per second so far
	ETA   time.Duration // at that rate
}

// Rebuild builds slot from the start of the log, waits until it has caught up
// with the live feed, and switches readers to it. It returns the slot's
// runner still running: keep it as the live projection (and stop the one that
// fed the old slot). Run it with the name SlotName(name, slot) from now on;
// CurrentSlot tells a restarting process which slot is live.
func Rebuild(ctx context.Context, store eventstore.Store, cfg RebuildConfig, slot string) (*Runner, error) {
	if cfg.DB == nil || cfg.Handler == nil || cfg.Switch == nil {
		return nil, errors.New("projection: Rebuild needs Config.DB, Handler and Switch")
	}
	if !nameRE.MatchString(slot) {
		return nil, fmt.Errorf("projection: slot %q: want 1-100 of [a-z0-9_.-]", slot)
	}
	base := cfg.Name
	h, err := cfg.Handler(slot)
	if err != nil {
		return nil, err
	}
	rc := cfg.Config
	rc.Name = SlotName(base, slot)
	rc.From, rc.Policy = eventstore.Start, PolicyStop // a rebuild stops on a failing event
	r, err := NewRunner(store, h, rc)
	if err != nil {
		return nil, err
	}
	head, err := store.Head(ctx)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	if err := r.Start(ctx); err != nil {
		return nil, err
	}
	fail := func(err error) (*Runner, error) {
		r.Stop(context.WithoutCancel(ctx))
		return nil, err
	}
	for {
		st, err := r.Status(ctx)
		if err != nil {
			return fail(err)
		}
		if st.State == StateFailed {
			return fail(fmt.Errorf("projection: rebuilding %s: %w", rc.Name, st.Err))
		}
		if cfg.Progress != nil {
			done := st.Position.GlobalPosition
			rate := float64(done) / time.Since(start).Seconds()
			p := Progress{Done: done, Total: head.GlobalPosition, Rate: rate}
			if rate > 0 && head.GlobalPosition > done {
				p.ETA = time.Duration(float64(head.GlobalPosition-done) / rate * float64(time.Second))
			}
			cfg.Progress(p)
		}
		// Caught up: past the head the rebuild began at, and no further behind
		// the live feed than one batch, as a live runner normally is. (Waiting
		// for zero lag could wait forever under a steady stream of appends.)
		if st.State == StateRunning && !st.Position.Less(head) && st.LagEvents <= r.cfg.BatchSize {
			break
		}
		if !sleep(ctx, 100*time.Millisecond) {
			return fail(ctx.Err())
		}
	}
	q, err := newQueries(cfg.Schema)
	if err != nil {
		return fail(err)
	}
	tx, err := cfg.DB.BeginTxx(ctx, nil)
	if err != nil {
		return fail(err)
	}
	defer tx.Rollback()
	if err := cfg.Switch(ctx, tx, slot); err != nil {
		return fail(fmt.Errorf("projection: switching %s to %s: %w", base, slot, err))
	}
	if _, err := tx.ExecContext(ctx, q.setSlot, base, slot); err != nil {
		return fail(fmt.Errorf("projection: recording slot %s of %s: %w", slot, base, err))
	}
	if err := tx.Commit(); err != nil {
		return fail(err)
	}
	return r, nil
}

// SlotName is the runner name of slot of projection base.
func SlotName(base, slot string) string { return base + "@" + slot }

// CurrentSlot returns the slot readers of projection base were last switched
// to, or "" if it was never rebuilt.
func CurrentSlot(ctx context.Context, db *sqlx.DB, schema, base string) (string, error) {
	q, err := newQueries(schema)
	if err != nil {
		return "", err
	}
	var slot string
	err = db.GetContext(ctx, &slot, q.getSlot, base)
	if errors.Is(err, errNoRows) {
		return "", nil
	}
	return slot, err
}
