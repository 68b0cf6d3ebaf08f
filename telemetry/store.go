package telemetry

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/eventstore"
)

// store wraps an eventstore.Store with spans and metrics.
type store struct {
	eventstore.Store
	t *Telemetry
}

// Store returns s with a span per Append ("stele.append", its context
// stored in each event's traceparent unless the event has one) and, inside
// a traced operation, per stream read ("stele.read_stream"), and the append
// metrics. Other methods pass through.
//
// An Append whose context holds no span continues the trace its events
// carry (a saga runner appending the steps of a saga started by a traced
// event), or starts a new one. A ReadStream without a span in its context
// is not traced: background readers (runners loading a saga's stream)
// would otherwise each start a trace of one span.
//
// The decorator is an eventstore.Store: pgstore's own methods (AppendTx,
// Notify, DB) stay on the store you wrapped; use StampEvents before
// AppendTx.
func (t *Telemetry) Store(s eventstore.Store) eventstore.Store { return &store{Store: s, t: t} }

// Tenant is the wrapped store's tenant (pgstore.Store.ForTenant), "" if it
// has none, so that a projection runner over the decorated store knows it.
func (s *store) Tenant() string {
	if t, ok := s.Store.(interface{ Tenant() string }); ok {
		return t.Tenant()
	}
	return ""
}

func (s *store) Append(ctx context.Context, streamID string, expected eventstore.ExpectedVersion, events []eventstore.EventData) (eventstore.AppendResult, error) {
	category := eventstore.Category(streamID)
	parent := ctx
	if !trace.SpanContextFromContext(ctx).IsValid() {
		for _, e := range events {
			if e.Metadata.TraceParent != "" {
				parent = s.t.EventContext(ctx, e.Metadata)
				break
			}
		}
	}
	ctx, span := s.t.tracer.Start(parent, "stele.append", trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(attrStreamID.String(streamID), attrCategory.String(category),
			attrEvents.Int(len(events)), attrExpected.String(expected.String())))
	// The events carry this span's context: whoever handles them continues
	// this trace. Copy, so the caller's slice is not changed.
	stamped := make([]eventstore.EventData, len(events))
	copy(stamped, events)
	s.t.StampEvents(ctx, stamped)
	start := time.Now()
	res, err := s.Store.Append(ctx, streamID, expected, stamped)
	s.t.m.appendDuration.Record(ctx, seconds(start), metric.WithAttributes(attrCategory.String(category), outcome(err)))
	if err == nil {
		span.SetAttributes(attrVersion.Int64(int64(res.LastVersion)), attrPositionTx.String(res.LastPosition.String()))
		counts := map[string]int64{}
		for _, e := range events {
			counts[e.Type]++
		}
		for typ, n := range counts {
			s.t.m.appended.Add(ctx, n, metric.WithAttributes(attrCategory.String(category), attrEventType.String(typ)))
		}
	}
	endSpan(span, err)
	return res, err
}

func (s *store) ReadStream(ctx context.Context, streamID string, opts eventstore.ReadStreamOpts) ([]eventstore.Event, error) {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return s.Store.ReadStream(ctx, streamID, opts)
	}
	ctx, span := s.t.tracer.Start(ctx, "stele.read_stream", trace.WithAttributes(attrStreamID.String(streamID),
		attrCategory.String(eventstore.Category(streamID))))
	evs, err := s.Store.ReadStream(ctx, streamID, opts)
	span.SetAttributes(attrEventsRead.Int(len(evs)))
	endSpan(span, err)
	return evs, err
}
