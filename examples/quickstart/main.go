// Command quickstart tours the core of stele's event store: appending with
// expected versions, catching a concurrency conflict, reading a stream and the
// whole log, and subscribing to new events.
//
// It runs on the in-memory store by default; give --dsn to use PostgreSQL:
//
//	go run ./examples/quickstart --dsn 'postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable'
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // driver "postgres"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

func main() {
	dsn := flag.String("dsn", "", "PostgreSQL URL (default: the in-memory store)")
	schema := flag.String("schema", "quickstart", "PostgreSQL schema to keep the events in")
	flag.Parse()

	ctx := context.Background()
	store, closeStore, err := open(ctx, *dsn, *schema)
	if err != nil {
		log.Fatal(err)
	}
	err = run(ctx, os.Stdout, store)
	closeStore()
	if err != nil {
		log.Fatal(err)
	}
}

func open(ctx context.Context, dsn, schema string) (eventstore.Store, func(), error) {
	if dsn == "" {
		return memstore.New(nil), func() {}, nil
	}
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		return nil, nil, err
	}
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		db.Close()
		return nil, nil, err
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		db.Close()
		return nil, nil, err
	}
	closeAll := func() { store.Close(); db.Close() }
	// The tour starts from an empty order-42, and events cannot be deleted.
	v, err := store.StreamVersion(ctx, "order-42")
	if err == nil && v > 0 {
		err = fmt.Errorf("schema %s holds the events of an earlier run; pass a new --schema", schema)
	}
	if err != nil {
		closeAll()
		return nil, nil, err
	}
	return store, closeAll, nil
}

func event(typ, data string) eventstore.EventData {
	return eventstore.EventData{Type: typ, Data: []byte(data)}
}

func run(ctx context.Context, w io.Writer, store eventstore.Store) error {
	// A new stream: NoStream makes the append fail if someone created it first.
	res, err := store.Append(ctx, "order-42", eventstore.NoStream, []eventstore.EventData{
		event("OrderPlaced", `{"customer":"c-7"}`),
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "appended order-42 v%d\n", res.LastVersion)

	// Later appends say which version they decided on; both events go in
	// together or not at all.
	res, err = store.Append(ctx, "order-42", eventstore.Exact(1), []eventstore.EventData{
		event("ItemAdded", `{"sku":"BOOK-1","qty":2}`),
		event("OrderPaid", `{"amount":25.9}`),
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "appended order-42 v%d..v%d\n", res.FirstVersion, res.LastVersion)

	// A writer that still believes the stream is at version 1 is refused.
	_, err = store.Append(ctx, "order-42", eventstore.Exact(1), []eventstore.EventData{
		event("OrderCancelled", `{}`),
	})
	var conflict *eventstore.ConcurrencyError
	if !errors.Is(err, eventstore.ErrConcurrencyConflict) || !errors.As(err, &conflict) {
		return fmt.Errorf("want a concurrency conflict, got %v", err)
	}
	fmt.Fprintf(w, "conflict: expected %s, but %s is at version %d\n", conflict.Expected, conflict.StreamID, conflict.Actual)

	res, err = store.Append(ctx, "customer-7", eventstore.NoStream, []eventstore.EventData{
		event("CustomerRegistered", `{"name":"Ada"}`),
	})
	if err != nil {
		return err
	}

	fmt.Fprintln(w, "stream order-42:")
	events, err := eventstore.LoadStream(ctx, store, "order-42")
	if err != nil {
		return err
	}
	for _, e := range events {
		printEvent(w, "  ", e)
	}

	// The global feed holds every stream's events in one order. The last
	// position read is a checkpoint to continue from.
	if err := eventstore.WaitForPosition(ctx, store, res.LastPosition); err != nil {
		return err
	}
	fmt.Fprintln(w, "whole log:")
	var checkpoint eventstore.Position
	for e, err := range eventstore.IterAll(ctx, store, eventstore.ReadAllOpts{}) {
		if err != nil {
			return err
		}
		printEvent(w, "  ", e)
		checkpoint = e.Position
	}

	// Subscribe catches up from the checkpoint, then waits for new events.
	subCtx, stop := context.WithCancel(ctx)
	defer stop()
	live := make(chan eventstore.Event)
	done := make(chan error, 1)
	go func() {
		done <- eventstore.Subscribe(subCtx, store, eventstore.SubscribeOpts{After: checkpoint},
			func(ctx context.Context, e eventstore.Event) error {
				select {
				case live <- e:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			})
	}()

	if _, err := store.Append(ctx, "order-42", eventstore.Exact(3), []eventstore.EventData{
		event("OrderShipped", `{"carrier":"post"}`),
	}); err != nil {
		return err
	}
	select {
	case e := <-live:
		printEvent(w, "live: ", e)
	case err := <-done:
		return fmt.Errorf("subscription ended early: %w", err)
	}

	stop()
	if err := <-done; !errors.Is(err, context.Canceled) {
		return fmt.Errorf("subscription: %w", err)
	}
	fmt.Fprintln(w, "subscription stopped")
	return nil
}

func printEvent(w io.Writer, prefix string, e eventstore.Event) {
	fmt.Fprintf(w, "%s%s v%d %s %s\n", prefix, e.StreamID, e.Version, e.Type, e.Data)
}
