package main

import (
	"context"
	"regexp"
	"strings"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/testsvc"
	"github.com/stele-dev/stele/telemetry"
)

func TestMain(m *testing.M) { testdb.VerifyMain(m) }

const wantStory = `placed order-1001: Ada orders 2 book for 40, card 4242-4242
placed order-1002: Bob orders 1 lamp for 120, card 4000-0002
placed order-1003: Cy orders 9 chair for 450, card 4242-4242
placed order-1004: Dee orders 1 book for 20, card 4000-0119

order-1001 (Ada):
  done    accept order: order accepted
  done    reserve inventory: 2 book reserved
  done    charge payment: 40 charged
  done    schedule shipment: parcel booked for tomorrow
  done    confirm order: confirmed
  => completed

order-1002 (Bob):
  done    accept order: order accepted
  done    reserve inventory: 1 lamp reserved
  failed  charge payment: card declined
  undoing what was done, last first
  undone  reserve inventory: 1 lamp back in stock
  undone  accept order: cancelled
  => compensated

order-1003 (Cy):
  done    accept order: order accepted
  failed  reserve inventory: only 4 chair in stock
  undoing what was done, last first
  undone  accept order: cancelled
  => compensated

order-1004 (Dee):
  done    accept order: order accepted
  done    reserve inventory: 1 book reserved
  failed  charge payment: payment gateway timed out
  charge payment: attempt 2
  done    charge payment: 20 charged
  done    schedule shipment: parcel booked for tomorrow
  done    confirm order: confirmed
  => completed

stock left: book 7, lamp 3, chair 4
money kept: order-1001 40, order-1004 20
parcels booked: order-1001, order-1004
`

func story(t *testing.T, e *env) string {
	t.Helper()
	defer e.close()
	var out strings.Builder
	if err := run(context.Background(), &out, e); err != nil {
		t.Fatalf("run: %v\noutput so far:\n%s", err, out.String())
	}
	return out.String()
}

// TestStory: with nothing installed (memory store, in-process bus) the
// example tells the story the README promises.
func TestStory(t *testing.T) {
	e, err := open(context.Background(), "", "", "gochannel")
	if err != nil {
		t.Fatal(err)
	}
	if got := story(t, e); got != wantStory {
		t.Fatalf("story:\n%s\nwant:\n%s", got, wantStory)
	}
}

// TestStoryOverPostgresAndBrokers: the same story with the events and sagas
// in PostgreSQL and the services on the other side of a real broker.
func TestStoryOverPostgresAndBrokers(t *testing.T) {
	for _, c := range []struct{ name, addr, url string }{
		{"amqp", "127.0.0.1:5672", "amqp://guest:guest@127.0.0.1:5672/"},
		{"nats", "127.0.0.1:4222", "nats://127.0.0.1:4222"},
		{"postgres", "", testdb.DSN()},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.addr != "" {
				testsvc.Require(t, c.name, c.addr)
			}
			schema := testdb.Schema(t, testdb.Open(t, "postgres"))
			e, err := open(context.Background(), testdb.DSN(), schema, c.url)
			if err != nil {
				t.Fatal(err)
			}
			e.prefix = testsvc.Name("orders") + "."
			t.Cleanup(func() { dropTopics(c.name, e.prefix) })
			if got := story(t, e); got != wantStory {
				t.Fatalf("story:\n%s\nwant:\n%s", got, wantStory)
			}
		})
	}
}

// TestStoryTraced: with --trace the story is the same, and then each order's
// trace is printed as a tree: the order's append, under it the saga's steps,
// under a command step the publish of its command, and under that the
// service's handling of it on the other side of the bus.
func TestStoryTraced(t *testing.T) {
	e, err := open(context.Background(), "", "", "gochannel")
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(telemetry.NewTreeExporter(&out)))
	e.tracing = tp
	got := story(t, e)
	if got != wantStory {
		t.Fatalf("story:\n%s\nwant:\n%s", got, wantStory)
	}
	if err := tp.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	trees := strings.Split(strings.TrimSpace(out.String()), "\n\n")
	if len(trees) != len(orders) {
		t.Fatalf("%d traces, want one per order (%d):\n%s", len(trees), len(orders), out.String())
	}
	var tree string
	for _, tr := range trees {
		if strings.Contains(tr, "place order order-1001\x20") {
			tree = tr
		}
	}
	// The lines of order-1001's tree that tell the story, each with its
	// depth; each must come after the one before it, at the depth given.
	want := []struct {
		depth int
		line  string
	}{
		{0, "place order order-1001 "},
		{1, "stele.append "},
		{2, "stele.saga.step accept_order "},
		{2, "stele.saga.step reserve_inventory "},
		{3, "stele.publish inventory.commands "},
		{4, "stele.handle inventory "},
		{2, "stele.saga.step charge_payment "},
		{3, "stele.publish payments.commands "},
		{4, "stele.handle payments "},
		{2, "stele.saga.step schedule_shipment "},
		{3, "stele.publish shipping.commands "},
		{4, "stele.handle shipping "},
		{2, "stele.saga.step confirm_order "},
		{3, "stele.append "},
	}
	lines := strings.Split(tree, "\n")
	if !regexp.MustCompile(`^trace [0-9a-f]{32} \(14 spans\)$`).MatchString(lines[0]) {
		t.Errorf("header %q, want the trace id and 14 spans", lines[0])
	}
	prefix := regexp.MustCompile(`^[│├└─ ]*`)
	i := 0
	for _, l := range lines[1:] {
		p := prefix.FindString(l)
		if i < len(want) && strings.HasPrefix(l[len(p):], want[i].line) && len([]rune(p))/3 == want[i].depth {
			i++
		}
	}
	if i < len(want) {
		t.Errorf("order-1001's trace lacks %q at depth %d (after the lines before it):\n%s", want[i].line, want[i].depth, tree)
	}
	if !strings.Contains(tree, "stream=order-1001 v=1") || !strings.Contains(tree, "saga=order-1001") {
		t.Errorf("order-1001's trace lacks its stream and saga ids:\n%s", tree)
	}
}

// dropTopics removes what a run made on a shared broker: each topic's
// stream (NATS) or exchange and group queue (RabbitMQ).
func dropTopics(kind, prefix string) {
	groups := map[string]string{InventoryTopic: "inventory", PaymentsTopic: "payments", ShippingTopic: "shipping",
		"saga.order_fulfilment.replies": "order_fulfilment"}
	switch kind {
	case "nats":
		nc, err := nats.Connect(testsvc.NATSURL)
		if err != nil {
			return
		}
		defer nc.Close()
		js, err := nc.JetStream()
		if err != nil {
			return
		}
		for topic := range groups {
			_ = js.DeleteStream(broker.NATSStreamName(prefix + topic))
		}
	case "amqp":
		conn, err := amqp091.Dial(testsvc.AMQPURL)
		if err != nil {
			return
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			return
		}
		for topic, group := range groups {
			_, _ = ch.QueueDelete(broker.AMQPQueueName(prefix+topic, group), false, false, false)
			_ = ch.ExchangeDelete(prefix+topic, false, false)
		}
	}
}
