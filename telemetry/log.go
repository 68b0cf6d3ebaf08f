package telemetry

import (
	"context"
	"log/slog"

	"go.opentelemetry.io/otel/trace"
)

// LogHandler wraps a slog.Handler so that every record logged with a
// context that holds a span carries trace_id and span_id, at the top level
// even under a logger's groups. stele logs with the context of the work at
// hand, so its logs line up with the traces.
func LogHandler(h slog.Handler) slog.Handler { return &logHandler{base: h, h: h} }

// logHandler keeps the handler it wraps (base) and what WithAttrs and
// WithGroup did to it since (ops), so that under a group it can put the
// trace ids on base, before the group opens.
type logHandler struct {
	base    slog.Handler
	h       slog.Handler // base with ops applied
	ops     []func(slog.Handler) slog.Handler
	grouped bool
}

func (l *logHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return l.h.Enabled(ctx, level)
}

func (l *logHandler) Handle(ctx context.Context, r slog.Record) error {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return l.h.Handle(ctx, r)
	}
	ids := []slog.Attr{slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String())}
	if !l.grouped {
		r.AddAttrs(ids...)
		return l.h.Handle(ctx, r)
	}
	h := l.base.WithAttrs(ids)
	for _, op := range l.ops {
		h = op(h)
	}
	return h.Handle(ctx, r)
}

func (l *logHandler) with(op func(slog.Handler) slog.Handler, group bool) *logHandler {
	return &logHandler{base: l.base, h: op(l.h), ops: append(l.ops[:len(l.ops):len(l.ops)], op), grouped: l.grouped || group}
}

func (l *logHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return l
	}
	return l.with(func(h slog.Handler) slog.Handler { return h.WithAttrs(attrs) }, false)
}

func (l *logHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return l
	}
	return l.with(func(h slog.Handler) slog.Handler { return h.WithGroup(name) }, true)
}
