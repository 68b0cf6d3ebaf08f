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
// CurrentSlot tells a restarting process which slot is live. The rebuild
// handles failing events by Config.Policy, as the live projection does. Use
// a new slot name each time: a slot that was used before is refused.
func Rebuild(ctx context.Context, store eventstore.Store, cfg RebuildConfig, slot string) (*Runner, error) {
	if cfg.DB == nil || cfg.Handler == nil || cfg.Switch == nil {
		return nil, errors.New("projection: Rebuild needs Config.DB, Handler and Switch")
	}
	if !nameRE.MatchString(slot) {
		return nil, fmt.Errorf("projection: slot %q: want 1-100 of [a-z0-9_.@-]", slot)
	}
	base := cfg.Name
	if cur, err := CurrentSlot(ctx, cfg.DB, cfg.Schema, base); err != nil {
		return nil, err
	} else if cur == slot {
		return nil, fmt.Errorf("projection: %s is already on slot %s; rebuild into a new one", base, slot)
	}
	q, err := newQueries(cfg.Schema)
	if err != nil {
		return nil, err
	}
	h, err := cfg.Handler(slot)
	if err != nil {
		return nil, err
	}
	rc := cfg.Config
	rc.Name = SlotName(base, slot)
	rc.From = eventstore.Start
	r, err := NewRunner(store, h, rc)
	if err != nil {
		return nil, err
	}
	// A slot is built once from the start: reusing one would resume it. The
	// checkpoint is the runner's tenant's.
	var used eventstore.Position
	if err := r.onDB(ctx, func(db querier) (err error) {
		used, err = q.loadCheckpoint(ctx, db, rc.Name)
		return err
	}); err != nil {
		return nil, err
	} else if used != eventstore.Start {
		return nil, fmt.Errorf("projection: slot %s of %s was used before; rebuild into a new slot", slot, base)
	}
	head, err := store.Head(ctx)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	// The runner outlives this call as the live projection: it must not end
	// with the caller's context (a timeout on the rebuild, say).
	if err := r.Start(context.WithoutCancel(ctx)); err != nil {
		return nil, err
	}
	fail := func(err error) (*Runner, error) {
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		r.Stop(stopCtx)
		return nil, err
	}
	var lastLagCheck time.Time
	for {
		pos, state, rerr := r.progress()
		if state == StateFailed {
			return fail(fmt.Errorf("projection: rebuilding %s: %w", rc.Name, rerr))
		}
		if cfg.Progress != nil {
			done := pos.GlobalPosition
			rate := float64(done) / time.Since(start).Seconds()
			p := Progress{Done: min(done, head.GlobalPosition), Total: head.GlobalPosition, Rate: rate}
			if rate > 0 && head.GlobalPosition > done {
				p.ETA = time.Duration(float64(head.GlobalPosition-done) / rate * float64(time.Second))
			}
			cfg.Progress(p)
		}
		// Caught up: no more than one batch behind the live feed of its
		// category, measured once it has passed the head the rebuild began at
		// (a category may end before that head; then every 2 s). Waiting for
		// zero lag could wait forever under a steady stream of appends.
		if state == StateRunning && (!pos.Less(head) || time.Since(lastLagCheck) > 2*time.Second) {
			lastLagCheck = time.Now()
			lag, _, err := lagUpTo(ctx, store, pos, rc.Category, r.cfg.BatchSize+1)
			if err == nil && lag <= r.cfg.BatchSize && (!pos.Less(head) || lag == 0) {
				break
			}
		}
		if !sleep(ctx, 100*time.Millisecond) {
			return fail(ctx.Err())
		}
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
