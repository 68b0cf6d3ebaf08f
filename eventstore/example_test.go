package eventstore_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
)

// Append events with an expected version; a stale writer gets a conflict that
// says where the stream really is.
func Example_append() {
	ctx := context.Background()
	store := memstore.New(nil) // or pgstore.New(db, nil): same behaviour

	res, err := store.Append(ctx, "order-42", eventstore.NoStream, []eventstore.EventData{
		{Type: "order.placed", Data: []byte(`{"sku":"tea","qty":2}`),
			Metadata: eventstore.Metadata{CorrelationID: "req-7"}},
		{Type: "order.paid", Data: []byte(`{"amount":9}`)},
	})
	if err != nil {
		panic(err)
	}
	fmt.Printf("order-42 now at version %d\n", res.LastVersion)

	// Someone who read version 1 tries to write.
	_, err = store.Append(ctx, "order-42", eventstore.Exact(1), []eventstore.EventData{{Type: "order.cancelled"}})
	var conflict *eventstore.ConcurrencyError
	if errors.Is(err, eventstore.ErrConcurrencyConflict) && errors.As(err, &conflict) {
		fmt.Printf("conflict: expected %s, stream is at %d\n", conflict.Expected, conflict.Actual)
	}
	// Output:
	// order-42 now at version 2
	// conflict: expected version 1, stream is at 2
}

// Read one stream, or the whole log in global order from a checkpoint.
func Example_read() {
	ctx := context.Background()
	store := memstore.New(nil)
	store.Append(ctx, "order-1", eventstore.NoStream, []eventstore.EventData{{Type: "order.placed"}, {Type: "order.paid"}})
	store.Append(ctx, "user-1", eventstore.NoStream, []eventstore.EventData{{Type: "user.registered"}})
	store.Append(ctx, "order-2", eventstore.NoStream, []eventstore.EventData{{Type: "order.placed"}})

	events, _ := eventstore.LoadStream(ctx, store, "order-1")
	for _, e := range events {
		fmt.Println("stream:", e.StreamID, e.Version, e.Type)
	}
	// Everything in the category "order", a page at a time.
	for e, err := range eventstore.IterAll(ctx, store, eventstore.ReadAllOpts{Category: "order"}) {
		if err != nil {
			panic(err)
		}
		fmt.Println("category:", e.StreamID, e.Version, e.Type)
	}
	// Output:
	// stream: order-1 1 order.placed
	// stream: order-1 2 order.paid
	// category: order-1 1 order.placed
	// category: order-1 2 order.paid
	// category: order-2 1 order.placed
}

// Subscribe catches up on the log, then follows it live; keep the last
// position you handled and pass it as After to resume.
func Example_subscribe() {
	ctx, cancel := context.WithCancel(context.Background())
	store := memstore.New(nil)
	store.Append(ctx, "order-1", eventstore.NoStream, []eventstore.EventData{{Type: "order.placed"}})

	seen := 0
	err := eventstore.Subscribe(ctx, store, eventstore.SubscribeOpts{After: eventstore.Start},
		func(ctx context.Context, e eventstore.Event) error {
			fmt.Println(e.StreamID, e.Version, e.Type)
			if seen++; seen == 1 {
				// Caught up; this one arrives live.
				go store.Append(ctx, "order-1", eventstore.Exact(1), []eventstore.EventData{{Type: "order.shipped"}})
			} else {
				cancel()
			}
			return nil
		})
	fmt.Println("stopped:", errors.Is(err, context.Canceled))
	// Output:
	// order-1 1 order.placed
	// order-1 2 order.shipped
	// stopped: true
}
