package telemetry

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// TreeExporter is a span exporter for people: it keeps the spans it is
// given and, on Shutdown, prints each trace as an indented tree of span
// names, durations and a few key attributes (stream, version, event type,
// topic, saga id, attempt, errors). Traces come in the order they started,
// and so do the children of a span. It keeps every span in memory until
// Shutdown: it is for examples, tests and short command-line runs, not
// for a service.
//
//	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(telemetry.NewTreeExporter(os.Stdout)))
//	defer tp.Shutdown(ctx) // prints
type TreeExporter struct {
	mu    sync.Mutex
	w     io.Writer
	spans []treeSpan
	done  bool
}

// NewTreeExporter returns an exporter that prints to w on Shutdown.
func NewTreeExporter(w io.Writer) *TreeExporter { return &TreeExporter{w: w} }

var _ sdktrace.SpanExporter = (*TreeExporter)(nil)

type treeSpan struct {
	name       string
	sc, parent trace.SpanContext
	start, end time.Time
	attrs      []attribute.KeyValue
	status     sdktrace.Status
}

// ExportSpans keeps spans for Shutdown.
func (e *TreeExporter) ExportSpans(_ context.Context, spans []sdktrace.ReadOnlySpan) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.done {
		return nil
	}
	for _, s := range spans {
		e.spans = append(e.spans, treeSpan{name: s.Name(), sc: s.SpanContext(), parent: s.Parent(),
			start: s.StartTime(), end: s.EndTime(), attrs: s.Attributes(), status: s.Status()})
	}
	return nil
}

// Shutdown prints the traces kept so far; later spans are dropped.
func (e *TreeExporter) Shutdown(context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.done {
		return nil
	}
	e.done = true
	err := e.print()
	e.spans = nil
	return err
}

// treeAttrs are the attributes printed, with their labels, in this order.
var treeAttrs = []struct {
	key   attribute.Key
	label string
}{
	{attrStreamID, "stream"}, {attrVersion, "v"}, {attrEventType, "type"}, {attrTopic, "topic"},
	{attrHandler, "handler"}, {attrProjection, "projection"}, {attrStep, "step"}, {attrSagaID, "saga"},
	{attrAttempt, "attempt"}, {attrUndo, "compensating"},
}

func (e *TreeExporter) print() error {
	byTrace := map[trace.TraceID][]*treeSpan{}
	for i := range e.spans {
		s := &e.spans[i]
		byTrace[s.sc.TraceID()] = append(byTrace[s.sc.TraceID()], s)
	}
	type tr struct {
		id    trace.TraceID
		spans []*treeSpan
	}
	traces := make([]tr, 0, len(byTrace))
	for id, spans := range byTrace {
		slices.SortStableFunc(spans, compareSpans)
		traces = append(traces, tr{id, spans})
	}
	slices.SortFunc(traces, func(a, b tr) int {
		if c := compareSpans(a.spans[0], b.spans[0]); c != 0 {
			return c
		}
		return strings.Compare(a.id.String(), b.id.String())
	})
	var b strings.Builder
	for i, t := range traces {
		if i > 0 {
			b.WriteByte('\n')
		}
		plural := "s"
		if len(t.spans) == 1 {
			plural = ""
		}
		fmt.Fprintf(&b, "trace %s (%d span%s)\n", t.id, len(t.spans), plural)
		recorded := map[trace.SpanID]bool{}
		children := map[trace.SpanID][]*treeSpan{}
		for _, s := range t.spans {
			recorded[s.sc.SpanID()] = true
		}
		var roots []*treeSpan
		for _, s := range t.spans { // in start order, so children are too
			if p := s.parent.SpanID(); s.parent.IsValid() && recorded[p] && p != s.sc.SpanID() {
				children[p] = append(children[p], s)
			} else {
				roots = append(roots, s)
			}
		}
		var walk func(s *treeSpan, prefix, branch string)
		walk = func(s *treeSpan, prefix, branch string) {
			b.WriteString(prefix + branch)
			writeSpan(&b, s)
			next := prefix
			switch branch {
			case "├─ ":
				next += "│  "
			case "└─ ":
				next += "   "
			}
			kids := children[s.sc.SpanID()]
			for i, c := range kids {
				if i == len(kids)-1 {
					walk(c, next, "└─ ")
				} else {
					walk(c, next, "├─ ")
				}
			}
		}
		for _, r := range roots {
			walk(r, "", "")
		}
	}
	_, err := io.WriteString(e.w, b.String())
	return err
}

func compareSpans(a, b *treeSpan) int {
	if c := a.start.Compare(b.start); c != 0 {
		return c
	}
	if c := strings.Compare(a.name, b.name); c != 0 {
		return c
	}
	return strings.Compare(a.sc.SpanID().String(), b.sc.SpanID().String())
}

func writeSpan(b *strings.Builder, s *treeSpan) {
	b.WriteString(s.name)
	b.WriteString("  ")
	b.WriteString(roundDuration(s.end.Sub(s.start)).String())
	values := map[attribute.Key]attribute.Value{}
	for _, kv := range s.attrs {
		values[kv.Key] = kv.Value
	}
	for _, a := range treeAttrs {
		v, ok := values[a.key]
		if !ok {
			continue
		}
		text := v.Emit()
		switch {
		case a.key == attrAttempt && v.AsInt64() <= 1, a.key == attrUndo && !v.AsBool():
			continue // the usual case says nothing
		case a.key == attrUndo:
			if !strings.HasPrefix(s.name, "stele.saga.compensate ") {
				b.WriteString(" compensating")
			}
			continue
		case (a.key == attrTopic || a.key == attrHandler || a.key == attrProjection || a.key == attrStep) &&
			strings.HasSuffix(s.name, " "+text):
			continue // the name says it already
		}
		b.WriteString(" " + a.label + "=" + text)
	}
	if s.status.Code == codes.Error {
		b.WriteString(" error=" + strconv.Quote(s.status.Description))
	}
	b.WriteByte('\n')
}

// roundDuration keeps two or three significant digits.
func roundDuration(d time.Duration) time.Duration {
	switch {
	case d < time.Microsecond:
		return d
	case d < time.Millisecond:
		return d.Round(time.Microsecond)
	case d < time.Second:
		return d.Round(10 * time.Microsecond)
	default:
		return d.Round(10 * time.Millisecond)
	}
}
