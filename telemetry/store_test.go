package telemetry_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/saga"
)

// TestStoreSpans: where an append's span hangs and what its events carry.
func TestStoreSpans(t *testing.T) {
	ctx := context.Background()
	o := newObserved(t)
	store := o.tel.Store(memstore.New(nil))
	read := func(stream string) []eventstore.Event {
		t.Helper()
		evs, err := eventstore.LoadStream(ctx, store, stream)
		if err != nil {
			t.Fatal(err)
		}
		return evs
	}

	// Inside a command: a child of it, and the event carries the append.
	cctx, cmd := o.tracer().Start(ctx, "command")
	events := []eventstore.EventData{{Type: "a.happened", Data: []byte(`{}`)}}
	if _, err := store.Append(cctx, "a-1", eventstore.NoStream, events); err != nil {
		t.Fatal(err)
	}
	if events[0].Metadata.TraceParent != "" {
		t.Error("Append changed the caller's events")
	}
	// A stream read inside a traced operation has a span; outside, none.
	read("a-1")
	cmd.End()
	appendA := one(t, o.ended(), "stele.append", map[string]string{"stele.stream_id": "a-1"})
	if appendA.Parent().SpanID() != cmd.SpanContext().SpanID() {
		t.Errorf("the append is not a child of the command")
	}
	stored := read("a-1")[0]
	if want := "00-" + appendA.SpanContext().TraceID().String() + "-" + appendA.SpanContext().SpanID().String() + "-01"; stored.Metadata.TraceParent != want {
		t.Errorf("stored traceparent %q, want %q", stored.Metadata.TraceParent, want)
	}
	if n := len(find(o.ended(), "stele.read_stream", nil)); n != 0 {
		t.Errorf("%d read spans, want none: LoadStream ran outside the command", n)
	}
	rctx, op := o.tracer().Start(ctx, "query")
	if _, err := store.ReadStream(rctx, "a-1", eventstore.ReadStreamOpts{}); err != nil {
		t.Fatal(err)
	}
	op.End()
	rs := one(t, o.ended(), "stele.read_stream", nil)
	if rs.Parent().SpanID() != op.SpanContext().SpanID() || attr(rs, "stele.events_read") != "1" || attr(rs, "stele.stream_id") != "a-1" {
		t.Errorf("read span %v, parent %s", rs.Attributes(), rs.Parent().SpanID())
	}

	// Without a span, events that carry a trace context continue it (a
	// saga runner appending for a traced event), and keep their own.
	if _, err := store.Append(ctx, "b-1", eventstore.NoStream, []eventstore.EventData{{Type: "b.followed", Data: []byte(`{}`),
		Metadata: stored.Metadata}}); err != nil {
		t.Fatal(err)
	}
	appendB := one(t, o.ended(), "stele.append", map[string]string{"stele.stream_id": "b-1"})
	if appendB.Parent().SpanID() != appendA.SpanContext().SpanID() || appendB.SpanContext().TraceID() != cmd.SpanContext().TraceID() {
		t.Errorf("an append without a span did not continue its events' trace")
	}
	if read("b-1")[0].Metadata.TraceParent != stored.Metadata.TraceParent {
		t.Errorf("an event's own traceparent was replaced")
	}

	// Without either: a trace of its own.
	if _, err := store.Append(ctx, "c-1", eventstore.NoStream, []eventstore.EventData{{Type: "c.began", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	appendC := one(t, o.ended(), "stele.append", map[string]string{"stele.stream_id": "c-1"})
	if appendC.Parent().IsValid() || appendC.SpanContext().TraceID() == cmd.SpanContext().TraceID() {
		t.Errorf("an untraced append joined a trace")
	}

	// A conflict: an error on the span, outcome "conflict", nothing counted.
	_, err := store.Append(ctx, "c-1", eventstore.NoStream, []eventstore.EventData{{Type: "c.began", Data: []byte(`{}`)}})
	if !errors.Is(err, eventstore.ErrConcurrencyConflict) {
		t.Fatalf("second append: %v, want a conflict", err)
	}
	conflicts := find(o.ended(), "stele.append", map[string]string{"stele.stream_id": "c-1"})
	if len(conflicts) != 2 || conflicts[1].Status().Code != codes.Error {
		t.Errorf("the conflicting append's span: %v", statuses(conflicts))
	}
	got := metrics(o.collect(t))
	outcomes := map[string]float64{}
	for _, p := range points(got["stele.append.duration"]) {
		outcomes[p.attrs["stele.category"]+"/"+p.attrs["stele.outcome"]] += p.value
	}
	if outcomes["c/ok"] != 1 || outcomes["c/conflict"] != 1 || outcomes["a/ok"] != 1 {
		t.Errorf("append outcomes %v", outcomes)
	}
	for _, p := range points(got["stele.events.appended"]) {
		if p.attrs["stele.category"] == "c" && p.value != 1 {
			t.Errorf("%v events counted in c, want 1: a conflict appends none", p.value)
		}
	}
}

// TestSagaSpans: a saga whose second step fails for good: a span per step
// and per compensation, each a child of the append of the event that
// started the saga, and the step counter by outcome.
func TestSagaSpans(t *testing.T) {
	ctx := context.Background()
	o := newObserved(t)
	mem := memstore.New(nil)
	store := o.tel.Store(mem)
	def := saga.Definition{Name: "trip", StartedBy: "trip.booked", Steps: []saga.Step{
		{Name: "hotel",
			Action:       saga.Do(func(context.Context, saga.StepContext) ([]byte, error) { return []byte("room 12"), nil }),
			Compensation: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) { return nil, nil })},
		{Name: "flight", Action: saga.Do(func(ctx context.Context, sc saga.StepContext) ([]byte, error) {
			// Work the step does joins its span.
			if !trace.SpanContextFromContext(ctx).IsValid() {
				return nil, errors.New("no span in the step's context")
			}
			return nil, bus.Permanent(errors.New("no seats"))
		})},
	}}
	runner, err := saga.NewRunner(store, o.tel.Saga(def), saga.Config{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.tel.ObserveSagas(mem, "trip"); err != nil {
		t.Fatal(err)
	}
	cctx, cmd := o.tracer().Start(ctx, "book trip")
	if _, err := store.Append(cctx, "trip-7", eventstore.NoStream, []eventstore.EventData{{Type: "trip.booked", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	cmd.End()
	if err := runner.RunDue(ctx); err != nil {
		t.Fatal(err)
	}
	if in, err := runner.Load(ctx, "trip-7"); err != nil || in.Status != saga.Compensated {
		t.Fatalf("saga: %v, %v; want compensated", in, err)
	}

	spans := o.ended()
	booked := one(t, spans, "stele.append", map[string]string{"stele.stream_id": "trip-7"})
	var names []string
	for _, s := range spans {
		if !strings.HasPrefix(s.Name(), "stele.saga.") {
			continue
		}
		names = append(names, s.Name()+" "+attr(s, "stele.compensating")+" "+s.Status().Code.String())
		if s.Parent().SpanID() != booked.SpanContext().SpanID() {
			t.Errorf("%s is not a child of the starting event's append", s.Name())
		}
		if attr(s, "stele.saga.id") != "trip-7" || attr(s, "stele.saga") != "trip" {
			t.Errorf("%s attributes %v", s.Name(), s.Attributes())
		}
	}
	want := []string{"stele.saga.step hotel false Unset", "stele.saga.step flight false Error", "stele.saga.compensate hotel true Unset"}
	if !slices.Equal(names, want) {
		t.Errorf("saga spans %q, want %q", names, want)
	}

	got := metrics(o.collect(t))
	steps := map[string]float64{}
	for _, p := range points(got["stele.saga.steps"]) {
		steps[p.attrs["stele.step"]+"/"+p.attrs["stele.compensating"]+"/"+p.attrs["stele.outcome"]] += p.value
	}
	if steps["hotel/false/ok"] != 1 || steps["flight/false/error"] != 1 || steps["hotel/true/ok"] != 1 || len(steps) != 3 {
		t.Errorf("saga steps counted %v", steps)
	}
	for _, p := range points(got["stele.sagas"]) {
		if want := map[string]float64{"compensated": 1}[p.attrs["stele.saga.status"]]; p.value != want {
			t.Errorf("stele.sagas %v = %v, want %v", p.attrs, p.value, want)
		}
	}
}
