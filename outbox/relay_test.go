package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/outbox"
)

func runRelay(t *testing.T, r *outbox.Relay) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("relay ended with %v, want context.Canceled", err)
		}
	})
}

// TestRelayPublishesEveryEventInStreamOrder: events appended before and while
// the relay runs all reach the consumer, each stream in order, with the
// message UUID being the event id and the metadata naming the event.
func TestRelayPublishesEveryEventInStreamOrder(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	pubsub := newGoChannel(t)
	c := collect(t, pubsub, outbox.DefaultTopic)

	ids := map[string]eventstore.AppendResult{}
	var mu sync.Mutex
	appendSome := func(stream string, n int) {
		for range n {
			id := uuid.New()
			res, err := store.Append(ctx, stream, eventstore.Any, []eventstore.EventData{{ID: id, Type: "deposited", Data: []byte(`{"amount":1}`),
				Metadata: eventstore.Metadata{CorrelationID: "corr-" + stream, Keys: map[string]string{"tenant": "acme"}}}})
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			ids[id.String()] = res
			mu.Unlock()
		}
	}
	appendSome("account-0", 40) // before the relay starts: catch-up

	r, err := outbox.NewRelay(store, outbox.Config{Name: "public", Publisher: pubsub, BatchSize: 16})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	var wg sync.WaitGroup
	for i := 1; i <= 3; i++ {
		wg.Go(func() { appendSome(streamName("account", i), 50) })
	}
	wg.Wait()
	wait.Until(t, "190 deliveries", func() bool { return c.unique() == 190 })

	got := c.deliveries()
	checkStreamOrder(t, got)
	for _, d := range got {
		e, ok := ids[d.UUID]
		if !ok {
			t.Fatalf("delivered %s, which is no appended event id", d.UUID)
		}
		if d.Stream != e.StreamID || d.Version != int64(e.LastVersion) || d.Type != "deposited" ||
			d.MD.Get(bus.KeyCorrelationID) != "corr-"+e.StreamID || d.MD.Get("x-tenant") != "acme" ||
			d.MD.Get(bus.KeyPartition) != e.StreamID || d.MD.Get(bus.KeyPosition) != e.LastPosition.String() {
			t.Fatalf("message for %s v%d carries %v", e.StreamID, e.LastVersion, d.MD)
		}
	}
	wait.Until(t, "the checkpoint at the last event", func() bool {
		st, err := r.Status(ctx)
		return err == nil && st.Backlog == 0 && st.Published == 190
	})
	st, err := r.Status(ctx)
	if err != nil || st.Epoch != 1 || st.LeaseUntil.IsZero() || st.LastError != "" {
		t.Fatalf("status %+v, %v", st, err)
	}
}

// TestRelayFiltersMapsAndRoutes: only the chosen categories and types are
// published, a mapping turns events into integration messages on their own
// topic, and skipped events still move the checkpoint.
func TestRelayFiltersMapsAndRoutes(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	pubsub := newGoChannel(t)
	public := collect(t, pubsub, "public.orders")
	events := collect(t, pubsub, outbox.DefaultTopic)

	appendOne := func(stream, typ string) {
		if _, err := store.Append(ctx, stream, eventstore.Any, []eventstore.EventData{{Type: typ, Data: []byte(`{"secret":"x"}`)}}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		appendOne(streamName("order", i), "order_placed")
		appendOne(streamName("order", i), "internal_note")
		appendOne(streamName("user", i), "user_registered")
		appendOne(streamName("invoice", i), "invoice_sent")
	}
	r, err := outbox.NewRelay(store, outbox.Config{Name: "filtered", Publisher: pubsub,
		Categories: []string{"order", "invoice"}, Types: []string{"order_placed", "invoice_sent"},
		TopicFor: func(e eventstore.Event) string {
			if e.Type == "order_placed" {
				return "public.orders"
			}
			return "" // the default topic
		},
		Map: func(_ context.Context, e eventstore.Event) (*message.Message, error) {
			if e.Type == "invoice_sent" {
				return bus.ToMessage(e), nil // as it is
			}
			msg := message.NewMessage("", []byte(`{"order":"`+e.StreamID+`"}`))
			msg.Metadata.Set(bus.KeyEventType, "OrderPlacedV1")
			return msg, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	wait.Until(t, "10 public orders and 10 invoices", func() bool { return public.unique() == 10 && events.unique() == 10 })
	wait.Until(t, "no backlog", func() bool { st, err := r.Status(ctx); return err == nil && st.Backlog == 0 })
	for _, d := range public.deliveries() {
		if d.Type != "OrderPlacedV1" || string(d.Payload) != `{"order":"`+d.Stream+`"}` || d.Version != 1 {
			t.Fatalf("integration message %+v", d)
		}
		if _, err := uuid.Parse(d.UUID); err != nil {
			t.Fatalf("mapped message has UUID %q, want the event id", d.UUID)
		}
	}
	for _, d := range events.deliveries() {
		if d.Type != "invoice_sent" {
			t.Fatalf("the default topic got %s", d.Type)
		}
	}
	if st, _ := r.Status(ctx); st.Published != 20 {
		t.Fatalf("published %d, want 20", st.Published)
	}
}

// TestRelayMapErrorStopsIt: a mapping that fails is a bug retrying cannot fix;
// Run returns it and the checkpoint stays before the event.
func TestRelayMapErrorStopsIt(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	pubsub := newGoChannel(t)
	if _, err := store.Append(ctx, "order-1", eventstore.Any, []eventstore.EventData{{Type: "a", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("no mapping for a")
	r, err := outbox.NewRelay(store, outbox.Config{Name: "m", Publisher: pubsub,
		Map: func(context.Context, eventstore.Event) (*message.Message, error) { return nil, boom }})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(ctx); !errors.Is(err, boom) {
		t.Fatalf("Run = %v, want the mapping error", err)
	}
	if st, _ := r.Status(ctx); st.Backlog != 1 || st.Published != 0 {
		t.Fatalf("status %+v, want the event still in the backlog", st)
	}
}

func TestRelayConfigErrors(t *testing.T) {
	store := memstore.New(nil)
	pubsub := newGoChannel(t)
	for _, c := range []struct {
		cfg   outbox.Config
		field string
	}{
		{outbox.Config{Publisher: pubsub}, "Name"},
		{outbox.Config{Name: "Bad Name", Publisher: pubsub}, "Name"},
		{outbox.Config{Name: "ok"}, "Publisher"},
		{outbox.Config{Name: "ok", Publisher: pubsub, LeaseTTL: time.Millisecond}, "LeaseTTL"},
	} {
		_, err := outbox.NewRelay(store, c.cfg)
		var ce *outbox.ConfigError
		if !errors.As(err, &ce) || ce.Field != c.field {
			t.Errorf("%+v: got %v, want a ConfigError on %s", c.cfg, err, c.field)
		}
	}
}

// pgSetup gives a migrated schema, a store on it, and the pool.
func pgSetup(t *testing.T, cfg *pgstore.Config) (*pgstore.Store, string) {
	t.Helper()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(context.Background(), db, schema); err != nil {
		t.Fatal(err)
	}
	if cfg == nil {
		cfg = &pgstore.Config{}
	}
	cfg.Schema = schema
	cfg.PollInterval = 20 * time.Millisecond
	store, err := pgstore.New(db, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	return store, schema
}

// TestRelayPublishesOnlyCommittedTransactions: events appended with business
// rows in a transaction are relayed when it commits and never when it rolls
// back; there is no second write to forget.
func TestRelayPublishesOnlyCommittedTransactions(t *testing.T) {
	ctx := context.Background()
	store, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	testdb.Exec(t, db, `CREATE TABLE "`+schema+`".orders (id text PRIMARY KEY)`)
	pubsub := newGoChannel(t)
	c := collect(t, pubsub, outbox.DefaultTopic)
	r, err := outbox.NewRelay(store, outbox.Config{Name: "tx", Publisher: pubsub, DB: db, Schema: schema, BatchSize: 7})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)

	committed := map[string]bool{}
	for i := range 40 {
		tx, err := db.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("order-%d", i)
		if _, err := tx.ExecContext(ctx, `INSERT INTO "`+schema+`".orders VALUES ($1)`, id); err != nil {
			t.Fatal(err)
		}
		eventID := uuid.New()
		if _, err := store.AppendTx(ctx, tx, id, eventstore.NoStream, []eventstore.EventData{{ID: eventID, Type: "order_placed", Data: []byte(`{}`)}}); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			_ = tx.Rollback()
			continue
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		committed[eventID.String()] = true
	}
	store.Notify()
	wait.Until(t, "every committed order relayed", func() bool { return c.unique() == len(committed) })
	// The relay has passed every commit; nothing rolled back can come later.
	wait.Until(t, "no backlog", func() bool { st, err := r.Status(ctx); return err == nil && st.Backlog == 0 })
	for _, d := range c.deliveries() {
		if !committed[d.UUID] {
			t.Fatalf("relayed %s (%s), which was rolled back", d.UUID, d.Stream)
		}
	}
	sts, err := outbox.ReadStatus(ctx, store, db, schema, "")
	if err != nil || len(sts) != 1 || sts[0].Name != "tx" || sts[0].Published != int64(len(committed)) || sts[0].LastPublishAt.IsZero() {
		t.Fatalf("ReadStatus = %+v, %v", sts, err)
	}
}
