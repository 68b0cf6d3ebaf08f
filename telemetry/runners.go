package telemetry

import (
	"context"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jmoiron/sqlx"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/outbox"
	"github.com/stele-dev/stele/projection"
	"github.com/stele-dev/stele/saga"
)

func spanCtx(spans []trace.Span) context.Context {
	if len(spans) == 0 {
		return context.Background()
	}
	return trace.ContextWithSpan(context.Background(), spans[0])
}

// projectionSpan starts the span of one event in projection name.
func (t *Telemetry) projectionSpan(ctx context.Context, name string, e eventstore.Event) (context.Context, trace.Span) {
	// The runner's context is long-lived: the event's stored context is the
	// parent, so the span joins the trace that appended the event.
	parent := t.EventContext(trace.ContextWithSpanContext(ctx, trace.SpanContext{}), e.Metadata)
	return t.tracer.Start(parent, "stele.project "+name, trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attrProjection.String(name), attrStreamID.String(e.StreamID), attrEventID.String(e.ID.String()),
			attrVersion.Int64(int64(e.Version)), attrEventType.String(e.Type), attrPositionTx.String(e.Position.String())))
}

func (t *Telemetry) projectionDone(ctx context.Context, span trace.Span, name string, start time.Time, err error) {
	attrs := metric.WithAttributes(attrProjection.String(name), outcome(err))
	t.m.projDuration.Record(ctx, seconds(start), attrs)
	t.m.projHandled.Add(ctx, 1, attrs)
	endSpan(span, err)
}

// ProjectionHandler wraps a projection.Handler: a "stele.project <name>"
// span per event, continuing the trace stored with the event.
func (t *Telemetry) ProjectionHandler(name string, h projection.Handler) projection.Handler {
	return projection.HandlerFunc(func(ctx context.Context, e eventstore.Event) error {
		ctx, span := t.projectionSpan(ctx, name, e)
		start := time.Now()
		err := h.Handle(ctx, e)
		t.projectionDone(ctx, span, name, start, err)
		return err
	})
}

// ProjectionTxHandler wraps a projection.TxHandler the same way.
func (t *Telemetry) ProjectionTxHandler(name string, h projection.TxHandler) projection.TxHandler {
	return projection.TxHandlerFunc(func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
		ctx, span := t.projectionSpan(ctx, name, e)
		start := time.Now()
		err := h.HandleTx(ctx, tx, e)
		t.projectionDone(ctx, span, name, start, err)
		return err
	})
}

// ObserveProjection reports a runner's lag and dead letters as gauges:
// stele.projection.lag {event}, stele.projection.lag.age s and
// stele.projection.dead_letters {event}, attribute stele.projection. Each
// collection reads the runner's Status (which counts the lag, up to
// projection.MaxLagCount events).
func (t *Telemetry) ObserveProjection(name string, r *projection.Runner) error {
	lag, err1 := t.meter.Int64ObservableGauge("stele.projection.lag", metric.WithUnit("{event}"),
		metric.WithDescription("Events in the feed after the projection's checkpoint (capped at 100,000)."))
	age, err2 := t.meter.Float64ObservableGauge("stele.projection.lag.age", metric.WithUnit("s"),
		metric.WithDescription("Age of the oldest event the projection has not handled."))
	dead, err3 := t.meter.Int64ObservableGauge("stele.projection.dead_letters", metric.WithUnit("{event}"),
		metric.WithDescription("Events parked after their handler failed every retry."))
	if err := firstErr(err1, err2, err3); err != nil {
		return err
	}
	_, err := t.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		st, err := r.Status(ctx)
		if err != nil {
			return err
		}
		attrs := metric.WithAttributes(attrProjection.String(name))
		o.ObserveInt64(lag, int64(st.LagEvents), attrs)
		o.ObserveFloat64(age, st.LagSeconds, attrs)
		o.ObserveInt64(dead, int64(st.DeadLetters), attrs)
		return nil
	}, lag, age, dead)
	return err
}

// ObserveRelay reports an outbox relay's backlog as gauges:
// stele.outbox.backlog {event} and stele.outbox.backlog.age s, attribute
// stele.relay.
func (t *Telemetry) ObserveRelay(name string, r *outbox.Relay) error {
	backlog, err1 := t.meter.Int64ObservableGauge("stele.outbox.backlog", metric.WithUnit("{event}"),
		metric.WithDescription("Events in the feed after the relay's checkpoint (capped at 100,000)."))
	age, err2 := t.meter.Float64ObservableGauge("stele.outbox.backlog.age", metric.WithUnit("s"),
		metric.WithDescription("Age of the oldest event the relay has not published."))
	if err := firstErr(err1, err2); err != nil {
		return err
	}
	_, err := t.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		st, err := r.Status(ctx)
		if err != nil {
			return err
		}
		attrs := metric.WithAttributes(attrRelay.String(name))
		o.ObserveInt64(backlog, int64(st.Backlog), attrs)
		o.ObserveFloat64(age, st.BacklogAge.Seconds(), attrs)
		return nil
	}, backlog, age)
	return err
}

// ObserveSagas reports how many sagas of definition are in each status:
// stele.sagas {saga}, attributes stele.saga and stele.saga.status. Each
// collection reads every saga of the definition (saga.List): collect it
// every minute or so, not every second, on a store with many sagas.
func (t *Telemetry) ObserveSagas(store eventstore.Store, definition string) error {
	g, err := t.meter.Int64ObservableGauge("stele.sagas", metric.WithUnit("{saga}"),
		metric.WithDescription("Sagas by status."))
	if err != nil {
		return err
	}
	_, err = t.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		all, err := saga.List(ctx, store, definition, "")
		if err != nil {
			return err
		}
		counts := map[saga.Status]int64{saga.Running: 0, saga.Compensating: 0, saga.Completed: 0, saga.Compensated: 0, saga.NeedsAttention: 0}
		for _, in := range all {
			counts[in.Status]++
		}
		for s, n := range counts {
			o.ObserveInt64(g, n, metric.WithAttributes(attrSaga.String(definition), attrSagaStatus.String(string(s))))
		}
		return nil
	}, g)
	return err
}

// Saga returns def with every step's actions traced: a "stele.saga.step
// <step>" span (or "stele.saga.compensate <step>") per attempt, continuing
// the trace of the event that started the saga. A Send action's command
// carries the span's context, so the service that handles it continues the
// trace too. It also counts stele.saga.steps.
func (t *Telemetry) Saga(def saga.Definition) saga.Definition {
	steps := make([]saga.Step, len(def.Steps))
	for i, s := range def.Steps {
		s.Action = t.action(def.Name, s.Name, false, s.Action)
		s.Compensation = t.action(def.Name, s.Name, true, s.Compensation)
		steps[i] = s
	}
	def.Steps = steps
	return def
}

func (t *Telemetry) action(definition, step string, undo bool, a saga.Action) saga.Action {
	name := "stele.saga.step " + step
	if undo {
		name = "stele.saga.compensate " + step
	}
	start := func(ctx context.Context, sc saga.StepContext) (context.Context, trace.Span) {
		parent := t.EventContext(trace.ContextWithSpanContext(ctx, trace.SpanContext{}), eventstore.Metadata{TraceParent: sc.TraceParent, TraceState: sc.TraceState})
		return t.tracer.Start(parent, name, trace.WithAttributes(attrSaga.String(definition), attrStep.String(step),
			attrUndo.Bool(undo), attrSagaID.String(sc.SagaID), attrAttempt.Int(sc.Attempt)))
	}
	done := func(ctx context.Context, span trace.Span, err error) {
		t.m.steps.Add(ctx, 1, metric.WithAttributes(attrSaga.String(definition), attrStep.String(step), attrUndo.Bool(undo), outcome(err)))
		endSpan(span, err)
	}
	switch {
	case a.DoFunc() != nil:
		do := a.DoFunc()
		return saga.Do(func(ctx context.Context, sc saga.StepContext) ([]byte, error) {
			ctx, span := start(ctx, sc)
			out, err := do(ctx, sc)
			done(ctx, span, err)
			return out, err
		})
	case a.SendFunc() != nil:
		send := a.SendFunc()
		return saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
			ctx, span := start(context.Background(), sc)
			topic, msg, err := send(sc)
			if err == nil && msg != nil {
				if msg.Metadata == nil {
					msg.Metadata = message.Metadata{}
				}
				t.prop.Inject(ctx, MetadataCarrier(msg.Metadata)) // the command continues this trace
				span.SetAttributes(attrTopic.String(topic))
			}
			done(ctx, span, err)
			return topic, msg, err
		})
	}
	return a
}

func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// maxBatchLinks caps the links of a batch span.
const maxBatchLinks = 128

// ProjectionBatchTxHandler wraps a projection.BatchTxHandler: one
// "stele.project.batch <name>" span per batch. A batch serves many business
// actions, so its span is linked to the trace of each event in it (up to 128)
// instead of being the child of one. stele.projection.handled counts its
// events; the per-event duration histogram is left to per-event handlers.
func (t *Telemetry) ProjectionBatchTxHandler(name string, h projection.BatchTxHandler) projection.BatchTxHandler {
	return batchTx{t: t, name: name, h: h}
}

type batchTx struct {
	t    *Telemetry
	name string
	h    projection.BatchTxHandler
}

func (b batchTx) HandleBatchTx(ctx context.Context, tx *sqlx.Tx, events []eventstore.Event) error {
	links := make([]trace.Link, 0, min(len(events), maxBatchLinks))
	for _, e := range events[:min(len(events), maxBatchLinks)] {
		if sc := trace.SpanContextFromContext(b.t.EventContext(context.Background(), e.Metadata)); sc.IsValid() {
			links = append(links, trace.Link{SpanContext: sc})
		}
	}
	attrs := []attribute.KeyValue{attrProjection.String(b.name), attrEvents.Int(len(events))}
	if len(events) > 0 {
		attrs = append(attrs, attrPositionTx.String(events[len(events)-1].Position.String()))
	}
	ctx, span := b.t.tracer.Start(trace.ContextWithSpanContext(ctx, trace.SpanContext{}), "stele.project.batch "+b.name,
		trace.WithSpanKind(trace.SpanKindConsumer), trace.WithLinks(links...), trace.WithAttributes(attrs...))
	err := b.h.HandleBatchTx(ctx, tx, events)
	b.t.m.projHandled.Add(ctx, int64(len(events)), metric.WithAttributes(attrProjection.String(b.name), outcome(err)))
	endSpan(span, err)
	return err
}
