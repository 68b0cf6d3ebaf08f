package pgstore_test

import (
	"context"
	"fmt"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/testsvc"
)

// Open a database, migrate, and append events in the same transaction as a
// business row: both commit, or neither does. This is also how a message is
// sent reliably, because the log is the outbox.
func ExampleStore_AppendTx() {
	ctx := context.Background()
	db := sqlx.MustOpen("postgres", testdb.DSN()) // lib/pq; "pgx" works the same
	defer db.Close()
	schema := testsvc.Name("example_appendtx_") // of this run's own: the server is shared
	defer db.MustExec(`DROP SCHEMA ` + schema + ` CASCADE`)

	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		panic(err)
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		panic(err)
	}
	defer store.Close()
	db.MustExec(`CREATE TABLE ` + schema + `.orders (id text PRIMARY KEY, status text)`)

	tx := db.MustBeginTx(ctx, nil)
	tx.MustExec(`INSERT INTO `+schema+`.orders VALUES ($1, 'placed')`, "42")
	res, err := store.AppendTx(ctx, tx, "order-42", eventstore.NoStream, []eventstore.EventData{
		{Type: "order.placed", Data: []byte(`{"id":"42"}`)},
	})
	if err != nil {
		tx.Rollback()
		panic(err)
	}
	if err := tx.Commit(); err != nil {
		panic(err)
	}
	store.Notify() // wake this process's subscribers now rather than at the next poll

	events, _ := eventstore.LoadStream(ctx, store, "order-42")
	fmt.Println("appended version", res.LastVersion, "->", events[0].Type, string(events[0].Data))
	// Output: appended version 1 -> order.placed {"id":"42"}
}

// Two tenants in one schema: each has its own order-1, its own streams and
// its own feed.
// Run the application as a plain role and turn on row-level security
// (pgstore.EnableTenancy, or stele tenancy enable) so that PostgreSQL keeps
// them apart too; this example connects as a superuser, which it never
// holds back.
func ExampleStore_ForTenant() {
	ctx := context.Background()
	db := sqlx.MustOpen("postgres", testdb.DSN())
	defer db.Close()
	schema := testsvc.Name("example_tenants_") // of this run's own: the server is shared
	defer db.MustExec(`DROP SCHEMA ` + schema + ` CASCADE`)
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		panic(err)
	}
	root, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		panic(err)
	}
	defer root.Close()

	for _, tenant := range []string{"acme", "globex"} {
		store, err := root.ForTenant(tenant)
		if err != nil {
			panic(err)
		}
		if _, err := store.Append(ctx, "order-1", eventstore.NoStream, []eventstore.EventData{
			{Type: "order.placed", Data: []byte(`{"by":"` + tenant + `"}`)},
		}); err != nil {
			panic(err)
		}
		streams, _ := store.ListStreams(ctx, eventstore.ListStreamsOpts{})
		events, _ := eventstore.LoadStream(ctx, store, "order-1")
		fmt.Println(tenant, "has", len(streams), "stream:", streams[0].StreamID, "v", streams[0].Version, string(events[0].Data))
		store.Close()
	}
	// Output:
	// acme has 1 stream: order-1 v 1 {"by":"acme"}
	// globex has 1 stream: order-1 v 1 {"by":"globex"}
}
