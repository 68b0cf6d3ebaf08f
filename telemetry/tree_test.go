package telemetry_test

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/telemetry"
)

// TestTreeExporter: each trace is printed as a tree on Shutdown, traces and
// siblings in the order they started (not the order they ended), with
// durations, the key attributes and errors.
func TestTreeExporter(t *testing.T) {
	var out strings.Builder
	exp := telemetry.NewTreeExporter(&out)
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	tr := tp.Tracer("test")
	t0 := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)
	at := func(ms float64) time.Time { return t0.Add(time.Duration(ms * float64(time.Millisecond))) }
	span := func(ctx context.Context, name string, from, to float64, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
		ctx, s := tr.Start(ctx, name, trace.WithTimestamp(at(from)), trace.WithAttributes(attrs...))
		return ctx, s
	}
	end := func(s trace.Span, to float64) { s.End(trace.WithTimestamp(at(to))) }

	// A second trace that starts later but is exported first.
	_, late := span(context.Background(), "stele.append", 50, 50.2, attribute.String("stele.stream_id", "order-2"))
	end(late, 50.2)

	ctx, cmd := span(context.Background(), "place order", 0, 10)
	actx, appendSpan := span(ctx, "stele.append", 1, 2, attribute.String("stele.stream_id", "order-1"),
		attribute.Int64("stele.stream_version", 1), attribute.String("stele.event_count", "1"))
	// Children ended out of order.
	_, step := span(actx, "stele.saga.step charge", 5, 7, attribute.String("stele.step", "charge"),
		attribute.String("stele.saga.id", "order-1"), attribute.Int("stele.attempt", 2), attribute.Bool("stele.compensating", false))
	step.RecordError(errors.New("card declined"))
	step.SetStatus(codes.Error, "card declined")
	pctx, pub := span(actx, "stele.publish orders.events", 3, 4.5, attribute.String("messaging.destination.name", "orders.events"))
	_, handle := span(pctx, "stele.handle billing", 4, 1504, attribute.String("stele.handler", "billing"),
		attribute.String("messaging.destination.name", "orders.events"), attribute.Int("stele.attempt", 1))
	_, undo := span(actx, "stele.saga.compensate reserve", 8, 8.0004, attribute.Bool("stele.compensating", true))
	_, undone := span(actx, "stele.project undone", 9, 9.5, attribute.Bool("stele.compensating", true))
	end(undone, 9.5)
	end(step, 7)
	end(handle, 1504)
	end(pub, 4.5)
	end(undo, 8.0004)
	end(appendSpan, 2)
	end(cmd, 10)

	// A span whose parent was not recorded (it came over the wire).
	remote := trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{2}, TraceFlags: trace.FlagsSampled, Remote: true})
	_, orphan := span(trace.ContextWithRemoteSpanContext(context.Background(), remote), "stele.handle mailer", 20, 21)
	end(orphan, 21)

	if out.Len() != 0 {
		t.Fatalf("printed before Shutdown: %q", out.String())
	}
	if err := tp.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := regexp.MustCompile(`trace [0-9a-f]{32}`).ReplaceAllString(out.String(), "trace T")
	want := `trace T (7 spans)
place order  10ms
└─ stele.append  1ms stream=order-1 v=1
   ├─ stele.publish orders.events  1.5ms
   │  └─ stele.handle billing  1.5s topic=orders.events
   ├─ stele.saga.step charge  2ms saga=order-1 attempt=2 error="card declined"
   ├─ stele.saga.compensate reserve  400ns
   └─ stele.project undone  500µs compensating

trace T (1 span)
stele.handle mailer  1ms

trace T (1 span)
stele.append  200µs stream=order-2
`
	if got != want {
		t.Errorf("printed:\n%s\nwant:\n%s", got, want)
	}
	if !strings.Contains(out.String(), "trace 01000000000000000000000000000000") {
		t.Errorf("the remote parent's trace id is missing:\n%s", out.String())
	}

	// Spans after Shutdown are dropped, and a second Shutdown prints nothing.
	n := out.Len()
	if err := exp.ExportSpans(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if err := exp.Shutdown(context.Background()); err != nil || out.Len() != n {
		t.Errorf("second Shutdown: %v, printed %q", err, out.String()[n:])
	}
}
