package outbox

import (
	"context"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/projection"
)

// Status is a relay's lease, checkpoint and progress, as `stele outbox
// status` shows it.
type Status struct {
	Name       string
	Owner      string    // the instance that holds or last held the lease
	Epoch      int64     // grows by one each time the lease changes hands
	LeaseUntil time.Time // zero when released
	Checkpoint eventstore.Position
	Published  int64 // messages the broker confirmed, all time
	// LastPublishAt and LastLatency describe the last published batch:
	// LastLatency runs from the append of its newest event to the broker's
	// confirmation.
	LastPublishAt time.Time
	LastLatency   time.Duration
	LastError     string // the last failure, cleared by the next checkpoint
	// Backlog counts the events after the checkpoint (all of them, before
	// the relay's filters; capped at projection.MaxLagCount) and
	// BacklogAge is the age of the oldest.
	Backlog    int
	BacklogAge time.Duration
}

// Status reads the relay's state and measures its backlog.
func (r *Relay) Status(ctx context.Context) (Status, error) {
	st, err := r.state.read(ctx, r.cfg.Name)
	if err != nil && err != ErrNoRelay {
		return st, err
	}
	if st.Checkpoint == eventstore.Start {
		st.Checkpoint = r.cfg.From
	}
	return withBacklog(ctx, r.store, st, r.cfg.Categories)
}

// ReadStatus reads the status of every relay recorded in schema (or only
// name, when given), with its backlog in store.
func ReadStatus(ctx context.Context, store eventstore.Store, db *sqlx.DB, schema, name string) ([]Status, error) {
	st, err := newPGState(db, schema)
	if err != nil {
		return nil, err
	}
	names := []string{name}
	if name == "" {
		if names, err = st.names(ctx); err != nil {
			return nil, err
		}
	}
	var out []Status
	for _, n := range names {
		s, err := st.read(ctx, n)
		if err != nil {
			return nil, err
		}
		if s, err = withBacklog(ctx, store, s, nil); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

func withBacklog(ctx context.Context, store eventstore.Store, st Status, categories []string) (Status, error) {
	category := ""
	if len(categories) == 1 {
		category = categories[0]
	}
	n, age, err := projection.Lag(ctx, store, st.Checkpoint, category)
	st.Backlog, st.BacklogAge = n, time.Duration(age*float64(time.Second))
	return st, err
}
