package telemetry

import (
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Attribute keys. Those marked "span" never go on a metric.
var (
	attrCategory   = attribute.Key("stele.category")
	attrEventType  = attribute.Key("stele.event_type")
	attrOutcome    = attribute.Key("stele.outcome") // ok, conflict, error, canceled
	attrProjection = attribute.Key("stele.projection")
	attrRelay      = attribute.Key("stele.relay")
	attrHandler    = attribute.Key("stele.handler")
	attrSaga       = attribute.Key("stele.saga")
	attrSagaStatus = attribute.Key("stele.saga.status")
	attrStep       = attribute.Key("stele.step")
	attrUndo       = attribute.Key("stele.compensating")
	attrTopic      = attribute.Key("messaging.destination.name")

	attrStreamID   = attribute.Key("stele.stream_id")          // span
	attrEventID    = attribute.Key("stele.event_id")           // span
	attrVersion    = attribute.Key("stele.stream_version")     // span
	attrEvents     = attribute.Key("stele.event_count")        // span
	attrEventsRead = attribute.Key("stele.events_read")        // span
	attrMessageID  = attribute.Key("messaging.message.id")     // span
	attrSagaID     = attribute.Key("stele.saga.id")            // span
	attrAttempt    = attribute.Key("stele.attempt")            // span
	attrOperation  = attribute.Key("messaging.operation.type") // span
	attrExpected   = attribute.Key("stele.expected_version")   // span
	attrPositionTx = attribute.Key("stele.position")           // span
)

// instruments is the metric catalogue (docs/observability.md lists it; the
// tests check names, units and attributes against it).
type instruments struct {
	appended       metric.Int64Counter     // stele.events.appended {event}: category, event type
	appendDuration metric.Float64Histogram // stele.append.duration s: category, outcome

	projHandled  metric.Int64Counter     // stele.projection.handled {event}: projection, outcome
	projDuration metric.Float64Histogram // stele.projection.handle.duration s: projection, outcome

	published       metric.Int64Counter     // stele.outbox.published {message}: relay, topic, outcome
	publishDuration metric.Float64Histogram // stele.outbox.publish.duration s: relay, topic, outcome
	deliveryLatency metric.Float64Histogram // stele.outbox.latency s: relay, topic (append to broker confirmation)

	handled        metric.Int64Counter     // stele.bus.handled {message}: handler, outcome (one per attempt)
	retries        metric.Int64Counter     // stele.bus.retries {attempt}: handler
	handleDuration metric.Float64Histogram // stele.bus.handle.duration s: handler, outcome

	steps metric.Int64Counter // stele.saga.steps {attempt}: saga, step, compensating, outcome
}

// The gauges (Observe*) are made where they are registered:
//
//	stele.projection.lag {event}, stele.projection.lag.age s,
//	stele.projection.dead_letters {event}: projection
//	stele.outbox.backlog {event}, stele.outbox.backlog.age s: relay
//	stele.sagas {saga}: saga, saga status
//	stele.postgres.oldest_transaction.age s: none

func newInstruments(m metric.Meter) (instruments, error) {
	var in instruments
	var errs []error
	counter := func(name, unit, desc string) metric.Int64Counter {
		c, err := m.Int64Counter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return c
	}
	hist := func(name, desc string) metric.Float64Histogram {
		h, err := m.Float64Histogram(name, metric.WithUnit("s"), metric.WithDescription(desc),
			metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
		errs = append(errs, err)
		return h
	}
	in.appended = counter("stele.events.appended", "{event}", "Events appended to the store.")
	in.appendDuration = hist("stele.append.duration", "Time an Append call took.")
	in.projHandled = counter("stele.projection.handled", "{event}", "Events a projection handler was given.")
	in.projDuration = hist("stele.projection.handle.duration", "Time a projection handler took for one event.")
	in.published = counter("stele.outbox.published", "{message}", "Messages the outbox relay published.")
	in.publishDuration = hist("stele.outbox.publish.duration", "Time a Publish call took until the broker confirmed.")
	in.deliveryLatency = hist("stele.outbox.latency", "Time from an event's append to the broker's confirmation of its message.")
	in.handled = counter("stele.bus.handled", "{message}", "Attempts of a bus handler, by outcome.")
	in.retries = counter("stele.bus.retries", "{attempt}", "Attempts of a bus handler after the first for the same message.")
	in.handleDuration = hist("stele.bus.handle.duration", "Time one attempt of a bus handler took.")
	in.steps = counter("stele.saga.steps", "{attempt}", "Attempts of saga steps and compensations, by outcome (for a command step: building the command).")
	for _, err := range errs {
		if err != nil {
			return in, err
		}
	}
	return in, nil
}
