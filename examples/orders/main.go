// Command orders is stele's flagship example: an order saga across services
// that talk over a bus. An order is placed; inventory is reserved; payment
// is charged; shipment is scheduled; the order is confirmed. When a step
// fails for good (payment declined, item out of stock), the steps already
// done are undone in reverse order and the order is cancelled. A transient
// failure (a payment gateway timeout) is retried with backoff.
//
// The saga's state is its own event stream and its commands leave through
// the log and an outbox relay (docs/sagas.md). It runs on the in-memory
// store and in-process bus by default; give --dsn and --bus for PostgreSQL
// and a broker:
//
//	go run ./examples/orders
//	go run ./examples/orders --dsn 'postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable' \
//	    --bus amqp://guest:guest@127.0.0.1:5672/
//
// With --trace it traces the run with OpenTelemetry (package telemetry) and
// prints, after the story, each order's trace as a tree: the order's
// append, the saga's steps, their commands' publishes and the services'
// handling of them, across the bus.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // driver "postgres"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/telemetry"
)

func main() {
	dsn := flag.String("dsn", "", "PostgreSQL URL (default: the in-memory store)")
	schema := flag.String("schema", "", "PostgreSQL schema (default: a new one, orders_<random>)")
	busURL := flag.String("bus", "gochannel", "the bus: gochannel, postgres://…, amqp://…, nats://…, redis://… or kafka://…")
	traced := flag.Bool("trace", false, "print each order's trace (OpenTelemetry spans) after the story")
	flag.Parse()

	ctx := context.Background()
	env, err := open(ctx, *dsn, *schema, *busURL)
	if err != nil {
		log.Fatal(err)
	}
	var tp *sdktrace.TracerProvider
	if *traced {
		// Spans are kept in memory and printed as trees when the provider
		// shuts down; a service would export them to a collector instead.
		tp = sdktrace.NewTracerProvider(sdktrace.WithSyncer(telemetry.NewTreeExporter(os.Stdout)))
		env.tracing = tp
	}
	err = run(ctx, os.Stdout, env)
	env.close()
	if tp != nil {
		fmt.Println()
		if serr := tp.Shutdown(ctx); serr != nil && err == nil {
			err = serr
		}
	}
	if err != nil {
		log.Fatal(err)
	}
}

// env is where the example runs: a store, a bus, and for PostgreSQL the
// pool and schema.
type env struct {
	prefix string // put before every topic name (tests isolate themselves with it)
	store  eventstore.Store
	bus    *broker.Broker
	db     *sqlx.DB
	schema string
	close  func()
	// tracing, when set, traces the run: the store, the saga, its
	// publisher and the services' router get the telemetry decorators.
	tracing trace.TracerProvider
}

func open(ctx context.Context, dsn, schema, busURL string) (*env, error) {
	busCfg, err := broker.ParseURL(busURL)
	if err != nil {
		return nil, err
	}
	busCfg.Logger = slog.New(slog.DiscardHandler)
	e := &env{close: func() {}}
	if dsn == "" {
		e.store = memstore.New(nil)
	} else {
		if schema == "" {
			b := make([]byte, 4)
			_, _ = rand.Read(b)
			schema = "orders_" + hex.EncodeToString(b)
		}
		db, err := sqlx.Open("postgres", dsn)
		if err != nil {
			return nil, err
		}
		if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
			db.Close()
			return nil, err
		}
		store, err := pgstore.New(db, &pgstore.Config{Schema: schema, PollInterval: 20 * time.Millisecond})
		if err != nil {
			db.Close()
			return nil, err
		}
		e.store, e.db, e.schema = store, db, schema
		e.close = func() { store.Close(); db.Close() }
		if busCfg.Kind == broker.Postgres && busCfg.URL == dsn {
			busCfg.Schema = schema
		}
	}
	if e.bus, err = broker.Open(ctx, busCfg); err != nil {
		e.close()
		return nil, err
	}
	closeStore := e.close
	e.close = func() { e.bus.Close(); closeStore() }
	return e, nil
}

// OrderPlaced starts the saga; OrderConfirmed and OrderCancelled end the
// order's own story.
type (
	OrderPlaced struct {
		Customer string `json:"customer"`
		Item     string `json:"item"`
		Qty      int    `json:"qty"`
		Amount   int    `json:"amount"`
		Card     string `json:"card"`
	}
	OrderClosed struct {
		Reason string `json:"reason,omitempty"`
	}
)

// Definition is the order saga; its commands go to topics named with prefix.
func Definition(store eventstore.Store, prefix string) saga.Definition {
	send := func(topic, action string) saga.Action {
		return saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
			var o OrderPlaced
			if err := json.Unmarshal(sc.Input, &o); err != nil {
				return "", nil, bus.Permanent(err)
			}
			cmd, _ := json.Marshal(Command{Action: action, Order: sc.SagaID, Item: o.Item, Qty: o.Qty, Amount: o.Amount, Card: o.Card})
			return prefix + topic, message.NewMessage("", cmd), nil
		})
	}
	return saga.Definition{
		Name:      "order_fulfilment",
		StartedBy: "order.placed",
		Category:  "order",
		Steps: []saga.Step{
			{Name: "accept_order", Action: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) {
				return []byte("order accepted"), nil
			}), Compensation: closeOrder(store, "order.cancelled")},
			{Name: "reserve_inventory", Action: send(InventoryTopic, "reserve"), Compensation: send(InventoryTopic, "release")},
			{Name: "charge_payment", Action: send(PaymentsTopic, "charge"), Compensation: send(PaymentsTopic, "refund")},
			{Name: "schedule_shipment", Action: send(ShippingTopic, "schedule")},
			{Name: "confirm_order", Action: closeOrder(store, "order.confirmed")},
		},
		StepTimeout: 5 * time.Second,
		Retry:       saga.RetryPolicy{MaxAttempts: 4, Initial: 50 * time.Millisecond, Max: time.Second},
	}
}

// closeOrder appends the order's last event. Its id is derived from the
// step's idempotency key, so running it again appends nothing new.
func closeOrder(store eventstore.Store, typ string) saga.Action {
	return saga.Do(func(ctx context.Context, sc saga.StepContext) ([]byte, error) {
		data, _ := json.Marshal(OrderClosed{})
		id := uuid.NewSHA1(uuid.NameSpaceURL, []byte(sc.Key))
		if _, err := store.Append(ctx, sc.SagaID, eventstore.Any, []eventstore.EventData{{ID: id, Type: typ, Data: data}}); err != nil {
			return nil, err
		}
		return []byte(strings.TrimPrefix(typ, "order.")), nil
	})
}

// The orders of the story.
var orders = []struct {
	id string
	OrderPlaced
}{
	{"order-1001", OrderPlaced{Customer: "Ada", Item: "book", Qty: 2, Amount: 40, Card: "4242-4242"}},
	{"order-1002", OrderPlaced{Customer: "Bob", Item: "lamp", Qty: 1, Amount: 120, Card: "4000-0002"}},
	{"order-1003", OrderPlaced{Customer: "Cy", Item: "chair", Qty: 9, Amount: 450, Card: "4242-4242"}},
	{"order-1004", OrderPlaced{Customer: "Dee", Item: "book", Qty: 1, Amount: 20, Card: "4000-0119"}},
}

func run(ctx context.Context, w io.Writer, e *env) error {
	quiet := slog.New(slog.DiscardHandler)
	// Without tracing, the decorators are left out and the command spans
	// go nowhere.
	store, def, sagaPub := e.store, Definition(e.store, e.prefix), e.bus.Publisher()
	var tracer trace.Tracer = noop.NewTracerProvider().Tracer("")
	var tel *telemetry.Telemetry
	if e.tracing != nil {
		var err error
		if tel, err = telemetry.New(telemetry.Config{TracerProvider: e.tracing, MeterProvider: metricnoop.NewMeterProvider()}); err != nil {
			return err
		}
		tracer = e.tracing.Tracer("examples/orders")
		store = tel.Store(e.store)
		def = tel.Saga(Definition(store, e.prefix))
		sagaPub = tel.Publisher(sagaPub, "saga.order_fulfilment")
	}
	// The services listen first, so nothing sent to them is missed.
	inventory := &Inventory{stock: map[string]int{"book": 10, "lamp": 3, "chair": 4}, reserved: map[string]int{}}
	payments := &Payments{timedOut: map[string]bool{}, charged: map[string]int{}}
	shipping := &Shipping{}
	router, _, err := bus.NewRouter(bus.RouterConfig{Logger: quiet})
	if err != nil {
		return err
	}
	if tel != nil {
		router.AddMiddleware(tel.Middleware)
	}
	for _, s := range []struct {
		topic string
		do    func(Command) (string, error)
	}{{InventoryTopic, inventory.do}, {PaymentsTopic, payments.do}, {ShippingTopic, shipping.do}} {
		name := strings.TrimSuffix(s.topic, ".commands")
		sub, err := e.bus.Subscriber(name)
		if err != nil {
			return err
		}
		svc := &service{name: name, pub: e.bus.Publisher(), do: s.do, answers: map[string]answer{}}
		router.AddConsumerHandler(name, e.prefix+s.topic, sub, svc.handle)
	}
	rctx, stopRouter := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = router.Run(rctx) })
	defer func() { stopRouter(); _ = router.Close(); wg.Wait() }()
	<-router.Running()

	replies, err := e.bus.Subscriber("order_fulfilment")
	if err != nil {
		return err
	}
	// The runner keeps its own appends untraced: the services' replies
	// carry no trace context, so the outcomes it records would each start
	// a trace of their own.
	runner, err := saga.NewRunner(e.store, def, saga.Config{
		Publisher: sagaPub, Subscriber: replies, DB: e.db, Schema: e.schema,
		ReplyTopic:     e.prefix + "saga.order_fulfilment.replies",
		RescanInterval: 100 * time.Millisecond, Logger: quiet})
	if err != nil {
		return err
	}
	if err := runner.Start(ctx); err != nil {
		return err
	}
	defer runner.Stop(context.WithoutCancel(ctx))

	for _, o := range orders {
		data, _ := json.Marshal(o.OrderPlaced)
		cctx, span := tracer.Start(ctx, "place order "+o.id)
		_, err := store.Append(cctx, o.id, eventstore.NoStream, []eventstore.EventData{{Type: "order.placed", Data: data}})
		span.End()
		if err != nil {
			return fmt.Errorf("placing %s: %w", o.id, err)
		}
		fmt.Fprintf(w, "placed %s: %s orders %d %s for %d, card %s\n", o.id, o.Customer, o.Qty, o.Item, o.Amount, o.Card)
	}

	sagas, err := waitForSagas(ctx, e.store)
	if err != nil {
		return err
	}
	for _, o := range orders {
		fmt.Fprintf(w, "\n%s (%s):\n", o.id, o.Customer)
		printStory(w, sagas[o.id])
	}
	fmt.Fprintf(w, "\nstock left: book %d, lamp %d, chair %d\n", inventory.stock["book"], inventory.stock["lamp"], inventory.stock["chair"])
	var charged []string
	for id, n := range payments.charged {
		if n != 0 {
			charged = append(charged, fmt.Sprintf("%s %d", id, n))
		}
	}
	sort.Strings(charged)
	fmt.Fprintf(w, "money kept: %s\n", strings.Join(charged, ", "))
	sort.Strings(shipping.scheduled)
	fmt.Fprintf(w, "parcels booked: %s\n", strings.Join(shipping.scheduled, ", "))
	return nil
}

// waitForSagas waits until every order's saga has ended.
func waitForSagas(ctx context.Context, store eventstore.Store) (map[string]*saga.Instance, error) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		out := map[string]*saga.Instance{}
		for _, o := range orders {
			in, err := saga.Load(ctx, store, "order_fulfilment", o.id)
			if err != nil && !errors.Is(err, saga.ErrNoSaga) {
				return nil, err
			}
			if in != nil && in.Status.Done() {
				out[o.id] = in
			}
		}
		if len(out) == len(orders) {
			return out, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("only %d of %d sagas ended within 60s", len(out), len(orders))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// printStory tells a saga's history in words.
func printStory(w io.Writer, in *saga.Instance) {
	for _, h := range in.History {
		what := strings.ReplaceAll(h.Step, "_", " ")
		detail := strings.TrimPrefix(h.Detail, "bus: the responder failed: ")
		switch {
		case h.Type == "step_started" && h.Attempt > 1:
			fmt.Fprintf(w, "  %s: attempt %d\n", what, h.Attempt)
		case h.Type == "step_succeeded" && h.Compensating:
			fmt.Fprintf(w, "  undone  %s: %s\n", what, detail)
		case h.Type == "step_succeeded":
			fmt.Fprintf(w, "  done    %s: %s\n", what, detail)
		case h.Type == "step_failed":
			fmt.Fprintf(w, "  failed  %s: %s\n", what, detail)
		case h.Type == "compensating":
			fmt.Fprintln(w, "  undoing what was done, last first")
		case h.Type == "completed", h.Type == "compensated", h.Type == "needs_attention":
			fmt.Fprintf(w, "  => %s\n", strings.ReplaceAll(h.Type, "_", " "))
		}
	}
}
