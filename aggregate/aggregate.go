// Package aggregate holds event-sourced aggregates: Go types that decide on
// commands by recording events, and whose state is rebuilt by folding those
// events. Repository loads and saves them through an eventstore.Store with
// optimistic concurrency, from a snapshot when one exists.
//
//	type Account struct {
//		aggregate.Root
//		Balance int
//	}
//
//	func (a *Account) Apply(e any) {
//		switch e := e.(type) {
//		case Credited:
//			a.Balance += e.Amount
//		}
//	}
//
//	func (a *Account) Credit(n int) error {
//		if n <= 0 {
//			return ErrBadAmount
//		}
//		aggregate.Record(a, Credited{Amount: n})
//		return nil
//	}
package aggregate

import (
	"github.com/google/uuid"

	"github.com/stele-dev/stele/eventstore"
)

// Aggregate is what a pointer to your aggregate type is: it embeds Root and
// folds events into its state with Apply.
type Aggregate interface {
	// Apply folds one event into the state. It is called for stored history
	// and for newly recorded events alike, so it must not fail, check rules
	// or have side effects: deciding belongs in your command methods.
	Apply(event any)
	// ID, Version and Pending come from the embedded Root.
	ID() string
	Version() eventstore.Version
	Pending() []any
	root() *Root
}

// Root carries what every aggregate has: its id, the version of the last
// stored event folded into it, and the events recorded since. Embed it.
type Root struct {
	id         string
	version    eventstore.Version
	pending    []any
	pendingIDs []uuid.UUID // event ids, fixed when recorded so a retried Save is idempotent
}

func (r *Root) root() *Root { return r }

// ID is the aggregate's id (its stream is Category + "-" + ID).
func (r *Root) ID() string { return r.id }

// Version is the version of the last stored event folded into the aggregate;
// 0 for one never saved.
func (r *Root) Version() eventstore.Version { return r.version }

// Pending returns the events recorded since the last load or save.
func (r *Root) Pending() []any { return r.pending }

// Record folds e into agg and keeps it to be saved. The event gets its id
// now, so saving the same aggregate again after an unclear error (a timeout
// after the commit, say) stores nothing twice: the store recognises the ids.
func Record(agg Aggregate, e any) {
	agg.Apply(e)
	r := agg.root()
	r.pending = append(r.pending, e)
	id, err := uuid.NewV7()
	if err != nil {
		id = uuid.New() // the clock failed; any unique id will do
	}
	r.pendingIDs = append(r.pendingIDs, id)
}

// Rehydrate sets agg's id and folds stored history into it, as a load does:
// afterwards its version is len(history) and nothing is pending. Fixtures use
// it to start an aggregate from given events.
func Rehydrate(agg Aggregate, id string, history ...any) {
	r := agg.root()
	r.id = id
	for _, e := range history {
		agg.Apply(e)
		r.version++
	}
	r.pending, r.pendingIDs = nil, nil
}
