package telemetry_test

import (
	"context"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
)

type countBatch struct{ n int }

func (c *countBatch) HandleBatchTx(_ context.Context, _ *sqlx.Tx, events []eventstore.Event) error {
	c.n += len(events)
	return nil
}

// TestProjectionBatchSpan: a batch span is linked to the trace of every event
// in the batch (three business actions, three links) and counts its events.
func TestProjectionBatchSpan(t *testing.T) {
	ctx := context.Background()
	o := newObserved(t)
	store := o.tel.Store(memstore.New(nil))
	var traces []string
	for _, s := range []string{"acct-1", "acct-2", "acct-3"} {
		cctx, cmd := o.tracer().Start(ctx, "command")
		if _, err := store.Append(cctx, s, eventstore.NoStream, []eventstore.EventData{{Type: "opened", Data: []byte(`{}`)}}); err != nil {
			t.Fatal(err)
		}
		cmd.End()
		traces = append(traces, cmd.SpanContext().TraceID().String())
	}
	evs, err := store.ReadAll(ctx, eventstore.ReadAllOpts{})
	if err != nil || len(evs) != 3 {
		t.Fatalf("read %d events: %v", len(evs), err)
	}
	inner := &countBatch{}
	if err := o.tel.ProjectionBatchTxHandler("balances", inner).HandleBatchTx(ctx, nil, evs); err != nil {
		t.Fatal(err)
	}
	if inner.n != 3 {
		t.Fatalf("the wrapped handler got %d events", inner.n)
	}
	span := one(t, o.ended(), "stele.project.batch balances", map[string]string{"stele.projection": "balances"})
	var linked []string
	for _, l := range span.Links() {
		linked = append(linked, l.SpanContext.TraceID().String())
	}
	if len(linked) != 3 || linked[0] != traces[0] || linked[1] != traces[1] || linked[2] != traces[2] {
		t.Fatalf("links to traces %v, want %v", linked, traces)
	}
	for _, tr := range traces {
		if span.SpanContext().TraceID().String() == tr {
			t.Fatal("the batch span joined one action's trace instead of linking to all")
		}
	}
	var handled float64
	for _, p := range points(metrics(o.collect(t))["stele.projection.handled"]) {
		if p.attrs["stele.projection"] == "balances" {
			handled += p.value
		}
	}
	if handled != 3 {
		t.Fatalf("stele.projection.handled = %v, want 3", handled)
	}
}
