package telemetry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jmoiron/sqlx"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/testsvc"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/outbox"
	"github.com/stele-dev/stele/projection"
	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/telemetry"
)

// journey is what one business action left behind: every span, the metrics
// collected after it, and what the test saw on the way.
type journey struct {
	spans   []sdktrace.ReadOnlySpan
	metrics metricdata.ResourceMetrics
	command trace.SpanContext
	stream  string
	topic   string // the public topic on RabbitMQ
	cmd     string // the saga's command topic
	canary  string
	// seen by the handlers
	billed     []trace.SpanContext // the span in the handler's context, per attempt
	billedMsg  *message.Message
	logs       bytes.Buffer
	msgIDs     []string
	projected  int
	mailerSpan trace.SpanContext
}

// runJourney places an order inside a "place order" command span, over
// PostgreSQL and RabbitMQ: the traced store appends it; an outbox relay
// publishes it to RabbitMQ through the traced publisher; a billing handler
// behind the telemetry middleware takes it (failing its first attempt); two
// projections (a Handler and a TxHandler) apply it; and a saga it starts
// runs a local step and a command step whose command goes over a GoChannel
// bus to a mailer service that replies. It waits for all of that, stops
// everything, and collects.
func runJourney(t *testing.T) *journey {
	t.Helper()
	testsvc.Require(t, "RabbitMQ", testsvc.HostPort(testsvc.AMQPURL))
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	o := newObserved(t)
	tel := o.tel
	j := &journey{stream: "order-42", canary: testsvc.Name("canary-"), topic: testsvc.Name("telemetry.events."),
		cmd: testsvc.Name("telemetry.mailer.")}

	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	pg, err := pgstore.New(db, &pgstore.Config{Schema: schema, PollInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close()
	store := tel.Store(pg)

	rabbit, err := broker.Open(ctx, broker.Config{URL: testsvc.AMQPURL, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer rabbit.Close()
	t.Cleanup(func() { deleteAMQP(j.topic, "billing") })
	local, err := broker.Open(ctx, broker.Config{Kind: broker.GoChannel, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()

	// The consumer on the other side of RabbitMQ. Its first attempt fails,
	// so the router retries it. It logs through LogHandler.
	logger := slog.New(telemetry.LogHandler(slog.NewJSONHandler(&j.logs, nil)))
	var mu sync.Mutex
	billing, _, err := bus.NewRouter(bus.RouterConfig{Retry: bus.RetryPolicy{Initial: 5 * time.Millisecond}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	billing.AddMiddleware(tel.Middleware)
	sub, err := rabbit.Subscriber("billing")
	if err != nil {
		t.Fatal(err)
	}
	billing.AddConsumerHandler("billing", j.topic, sub, func(msg *message.Message) error {
		mu.Lock()
		defer mu.Unlock()
		j.billed = append(j.billed, trace.SpanContextFromContext(msg.Context()))
		if len(j.billed) == 1 {
			return errors.New("billing is busy")
		}
		j.billedMsg = msg.Copy()
		logger.InfoContext(msg.Context(), "billed", "stream", msg.Metadata.Get(bus.KeyStreamID))
		return nil
	})

	// The mailer service the saga sends a command to; it replies with its
	// message's context, so the reply continues the trace.
	mailer, _, err := bus.NewRouter(bus.RouterConfig{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	mailer.AddMiddleware(tel.Middleware)
	mailSub, err := local.Subscriber("mailer")
	if err != nil {
		t.Fatal(err)
	}
	replyPub := tel.Publisher(local.Publisher(), "mailer")
	mailer.AddConsumerHandler("mailer", j.cmd, mailSub, func(msg *message.Message) error {
		mu.Lock()
		j.mailerSpan = trace.SpanContextFromContext(msg.Context())
		mu.Unlock()
		reply := message.NewMessage("", []byte("mail sent"))
		reply.SetContext(msg.Context())
		return bus.Reply(replyPub, msg, reply)
	})

	var wg sync.WaitGroup
	rctx, stopRouters := context.WithCancel(ctx)
	for _, r := range []*message.Router{billing, mailer} {
		wg.Go(func() { _ = r.Run(rctx) })
		<-r.Running()
	}
	defer func() { stopRouters(); _ = billing.Close(); _ = mailer.Close(); wg.Wait() }()

	// Two read models of the same events.
	list, err := projection.NewRunner(pg, tel.ProjectionHandler("order_list", projection.HandlerFunc(
		func(ctx context.Context, e eventstore.Event) error {
			mu.Lock()
			j.projected++
			mu.Unlock()
			return nil
		})), projection.Config{Name: "order_list", Category: "order", Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	totals, err := projection.NewRunner(pg, tel.ProjectionTxHandler("order_totals", projection.TxHandlerFunc(
		func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
			_, err := tx.ExecContext(ctx, `SELECT 1`)
			return err
		})), projection.Config{Name: "order_totals", Category: "order", DB: db, Schema: schema, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}

	// The saga the order starts.
	def := saga.Definition{Name: "fulfil", StartedBy: "order.placed", Category: "order", Steps: []saga.Step{
		{Name: "reserve", Action: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) { return []byte("reserved"), nil })},
		{Name: "notify", Action: saga.Send(func(saga.StepContext) (string, *message.Message, error) {
			return j.cmd, message.NewMessage("", []byte(`{"mail":"order placed"}`)), nil
		})},
	}}
	replies, err := local.Subscriber("fulfil")
	if err != nil {
		t.Fatal(err)
	}
	sagas, err := saga.NewRunner(store, tel.Saga(def), saga.Config{Publisher: tel.Publisher(local.Publisher(), "saga.fulfil"),
		Subscriber: replies, RescanInterval: 50 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}

	relay, err := outbox.NewRelay(store, outbox.Config{Name: "public", Publisher: tel.Publisher(rabbit.Publisher(), "public"),
		Topic: j.topic, Categories: []string{"order"}, DB: db, Schema: schema, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{tel.ObserveProjection("order_list", list), tel.ObserveRelay("public", relay),
		tel.ObserveSagas(store, "fulfil"), tel.ObservePostgres(db)} {
		if err != nil {
			t.Fatal(err)
		}
	}

	for _, start := range []func(context.Context) error{list.Start, totals.Start, sagas.Start} {
		if err := start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for _, stop := range []func(context.Context) error{list.Stop, totals.Stop, sagas.Stop} {
			_ = stop(context.Background())
		}
	}()
	relayCtx, stopRelay := context.WithCancel(ctx)
	wg.Go(func() { _ = relay.Run(relayCtx) })
	defer stopRelay()

	// The command.
	cctx, command := o.tracer().Start(ctx, "place order", trace.WithSpanKind(trace.SpanKindServer))
	j.command = command.SpanContext()
	data, _ := json.Marshal(map[string]any{"customer": "Ada", "secret": j.canary})
	if _, err := store.Append(cctx, j.stream, eventstore.NoStream, []eventstore.EventData{{Type: "order.placed", Data: data,
		Metadata: eventstore.Metadata{CorrelationID: "c-42", Keys: map[string]string{"note": j.canary}}}}); err != nil {
		t.Fatal(err)
	}
	command.End()

	wait.Until(t, "billed, projected twice and the saga completed", func() bool {
		mu.Lock()
		done := j.billedMsg != nil && j.projected == 1
		mu.Unlock()
		if !done {
			return false
		}
		totalsSt, err := totals.Status(ctx)
		if err != nil || totalsSt.LagEvents != 0 {
			return false
		}
		in, err := saga.Load(ctx, pg, "fulfil", j.stream)
		return err == nil && in.Status == saga.Completed
	})
	// The relay's checkpoint moves after the publish returns.
	wait.Until(t, "the relay checkpointed", func() bool {
		st, err := relay.Status(ctx)
		return err == nil && st.Backlog == 0 && st.Published == 1
	})
	stopRelay()
	stopRouters()
	_ = billing.Close()
	_ = mailer.Close()
	for _, stop := range []func(context.Context) error{list.Stop, totals.Stop, sagas.Stop} {
		if err := stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()

	j.spans = o.ended()
	j.metrics = o.collect(t)
	for _, s := range j.spans {
		if id := attr(s, "messaging.message.id"); id != "" {
			j.msgIDs = append(j.msgIDs, id)
		}
	}
	return j
}

// deleteAMQP removes the queue and exchange a test made on the shared
// RabbitMQ.
func deleteAMQP(topic, group string) {
	conn, err := amqp091.Dial(testsvc.AMQPURL)
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	_, _ = ch.QueueDelete(topic+"_"+group, false, false, false)
	_ = ch.ExchangeDelete(topic, false, false)
}

func attr(s sdktrace.ReadOnlySpan, key string) string {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == key {
			return kv.Value.Emit()
		}
	}
	return ""
}

func attrKeys(s sdktrace.ReadOnlySpan) []string {
	var keys []string
	for _, kv := range s.Attributes() {
		keys = append(keys, string(kv.Key))
	}
	slices.Sort(keys)
	return keys
}

// find returns the spans named name whose attributes include want.
func find(spans []sdktrace.ReadOnlySpan, name string, want map[string]string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
next:
	for _, s := range spans {
		if s.Name() != name {
			continue
		}
		for k, v := range want {
			if attr(s, k) != v {
				continue next
			}
		}
		out = append(out, s)
	}
	return out
}

func one(t *testing.T, spans []sdktrace.ReadOnlySpan, name string, want map[string]string) sdktrace.ReadOnlySpan {
	t.Helper()
	got := find(spans, name, want)
	if len(got) != 1 {
		t.Fatalf("%d spans %q with %v, want 1; spans:\n%s", len(got), name, want, describe(spans))
	}
	return got[0]
}

func describe(spans []sdktrace.ReadOnlySpan) string {
	var b strings.Builder
	for _, s := range spans {
		fmt.Fprintf(&b, "  %s %s parent %s %s %v\n", s.SpanContext().SpanID(), s.Name(), s.Parent().SpanID(), s.SpanKind(), s.Attributes())
	}
	return b.String()
}

// TestBusinessActionAcrossRabbitMQ follows one order from its command to
// the consumer on the other side of RabbitMQ, two read models and the saga
// it starts, and checks the trace, the metrics, and that nothing of the
// event's payload or metadata leaked into either.
func TestBusinessActionAcrossRabbitMQ(t *testing.T) {
	j := runJourney(t)
	var tree strings.Builder
	exp := telemetry.NewTreeExporter(&tree)
	_ = exp.ExportSpans(context.Background(), j.spans)
	_ = exp.Shutdown(context.Background())
	t.Logf("the journey's trace:\n%s", tree.String())
	t.Run("one trace", func(t *testing.T) { checkTrace(t, j) })
	t.Run("metrics", func(t *testing.T) { checkMetrics(t, j) })
	t.Run("no canary", func(t *testing.T) { checkCanary(t, j) })
	t.Run("logs carry the trace", func(t *testing.T) {
		var rec map[string]any
		if err := json.Unmarshal(j.logs.Bytes(), &rec); err != nil {
			t.Fatalf("%v: %s", err, j.logs.String())
		}
		last := j.billed[len(j.billed)-1]
		if rec["trace_id"] != j.command.TraceID().String() || rec["span_id"] != last.SpanID().String() {
			t.Errorf("log record %v, want trace_id %s and span_id %s (the handler's span)", rec, j.command.TraceID(), last.SpanID())
		}
	})
}

func checkTrace(t *testing.T, j *journey) {
	spans := j.spans
	// Every span belongs to the command's trace: nothing started a trace
	// of its own on the way.
	for _, s := range spans {
		if s.SpanContext().TraceID() != j.command.TraceID() {
			t.Errorf("span %s is in trace %s, not the command's %s", s.Name(), s.SpanContext().TraceID(), j.command.TraceID())
		}
	}
	if t.Failed() {
		t.Fatalf("spans:\n%s", describe(spans))
	}
	byID := map[trace.SpanID]sdktrace.ReadOnlySpan{}
	for _, s := range spans {
		byID[s.SpanContext().SpanID()] = s
	}
	parentOf := func(s sdktrace.ReadOnlySpan) sdktrace.ReadOnlySpan { return byID[s.Parent().SpanID()] }
	childOf := func(child, parent sdktrace.ReadOnlySpan) {
		t.Helper()
		if child.Parent().SpanID() != parent.SpanContext().SpanID() {
			p := "nothing recorded"
			if ps := parentOf(child); ps != nil {
				p = ps.Name()
			}
			t.Errorf("%s is a child of %s, want %s", child.Name(), p, parent.Name())
		}
	}
	kind := func(s sdktrace.ReadOnlySpan, want trace.SpanKind) {
		t.Helper()
		if s.SpanKind() != want {
			t.Errorf("%s is a %s span, want %s", s.Name(), s.SpanKind(), want)
		}
	}
	keys := func(s sdktrace.ReadOnlySpan, want ...string) {
		t.Helper()
		slices.Sort(want)
		if got := attrKeys(s); !slices.Equal(got, want) {
			t.Errorf("%s has attributes %v, want %v", s.Name(), got, want)
		}
	}

	command := one(t, spans, "place order", nil)
	appendSpan := one(t, spans, "stele.append", map[string]string{"stele.stream_id": j.stream})
	childOf(appendSpan, command)
	kind(appendSpan, trace.SpanKindProducer)
	keys(appendSpan, "stele.stream_id", "stele.category", "stele.event_count", "stele.expected_version",
		"stele.stream_version", "stele.position")
	if attr(appendSpan, "stele.category") != "order" || attr(appendSpan, "stele.event_count") != "1" ||
		attr(appendSpan, "stele.expected_version") != "no stream" || attr(appendSpan, "stele.stream_version") != "1" {
		t.Errorf("append attributes %v", appendSpan.Attributes())
	}

	publish := one(t, spans, "stele.publish "+j.topic, nil)
	childOf(publish, appendSpan)
	kind(publish, trace.SpanKindProducer)
	keys(publish, "messaging.destination.name", "messaging.message.id", "stele.relay", "messaging.operation.type", "stele.stream_id")
	if attr(publish, "stele.relay") != "public" || attr(publish, "stele.stream_id") != j.stream ||
		attr(publish, "messaging.operation.type") != "publish" || attr(publish, "messaging.message.id") != j.billedMsg.UUID {
		t.Errorf("publish attributes %v", publish.Attributes())
	}
	// The message crossed RabbitMQ carrying the publish span's context.
	if tp := j.billedMsg.Metadata.Get("traceparent"); !strings.Contains(tp, publish.SpanContext().SpanID().String()) {
		t.Errorf("the consumer got traceparent %q, want the publish span %s", tp, publish.SpanContext().SpanID())
	}

	handles := find(spans, "stele.handle billing", nil)
	if len(handles) != 2 {
		t.Fatalf("%d billing handle spans, want one per attempt (2)", len(handles))
	}
	slices.SortFunc(handles, func(a, b sdktrace.ReadOnlySpan) int { return a.StartTime().Compare(b.StartTime()) })
	for i, h := range handles {
		childOf(h, publish)
		kind(h, trace.SpanKindConsumer)
		keys(h, "stele.handler", "messaging.destination.name", "messaging.message.id", "stele.attempt",
			"messaging.operation.type", "stele.stream_id")
		if attr(h, "stele.attempt") != fmt.Sprint(i+1) || attr(h, "messaging.destination.name") != j.topic ||
			attr(h, "messaging.operation.type") != "process" || attr(h, "stele.stream_id") != j.stream {
			t.Errorf("handle attempt %d attributes %v", i+1, h.Attributes())
		}
		// The handler ran inside its span.
		if j.billed[i].SpanID() != h.SpanContext().SpanID() {
			t.Errorf("attempt %d: the handler's context holds span %s, want %s", i+1, j.billed[i].SpanID(), h.SpanContext().SpanID())
		}
	}
	if handles[0].Status().Description != "billing is busy" || len(handles[0].Events()) != 1 || handles[1].Status().Code != 0 {
		t.Errorf("attempt 1 status %v events %d, attempt 2 status %v: want the first failed and recorded, the second unset",
			handles[0].Status(), len(handles[0].Events()), handles[1].Status())
	}

	for _, name := range []string{"order_list", "order_totals"} {
		p := one(t, spans, "stele.project "+name, nil)
		childOf(p, appendSpan)
		kind(p, trace.SpanKindConsumer)
		keys(p, "stele.projection", "stele.stream_id", "stele.event_id", "stele.stream_version", "stele.event_type", "stele.position")
		if attr(p, "stele.projection") != name || attr(p, "stele.stream_id") != j.stream || attr(p, "stele.event_type") != "order.placed" ||
			attr(p, "stele.event_id") != j.billedMsg.UUID || attr(p, "stele.position") != attr(appendSpan, "stele.position") {
			t.Errorf("project %s attributes %v", name, p.Attributes())
		}
	}

	sagaID := map[string]string{"stele.saga.id": j.stream}
	reserve := one(t, spans, "stele.saga.step reserve", sagaID)
	notify := one(t, spans, "stele.saga.step notify", sagaID)
	for _, s := range []sdktrace.ReadOnlySpan{reserve, notify} {
		childOf(s, appendSpan)
		kind(s, trace.SpanKindInternal)
		if attr(s, "stele.saga") != "fulfil" || attr(s, "stele.compensating") != "false" || attr(s, "stele.attempt") != "1" {
			t.Errorf("%s attributes %v", s.Name(), s.Attributes())
		}
	}
	keys(reserve, "stele.saga", "stele.step", "stele.compensating", "stele.saga.id", "stele.attempt")
	keys(notify, "stele.saga", "stele.step", "stele.compensating", "stele.saga.id", "stele.attempt", "messaging.destination.name")
	// The command leaves through the saga's relay, continuing the step; the
	// mailer's span continues the command; its reply continues the mailer.
	command2 := one(t, spans, "stele.publish "+j.cmd, map[string]string{"stele.relay": "saga.fulfil"})
	childOf(command2, notify)
	mail := one(t, spans, "stele.handle mailer", nil)
	childOf(mail, command2)
	if j.mailerSpan.SpanID() != mail.SpanContext().SpanID() {
		t.Errorf("the mailer's context holds span %s, want %s", j.mailerSpan.SpanID(), mail.SpanContext().SpanID())
	}
	reply := one(t, spans, "stele.publish saga.fulfil.replies", map[string]string{"stele.relay": "mailer"})
	childOf(reply, mail)
	// The saga's own appends join the trace: those it makes for the
	// started event under the order's append, the outcome of the command
	// under the reply.
	sagaAppends := find(spans, "stele.append", map[string]string{"stele.stream_id": saga.StreamID("fulfil", j.stream)})
	if len(sagaAppends) < 4 {
		t.Errorf("%d appends to the saga's stream, want at least 4", len(sagaAppends))
	}
	underReply := 0
	for _, a := range sagaAppends {
		switch a.Parent().SpanID() {
		case appendSpan.SpanContext().SpanID():
		case reply.SpanContext().SpanID():
			underReply++
		default:
			t.Errorf("a saga append is a child of %v, want the order's append or the reply", parentOf(a))
		}
	}
	if underReply != 1 {
		t.Errorf("%d saga appends under the reply, want 1 (the command's outcome)", underReply)
	}
	if t.Failed() {
		t.Logf("spans:\n%s", describe(spans))
	}
}

// catalogue is the metric catalogue: name, unit, kind and attribute keys.
var catalogue = map[string]struct {
	unit, kind string
	keys       []string
}{
	"stele.events.appended":                 {"{event}", "counter", []string{"stele.category", "stele.event_type"}},
	"stele.append.duration":                 {"s", "histogram", []string{"stele.category", "stele.outcome"}},
	"stele.projection.handled":              {"{event}", "counter", []string{"stele.projection", "stele.outcome"}},
	"stele.projection.handle.duration":      {"s", "histogram", []string{"stele.projection", "stele.outcome"}},
	"stele.outbox.published":                {"{message}", "counter", []string{"stele.relay", "messaging.destination.name", "stele.outcome"}},
	"stele.outbox.publish.duration":         {"s", "histogram", []string{"stele.relay", "messaging.destination.name", "stele.outcome"}},
	"stele.outbox.latency":                  {"s", "histogram", []string{"stele.relay", "messaging.destination.name"}},
	"stele.bus.handled":                     {"{message}", "counter", []string{"stele.handler", "stele.outcome"}},
	"stele.bus.retries":                     {"{attempt}", "counter", []string{"stele.handler"}},
	"stele.bus.handle.duration":             {"s", "histogram", []string{"stele.handler", "stele.outcome"}},
	"stele.saga.steps":                      {"{attempt}", "counter", []string{"stele.saga", "stele.step", "stele.compensating", "stele.outcome"}},
	"stele.projection.lag":                  {"{event}", "gauge", []string{"stele.projection"}},
	"stele.projection.lag.age":              {"s", "gauge", []string{"stele.projection"}},
	"stele.projection.dead_letters":         {"{event}", "gauge", []string{"stele.projection"}},
	"stele.outbox.backlog":                  {"{event}", "gauge", []string{"stele.relay"}},
	"stele.outbox.backlog.age":              {"s", "gauge", []string{"stele.relay"}},
	"stele.sagas":                           {"{saga}", "gauge", []string{"stele.saga", "stele.saga.status"}},
	"stele.postgres.oldest_transaction.age": {"s", "gauge", nil},
}

func kindOf(m metricdata.Metrics) string {
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		if d.IsMonotonic {
			return "counter"
		}
	case metricdata.Histogram[float64]:
		return "histogram"
	case metricdata.Gauge[int64], metricdata.Gauge[float64]:
		return "gauge"
	}
	return fmt.Sprintf("%T", m.Data)
}

func checkMetrics(t *testing.T, j *journey) {
	got := metrics(j.metrics)
	if names := slices.Sorted(maps.Keys(got)); !slices.Equal(names, slices.Sorted(maps.Keys(catalogue))) {
		t.Errorf("metrics %v, want the catalogue's %v", names, slices.Sorted(maps.Keys(catalogue)))
	}
	for _, sm := range j.metrics.ScopeMetrics {
		if sm.Scope.Name != telemetry.ScopeName {
			t.Errorf("scope %q, want %q", sm.Scope.Name, telemetry.ScopeName)
		}
	}
	for name, want := range catalogue {
		m, ok := got[name]
		if !ok {
			continue
		}
		if m.Unit != want.unit || kindOf(m) != want.kind || m.Description == "" {
			t.Errorf("%s: unit %q, %s, description %q; want unit %q, %s, a description", name, m.Unit, kindOf(m), m.Description, want.unit, want.kind)
		}
		ps := points(m)
		if len(ps) == 0 {
			t.Errorf("%s: no data points", name)
		}
		for _, p := range ps {
			if keys := slices.Sorted(maps.Keys(p.attrs)); !slices.Equal(keys, slices.Sorted(slices.Values(want.keys))) {
				t.Errorf("%s: attributes %v, want keys %v", name, p.attrs, want.keys)
			}
		}
	}

	// Low cardinality: no id of a stream, event, message or saga.
	ids := append([]string{j.stream, j.billedMsg.UUID, saga.StreamID("fulfil", j.stream)}, j.msgIDs...)
	for name, m := range got {
		for _, p := range points(m) {
			for k, v := range p.attrs {
				if slices.Contains(ids, v) || strings.Contains(k, "id") || strings.Contains(k, "position") {
					t.Errorf("%s: attribute %s=%q names one thing, not a kind of thing", name, k, v)
				}
			}
		}
	}

	// What the journey did, counted.
	value := func(name string, attrs map[string]string) float64 {
		t.Helper()
		var sum float64
		found := false
	next:
		for _, p := range points(got[name]) {
			for k, v := range attrs {
				if p.attrs[k] != v {
					continue next
				}
			}
			sum += p.value
			found = true
		}
		if !found {
			t.Errorf("%s: no data point with %v; points %v", name, attrs, points(got[name]))
		}
		return sum
	}
	for _, c := range []struct {
		name  string
		attrs map[string]string
		want  float64
	}{
		{"stele.events.appended", map[string]string{"stele.category": "order", "stele.event_type": "order.placed"}, 1},
		{"stele.append.duration", map[string]string{"stele.category": "order", "stele.outcome": "ok"}, 1},
		{"stele.projection.handled", map[string]string{"stele.projection": "order_list", "stele.outcome": "ok"}, 1},
		{"stele.projection.handled", map[string]string{"stele.projection": "order_totals", "stele.outcome": "ok"}, 1},
		{"stele.projection.handle.duration", map[string]string{"stele.projection": "order_totals"}, 1},
		{"stele.outbox.published", map[string]string{"stele.relay": "public", "messaging.destination.name": j.topic, "stele.outcome": "ok"}, 1},
		{"stele.outbox.published", map[string]string{"stele.relay": "saga.fulfil", "messaging.destination.name": j.cmd}, 1},
		{"stele.outbox.publish.duration", map[string]string{"stele.relay": "public"}, 1},
		{"stele.outbox.latency", map[string]string{"stele.relay": "public", "messaging.destination.name": j.topic}, 1},
		{"stele.bus.handled", map[string]string{"stele.handler": "billing", "stele.outcome": "error"}, 1},
		{"stele.bus.handled", map[string]string{"stele.handler": "billing", "stele.outcome": "ok"}, 1},
		{"stele.bus.retries", map[string]string{"stele.handler": "billing"}, 1},
		{"stele.bus.handle.duration", map[string]string{"stele.handler": "mailer", "stele.outcome": "ok"}, 1},
		{"stele.saga.steps", map[string]string{"stele.saga": "fulfil", "stele.step": "reserve", "stele.compensating": "false", "stele.outcome": "ok"}, 1},
		{"stele.saga.steps", map[string]string{"stele.saga": "fulfil", "stele.step": "notify", "stele.outcome": "ok"}, 1},
		{"stele.projection.lag", map[string]string{"stele.projection": "order_list"}, 0},
		{"stele.projection.dead_letters", map[string]string{"stele.projection": "order_list"}, 0},
		{"stele.outbox.backlog", map[string]string{"stele.relay": "public"}, 0},
		{"stele.sagas", map[string]string{"stele.saga": "fulfil", "stele.saga.status": "completed"}, 1},
		{"stele.sagas", map[string]string{"stele.saga": "fulfil", "stele.saga.status": "running"}, 0},
	} {
		if got := value(c.name, c.attrs); got != c.want {
			t.Errorf("%s %v = %v, want %v", c.name, c.attrs, got, c.want)
		}
	}
	if n := len(points(got["stele.sagas"])); n != 5 {
		t.Errorf("stele.sagas has %d series, want one per status (5)", n)
	}
}

// checkCanary: the event's payload and its user metadata held a unique
// value, and it reached the consumer; it must be nowhere in what telemetry
// exported.
func checkCanary(t *testing.T, j *journey) {
	if !strings.Contains(string(j.billedMsg.Payload), j.canary) || j.billedMsg.Metadata.Get(bus.UserKeyPrefix+"note") != j.canary {
		t.Fatalf("the consumer did not get the canary: the test proves nothing")
	}
	spans, err := json.Marshal(tracetest.SpanStubsFromReadOnlySpans(j.spans))
	if err != nil {
		t.Fatal(err)
	}
	metricsJSON, err := json.Marshal(j.metrics)
	if err != nil {
		t.Fatal(err)
	}
	// The serialisation holds what the check looks for: attributes,
	// events, statuses, links, resources.
	for _, want := range []string{j.stream, "billing is busy", `"Links"`, `"Resource"`, "exception"} {
		if !bytes.Contains(spans, []byte(want)) {
			t.Fatalf("serialised spans lack %q: the check would be blind", want)
		}
	}
	if !bytes.Contains(metricsJSON, []byte("order.placed")) {
		t.Fatal("serialised metrics lack their attributes: the check would be blind")
	}
	if bytes.Contains(spans, []byte(j.canary)) {
		t.Errorf("a span holds the canary")
	}
	if bytes.Contains(metricsJSON, []byte(j.canary)) {
		t.Errorf("a metric holds the canary")
	}
	for _, s := range j.spans {
		for _, kv := range append(s.Attributes(), s.Resource().Attributes()...) {
			if strings.Contains(kv.Value.Emit(), j.canary) {
				t.Errorf("span %s: %s holds the canary", s.Name(), kv.Key)
			}
		}
		for _, ev := range s.Events() {
			for _, kv := range ev.Attributes {
				if strings.Contains(kv.Value.Emit(), j.canary) {
					t.Errorf("span %s, event %s: %s holds the canary", s.Name(), ev.Name, kv.Key)
				}
			}
		}
		if strings.Contains(s.Status().Description, j.canary) {
			t.Errorf("span %s: status holds the canary", s.Name())
		}
		for _, l := range s.Links() {
			for _, kv := range l.Attributes {
				if strings.Contains(kv.Value.Emit(), j.canary) {
					t.Errorf("span %s: a link holds the canary", s.Name())
				}
			}
		}
	}
}
