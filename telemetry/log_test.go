package telemetry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/telemetry"
)

// TestLogHandler: a record logged with a context holding a span carries its
// trace_id and span_id at the top level, under groups and attributes too;
// without a span it carries neither.
func TestLogHandler(t *testing.T) {
	tp := sdktrace.NewTracerProvider()
	defer tp.Shutdown(context.Background())
	ctx, span := tp.Tracer("test").Start(context.Background(), "work")
	defer span.End()
	sc := span.SpanContext()
	remote := trace.ContextWithRemoteSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: trace.TraceID{0xaa}, SpanID: trace.SpanID{0xbb}, Remote: true}))

	for _, c := range []struct {
		name   string
		logger func(slog.Handler) *slog.Logger
		ctx    context.Context
		want   map[string]any // top-level keys, besides time, level and msg
	}{
		{"span", func(h slog.Handler) *slog.Logger { return slog.New(h) }, ctx,
			map[string]any{"k": "v", "trace_id": sc.TraceID().String(), "span_id": sc.SpanID().String()}},
		{"no span", func(h slog.Handler) *slog.Logger { return slog.New(h) }, context.Background(),
			map[string]any{"k": "v"}},
		{"remote span context", func(h slog.Handler) *slog.Logger { return slog.New(h) }, remote,
			map[string]any{"k": "v", "trace_id": trace.TraceID{0xaa}.String(), "span_id": trace.SpanID{0xbb}.String()}},
		{"with attrs", func(h slog.Handler) *slog.Logger { return slog.New(h).With("relay", "public") }, ctx,
			map[string]any{"relay": "public", "k": "v", "trace_id": sc.TraceID().String(), "span_id": sc.SpanID().String()}},
		{"in a group", func(h slog.Handler) *slog.Logger { return slog.New(h).With("a", 1).WithGroup("g").With("b", 2) }, ctx,
			map[string]any{"a": float64(1), "g": map[string]any{"b": float64(2), "k": "v"},
				"trace_id": sc.TraceID().String(), "span_id": sc.SpanID().String()}},
		{"in a group, no span", func(h slog.Handler) *slog.Logger { return slog.New(h).WithGroup("g") }, context.Background(),
			map[string]any{"g": map[string]any{"k": "v"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var buf bytes.Buffer
			c.logger(telemetry.LogHandler(slog.NewJSONHandler(&buf, nil))).InfoContext(c.ctx, "hello", "k", "v")
			var rec map[string]any
			if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
				t.Fatalf("%v: %s", err, buf.String())
			}
			delete(rec, "time")
			if rec["msg"] != "hello" || rec["level"] != "INFO" {
				t.Errorf("record %s", buf.String())
			}
			delete(rec, "msg")
			delete(rec, "level")
			got, _ := json.Marshal(rec)
			want, _ := json.Marshal(c.want)
			if !bytes.Equal(got, want) {
				t.Errorf("record %s\nwant    %s", got, want)
			}
		})
	}

	// Enabled is the wrapped handler's.
	h := telemetry.LogHandler(slog.NewJSONHandler(&bytes.Buffer{}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if h.Enabled(ctx, slog.LevelInfo) || !h.Enabled(ctx, slog.LevelWarn) {
		t.Error("Enabled does not follow the wrapped handler's level")
	}
}
