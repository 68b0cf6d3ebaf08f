package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

func TestMain(m *testing.M) {
	// testdb's shared pools are never closed; anything else left running
	// (the subscription, a store's committer) is a leak.
	testdb.VerifyMain(m)
}

const want = `appended order-42 v1
appended order-42 v2..v3
conflict: expected version 1, but order-42 is at version 3
stream order-42:
  order-42 v1 OrderPlaced {"customer":"c-7"}
  order-42 v2 ItemAdded {"sku":"BOOK-1","qty":2}
  order-42 v3 OrderPaid {"amount":25.9}
whole log:
  order-42 v1 OrderPlaced {"customer":"c-7"}
  order-42 v2 ItemAdded {"sku":"BOOK-1","qty":2}
  order-42 v3 OrderPaid {"amount":25.9}
  customer-7 v1 CustomerRegistered {"name":"Ada"}
live: order-42 v4 OrderShipped {"carrier":"post"}
subscription stopped
`

func checkRun(t *testing.T, store eventstore.Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out strings.Builder
	if err := run(ctx, &out, store); err != nil {
		t.Fatalf("run: %v\noutput so far:\n%s", err, out.String())
	}
	if out.String() != want {
		t.Errorf("output:\n%s\nwant:\n%s", out.String(), want)
	}
}

func TestRunMemstore(t *testing.T) {
	checkRun(t, memstore.New(nil))
}

func TestRunPostgres(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			db := testdb.Open(t, driver)
			schema := testdb.Schema(t, db)
			if _, err := pgstore.Migrate(context.Background(), db, schema); err != nil {
				t.Fatal(err)
			}
			store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close()
			checkRun(t, store)
		})
	}
}
