// Package aggregatetest tests aggregates as given events, when a command,
// then events or an error, with no store involved:
//
//	aggregatetest.Given(t, new(Account), Opened{Owner: "ada"}, Credited{Amount: 10}).
//		When(func(a *Account) error { return a.Debit(4) }).
//		Then(Debited{Amount: 4})
//
// ReplayGolden proves that stored histories kept in testdata/ still decode
// and fold with today's types and upcasters.
package aggregatetest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

// Fixture is a scenario under way.
type Fixture[P aggregate.Aggregate] struct {
	t   testing.TB
	agg P
	err error
	ran bool
}

// Given starts a scenario on agg (a new, zero aggregate) with history
// already stored.
func Given[P aggregate.Aggregate](t testing.TB, agg P, history ...any) *Fixture[P] {
	t.Helper()
	aggregate.Rehydrate(agg, "test", history...)
	return &Fixture[P]{t: t, agg: agg}
}

// When runs the command.
func (f *Fixture[P]) When(cmd func(P) error) *Fixture[P] {
	f.err = cmd(f.agg)
	f.ran = true
	return f
}

// Then fails the test unless the command succeeded and recorded exactly want,
// in order.
func (f *Fixture[P]) Then(want ...any) P {
	f.t.Helper()
	if !f.ran {
		f.t.Fatal("aggregatetest: Then without When")
	}
	if f.err != nil {
		f.t.Fatalf("command failed: %v; want events %s", f.err, describe(want))
	}
	got := f.agg.Pending()
	if len(got) == 0 && len(want) == 0 {
		return f.agg
	}
	if !reflect.DeepEqual(got, want) {
		f.t.Fatalf("recorded events:\n  got  %s\n  want %s", describe(got), describe(want))
	}
	return f.agg
}

// ThenError fails the test unless the command failed with an error matching
// target (errors.Is) and recorded nothing.
func (f *Fixture[P]) ThenError(target error) {
	f.t.Helper()
	if !f.ran {
		f.t.Fatal("aggregatetest: ThenError without When")
	}
	if !errors.Is(f.err, target) {
		f.t.Fatalf("command returned %v, want an error matching %v", f.err, target)
	}
	if got := f.agg.Pending(); len(got) > 0 {
		f.t.Fatalf("a failed command recorded events: %s", describe(got))
	}
}

func describe(events []any) string {
	if len(events) == 0 {
		return "(none)"
	}
	parts := make([]string, len(events))
	for i, e := range events {
		parts[i] = fmt.Sprintf("%T%+v", e, e)
	}
	return strings.Join(parts, ", ")
}

// GoldenEvent is one stored event in a golden history file: a JSON array of
// these, written from real stored events (the type name, the content type
// with its schema version, and the payload exactly as stored).
type GoldenEvent struct {
	Type        string          `json:"type"`
	ContentType string          `json:"content_type"`
	Data        json.RawMessage `json:"data"`
}

// ReplayGolden decodes every event of the golden history at path through reg
// (running today's upcasters) and folds them into agg. It fails the test if
// any event no longer decodes. Assert on the returned aggregate's state.
func ReplayGolden[P aggregate.Aggregate](t testing.TB, reg *codec.Registry, path string, agg P) P {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden history: %v", err)
	}
	var history []GoldenEvent
	if err := json.Unmarshal(raw, &history); err != nil {
		t.Fatalf("golden history %s: %v", path, err)
	}
	events := make([]any, len(history))
	for i, g := range history {
		v, err := reg.Decode(eventstore.Event{
			StreamID: "golden-" + path, Version: eventstore.Version(i + 1),
			Type: g.Type, ContentType: g.ContentType, Data: g.Data,
		})
		if err != nil {
			t.Fatalf("%s: event %d (%s, %s) no longer decodes: %v", path, i+1, g.Type, g.ContentType, err)
		}
		events[i] = v
	}
	aggregate.Rehydrate(agg, "golden", events...)
	return agg
}
