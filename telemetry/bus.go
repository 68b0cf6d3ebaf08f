package telemetry

import (
	"errors"
	"runtime"
	"sync"
	"time"
	"weak"

	"github.com/ThreeDotsLabs/watermill/message"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/bus"
)

// publisher wraps the relay's publisher.
type publisher struct {
	message.Publisher
	t     *Telemetry
	relay string
}

// Publisher wraps the publisher an outbox relay (or anything else) publishes
// through: each message gets a "stele.publish <topic>" span that continues
// the trace stored in its metadata (the event's append), or else the one in
// its context, and the message leaves carrying this span's context, so the
// consumer's span continues it. relay names the publisher in spans and
// metrics (the relay's Config.Name, or "saga.<definition>").
func (t *Telemetry) Publisher(pub message.Publisher, relay string) message.Publisher {
	return &publisher{Publisher: pub, t: t, relay: relay}
}

func (p *publisher) Publish(topic string, msgs ...*message.Message) error {
	spans := make([]trace.Span, len(msgs))
	for i, msg := range msgs {
		if msg.Metadata == nil {
			msg.Metadata = message.Metadata{} // a struct literal: Set would panic
		}
		parent := p.t.prop.Extract(msg.Context(), MetadataCarrier(msg.Metadata))
		ctx, span := p.t.tracer.Start(parent, "stele.publish "+topic, trace.WithSpanKind(trace.SpanKindProducer),
			trace.WithAttributes(attrTopic.String(topic), attrMessageID.String(msg.UUID), attrRelay.String(p.relay),
				attrOperation.String("publish")))
		if s := msg.Metadata.Get(bus.KeyStreamID); s != "" {
			span.SetAttributes(attrStreamID.String(s))
		}
		p.t.prop.Inject(ctx, MetadataCarrier(msg.Metadata))
		spans[i] = span
	}
	start := time.Now()
	err := p.Publisher.Publish(topic, msgs...)
	attrs := metric.WithAttributes(attrRelay.String(p.relay), attrTopic.String(topic), outcome(err))
	ctx := spanCtx(spans)
	p.t.m.publishDuration.Record(ctx, seconds(start), attrs)
	p.t.m.published.Add(ctx, int64(len(msgs)), attrs)
	if err == nil {
		now := time.Now()
		latency := metric.WithAttributes(attrRelay.String(p.relay), attrTopic.String(topic))
		for _, msg := range msgs {
			if at, perr := time.Parse(time.RFC3339Nano, msg.Metadata.Get(bus.KeyRecordedAt)); perr == nil {
				p.t.m.deliveryLatency.Record(ctx, now.Sub(at).Seconds(), latency)
			}
		}
	}
	for _, span := range spans {
		endSpan(span, err)
	}
	return err
}

// attempts counts how often the router ran each message, in this process:
// its retry middleware hands the same *message.Message to every attempt.
// The count is kept beside the message, not in its metadata, where the
// poison box would store it and a re-publish carry it to the next consumer.
// An entry goes when its message is garbage collected.
type attempts struct {
	mu sync.Mutex
	n  map[weak.Pointer[message.Message]]int
}

func (a *attempts) next(msg *message.Message) int {
	key := weak.Make(msg)
	a.mu.Lock()
	if a.n == nil {
		a.n = map[weak.Pointer[message.Message]]int{}
	}
	n, seen := a.n[key]
	n++
	a.n[key] = n
	a.mu.Unlock()
	if !seen {
		runtime.AddCleanup(msg, a.forget, key)
	}
	return n
}

func (a *attempts) forget(key weak.Pointer[message.Message]) {
	a.mu.Lock()
	delete(a.n, key)
	a.mu.Unlock()
}

// Middleware is Watermill handler middleware: a "stele.handle <handler>"
// consumer span per attempt, continuing the trace in the message's metadata
// and put into the message's context for the handler, plus the bus handler
// metrics. Add it with router.AddMiddleware after bus.NewRouter, so it runs
// inside the retry and sees every attempt.
func (t *Telemetry) Middleware(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		handler := message.HandlerNameFromCtx(msg.Context())
		topic := message.SubscribeTopicFromCtx(msg.Context())
		attempt := t.attempts.next(msg)
		orig := msg.Context()
		parent := t.prop.Extract(orig, MetadataCarrier(msg.Metadata))
		ctx, span := t.tracer.Start(parent, "stele.handle "+handler, trace.WithSpanKind(trace.SpanKindConsumer),
			trace.WithAttributes(attrHandler.String(handler), attrTopic.String(topic), attrMessageID.String(msg.UUID),
				attrAttempt.Int(attempt), attrOperation.String("process")))
		if s := msg.Metadata.Get(bus.KeyStreamID); s != "" {
			span.SetAttributes(attrStreamID.String(s))
		}
		if attempt > 1 {
			t.m.retries.Add(ctx, 1, metric.WithAttributes(attrHandler.String(handler)))
		}
		start := time.Now()
		done := func(err error) {
			msg.SetContext(orig)
			attrs := metric.WithAttributes(attrHandler.String(handler), outcome(err))
			t.m.handleDuration.Record(ctx, seconds(start), attrs)
			t.m.handled.Add(ctx, 1, attrs)
			endSpan(span, err)
		}
		// A panic goes on to the router's recoverer (not recovered here,
		// so its stack keeps the handler's frames); the span still ends.
		returned := false
		defer func() {
			if !returned {
				done(errPanicked)
			}
		}()
		msg.SetContext(ctx)
		out, err := h(msg)
		returned = true
		done(err)
		return out, err
	}
}

var errPanicked = errors.New("the handler panicked")
