// Package telemetry adds OpenTelemetry traces and metrics to stele from the
// outside: decorators for the event store, the outbox relay's publisher,
// projection handlers and saga definitions, and Watermill middleware for
// bus handlers. The core packages import no OpenTelemetry.
//
// One business action becomes one trace: the append span's context is stored
// in each event's metadata (traceparent), the relay's publish span continues
// it and puts its own context into the message's metadata, and the consumer's
// handler span, the projection span and the saga step span continue from
// there, across any broker.
//
// Metrics carry low-cardinality attributes only (category, event type, topic,
// handler, relay, projection, saga definition, outcome); stream ids, event
// ids and message ids go on spans, never on metrics. No payload or user
// metadata goes on either. The Observe methods add gauges: projection lag,
// relay backlog, sagas by status, and the oldest PostgreSQL transaction
// holding back the global feed.
//
// LogHandler puts the trace and span ids on slog records; TreeExporter
// prints traces as trees, for examples and tests.
package telemetry

import (
	"context"
	"errors"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/eventstore"
)

// ScopeName is the instrumentation scope of every span and metric.
const ScopeName = "github.com/stele-dev/stele"

// Config says where spans and metrics go.
type Config struct {
	// TracerProvider and MeterProvider default to the global ones
	// (otel.SetTracerProvider, otel.SetMeterProvider).
	TracerProvider trace.TracerProvider
	MeterProvider  metric.MeterProvider
	// Propagator carries trace context through event and message metadata.
	// Defaults to W3C trace context plus baggage.
	Propagator propagation.TextMapPropagator
}

// Telemetry makes the decorators. Create one per process with New.
type Telemetry struct {
	tracer   trace.Tracer
	meter    metric.Meter
	prop     propagation.TextMapPropagator
	m        instruments
	attempts attempts // Middleware's, per message
}

// New returns a Telemetry over cfg's providers.
func New(cfg Config) (*Telemetry, error) {
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = otel.GetTracerProvider()
	}
	if cfg.MeterProvider == nil {
		cfg.MeterProvider = otel.GetMeterProvider()
	}
	if cfg.Propagator == nil {
		cfg.Propagator = propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
	}
	t := &Telemetry{tracer: cfg.TracerProvider.Tracer(ScopeName), meter: cfg.MeterProvider.Meter(ScopeName), prop: cfg.Propagator}
	var err error
	if t.m, err = newInstruments(t.meter); err != nil {
		return nil, err
	}
	return t, nil
}

// MetadataCarrier lets a propagator read and write W3C trace context and
// baggage in a Watermill message's metadata.
type MetadataCarrier message.Metadata

// Get implements propagation.TextMapCarrier.
func (c MetadataCarrier) Get(key string) string { return c[key] }

// Set implements propagation.TextMapCarrier.
func (c MetadataCarrier) Set(key, value string) { c[key] = value }

// Keys implements propagation.TextMapCarrier.
func (c MetadataCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// eventCarrier reads and writes an event's trace context.
type eventCarrier struct{ md *eventstore.Metadata }

func (c eventCarrier) Get(key string) string {
	switch key {
	case "traceparent":
		return c.md.TraceParent
	case "tracestate":
		return c.md.TraceState
	}
	return ""
}

func (c eventCarrier) Set(key, value string) {
	switch key {
	case "traceparent":
		c.md.TraceParent = value
	case "tracestate":
		c.md.TraceState = value
	}
}

func (c eventCarrier) Keys() []string { return []string{"traceparent", "tracestate"} }

// EventContext returns ctx carrying the trace context stored with an event,
// so work done for the event joins the trace that appended it.
func (t *Telemetry) EventContext(ctx context.Context, md eventstore.Metadata) context.Context {
	return t.prop.Extract(ctx, eventCarrier{md: &md})
}

// StampEvents stores ctx's trace context in every event that has none: what
// the Store decorator does on Append. Call it before pgstore's AppendTx,
// which the decorator cannot see.
func (t *Telemetry) StampEvents(ctx context.Context, events []eventstore.EventData) {
	for i := range events {
		if events[i].Metadata.TraceParent == "" {
			t.prop.Inject(ctx, eventCarrier{md: &events[i].Metadata})
		}
	}
}

func outcome(err error) attribute.KeyValue {
	switch {
	case err == nil:
		return attrOutcome.String("ok")
	case errors.Is(err, eventstore.ErrConcurrencyConflict):
		return attrOutcome.String("conflict")
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return attrOutcome.String("canceled")
	default:
		return attrOutcome.String("error")
	}
}

func endSpan(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

func seconds(since time.Time) float64 { return time.Since(since).Seconds() }
