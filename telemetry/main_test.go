package telemetry_test

import (
	"context"
	"log/slog"
	"os"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/telemetry"
)

func TestMain(m *testing.M) { testdb.VerifyMain(m) }

var quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))

// observed is a Telemetry over in-memory exporters.
type observed struct {
	tel    *telemetry.Telemetry
	tp     *sdktrace.TracerProvider
	spans  *tracetest.SpanRecorder
	reader *sdkmetric.ManualReader
}

func newObserved(t *testing.T) *observed {
	t.Helper()
	o := &observed{spans: tracetest.NewSpanRecorder(), reader: sdkmetric.NewManualReader()}
	o.tp = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(o.spans))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(o.reader))
	t.Cleanup(func() {
		_ = o.tp.Shutdown(context.Background())
		_ = mp.Shutdown(context.Background())
	})
	var err error
	if o.tel, err = telemetry.New(telemetry.Config{TracerProvider: o.tp, MeterProvider: mp}); err != nil {
		t.Fatal(err)
	}
	return o
}

// tracer is the application's own, for the spans a test starts.
func (o *observed) tracer() trace.Tracer { return o.tp.Tracer("stele-test") }

func (o *observed) ended() []sdktrace.ReadOnlySpan { return o.spans.Ended() }

func (o *observed) collect(t *testing.T) metricdata.ResourceMetrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := o.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	return rm
}

// metrics returns the collected metrics by name.
func metrics(rm metricdata.ResourceMetrics) map[string]metricdata.Metrics {
	out := map[string]metricdata.Metrics{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			out[m.Name] = m
		}
	}
	return out
}

// point is one data point: its attributes and its value (a sum, a gauge's
// value, or a histogram's count).
type point struct {
	attrs map[string]string
	value float64
}

func points(m metricdata.Metrics) []point {
	var out []point
	conv := func(kvs []attribute.KeyValue) map[string]string {
		attrs := map[string]string{}
		for _, kv := range kvs {
			attrs[string(kv.Key)] = kv.Value.Emit()
		}
		return attrs
	}
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		for _, p := range d.DataPoints {
			out = append(out, point{conv(p.Attributes.ToSlice()), float64(p.Value)})
		}
	case metricdata.Sum[float64]:
		for _, p := range d.DataPoints {
			out = append(out, point{conv(p.Attributes.ToSlice()), p.Value})
		}
	case metricdata.Gauge[int64]:
		for _, p := range d.DataPoints {
			out = append(out, point{conv(p.Attributes.ToSlice()), float64(p.Value)})
		}
	case metricdata.Gauge[float64]:
		for _, p := range d.DataPoints {
			out = append(out, point{conv(p.Attributes.ToSlice()), p.Value})
		}
	case metricdata.Histogram[float64]:
		for _, p := range d.DataPoints {
			out = append(out, point{conv(p.Attributes.ToSlice()), float64(p.Count)})
		}
	}
	return out
}
