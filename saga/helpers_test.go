package saga_test

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/saga"
)

// effects applies each idempotency key's effect once, as a well-behaved
// receiver does, and counts every call.
type effects struct {
	mu    sync.Mutex
	calls map[string]int // by idempotency key
	log   []string       // "<saga>:<effect>", the first time each key came
}

func newEffects() *effects { return &effects{calls: map[string]int{}} }

// apply records a call with key; it reports whether this was its first.
func (e *effects) apply(sagaID, name, key string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.calls[key]++
	if e.calls[key] == 1 {
		e.log = append(e.log, sagaID+":"+name)
		return true
	}
	return false
}

// do is a local action whose effect is name.
func (e *effects) do(name string) saga.Action {
	return saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
		e.apply(sc.SagaID, name, sc.Key)
		return []byte(name), nil
	})
}

func (e *effects) effectsOf(sagaID string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, l := range e.log {
		if rest, ok := strings.CutPrefix(l, sagaID+":"); ok {
			out = append(out, rest)
		}
	}
	return out
}

func (e *effects) callsOf(key string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.calls[key]
}

// send is a Send action to topic carrying the saga's input.
func send(topic string) saga.Action {
	return saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
		return topic, message.NewMessage(uuid.NewString(), sc.Input), nil
	})
}

func wantEffects(t *testing.T, e *effects, sagaID string, want ...string) {
	t.Helper()
	if got := e.effectsOf(sagaID); !slices.Equal(got, want) {
		t.Fatalf("effects of %s: got %q, want %q", sagaID, got, want)
	}
}

// noop is a local action that does nothing.
var noop = saga.Do(func(context.Context, saga.StepContext) ([]byte, error) { return nil, nil })
