package saga

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/stele-dev/stele/eventstore"
)

// ErrNoSaga is returned for a saga id with no stream.
var ErrNoSaga = errors.New("saga: no such saga")

// StateError is an operator request the saga's state does not allow.
type StateError struct {
	Definition string
	ID         string
	Status     Status
	Want       string
}

func (e *StateError) Error() string {
	return fmt.Sprintf("saga %s %s is %s; %s", e.Definition, e.ID, e.Status, e.Want)
}

// Load returns a saga as its stream tells it.
func Load(ctx context.Context, store eventstore.Store, definition, id string) (*Instance, error) {
	events, err := eventstore.LoadStream(ctx, store, StreamID(definition, id))
	if err != nil {
		return nil, err
	}
	if len(events) == 0 {
		return nil, fmt.Errorf("%w: %s %s", ErrNoSaga, definition, id)
	}
	return fold(definition, id, events)
}

// List returns the sagas of definition (every definition when empty), by
// stream id, with status filtering when status is not empty.
func List(ctx context.Context, store eventstore.Store, definition string, status Status) ([]*Instance, error) {
	var out []*Instance
	opts := eventstore.ListStreamsOpts{}
	if definition != "" {
		opts.Category = Category(definition)
	}
	for {
		page, err := store.ListStreams(ctx, opts)
		if err != nil {
			return nil, err
		}
		for _, s := range page {
			cat, id, ok := strings.Cut(s.StreamID, "-")
			def, isSaga := strings.CutPrefix(cat, "saga_")
			if !ok || !isSaga {
				continue
			}
			in, err := Load(ctx, store, def, id)
			if err != nil {
				return nil, err
			}
			if status == "" || in.Status == status {
				out = append(out, in)
			}
		}
		if len(page) < eventstore.DefaultPageSize {
			break
		}
		opts.After = page[len(page)-1].StreamID
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].StartedAt.Before(out[j].StartedAt) })
	return out, nil
}

// RequestRetry sends a saga that needs attention back to work: the
// compensation that failed gets a fresh set of attempts. The runner picks
// the request up from the feed.
func RequestRetry(ctx context.Context, store eventstore.Store, definition, id, reason string) error {
	return request(ctx, store, definition, id, TypeRetryRequested, reason, NeedsAttention, "only a saga that needs attention can be retried")
}

// Abort asks a running saga to stop and compensate the steps it completed.
func Abort(ctx context.Context, store eventstore.Store, definition, id, reason string) error {
	return request(ctx, store, definition, id, TypeAbortRequested, reason, Running, "only a running saga can be aborted")
}

func request(ctx context.Context, store eventstore.Store, definition, id, typ, reason string, want Status, why string) error {
	data, _ := json.Marshal(record{Reason: reason})
	// A runner may move the saga between our read and our write: read again.
	for attempt := 0; ; attempt++ {
		in, err := Load(ctx, store, definition, id)
		if err != nil {
			return err
		}
		if in.Status != want {
			return &StateError{Definition: definition, ID: id, Status: in.Status, Want: why}
		}
		_, err = store.Append(ctx, StreamID(definition, id), eventstore.Exact(in.Version), []eventstore.EventData{{Type: typ, Data: data}})
		if errors.Is(err, eventstore.ErrConcurrencyConflict) && attempt < 20 {
			continue
		}
		return err
	}
}
