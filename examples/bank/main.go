// Command bank is the worked example of docs/aggregates.md: an Account
// aggregate with an overdraft rule, deposits, withdrawals and transfers
// between accounts, with snapshots every 50 events, and a read model of
// balances fed by a projection (readmodel.go, docs/projections.md).
//
// It runs on the in-memory store by default; give --dsn to use PostgreSQL:
//
//	go run ./examples/bank
//	go run ./examples/bank --dsn 'postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable'
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

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/aggregate/pgsnapshot"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

func main() {
	dsn := flag.String("dsn", "", "PostgreSQL URL (default: the in-memory store)")
	schema := flag.String("schema", "bank", "PostgreSQL schema to keep the events and snapshots in")
	flag.Parse()

	ctx := context.Background()
	store, snaps, closeStore, err := open(ctx, *dsn, *schema)
	if err != nil {
		log.Fatal(err)
	}
	err = run(ctx, os.Stdout, store, snaps)
	closeStore()
	if err != nil {
		log.Fatal(err)
	}
}

func open(ctx context.Context, dsn, schema string) (eventstore.Store, aggregate.SnapshotStore, func(), error) {
	if dsn == "" {
		return memstore.New(nil), aggregate.NewMemorySnapshots(), func() {}, nil
	}
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		return nil, nil, nil, err
	}
	// Migrate creates the snapshots table beside the events.
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		db.Close()
		return nil, nil, nil, err
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		db.Close()
		return nil, nil, nil, err
	}
	closeAll := func() { store.Close(); db.Close() }
	snaps, err := pgsnapshot.New(db, schema)
	if err == nil {
		// The demo opens its accounts, and events cannot be deleted.
		var v eventstore.Version
		if v, err = store.StreamVersion(ctx, "account-ada"); err == nil && v > 0 {
			err = fmt.Errorf("schema %s holds the accounts of an earlier run; pass a new --schema", schema)
		}
	}
	if err != nil {
		closeAll()
		return nil, nil, nil, err
	}
	return store, snaps, closeAll, nil
}

func run(ctx context.Context, w io.Writer, store eventstore.Store, snaps aggregate.SnapshotStore) error {
	bank, err := NewBank(store, snaps)
	if err != nil {
		return err
	}
	// The read model follows the log from the start, live.
	balances, readModel, err := StartReadModel(ctx, store)
	if err != nil {
		return err
	}
	defer balances.Stop(context.WithoutCancel(ctx))

	for _, a := range []struct {
		id, owner        string
		overdraft, first int
	}{
		{"ada", "Ada Lovelace", 0, 500},
		{"bob", "Bob Bitdiddle", 100, 200},
		{"cy", "Cy D. Fect", 0, 50},
	} {
		if err := bank.Open(ctx, a.id, a.owner, a.overdraft, a.first); err != nil {
			return err
		}
		fmt.Fprintf(w, "opened %s for %s with %d (overdraft limit %d)\n", a.id, a.owner, a.first, a.overdraft)
	}

	if err := bank.Deposit(ctx, "cy", 300, "salary-1"); err != nil {
		return err
	}
	fmt.Fprintln(w, "deposited 300 to cy")
	if err := bank.Withdraw(ctx, "cy", 50, "atm-1"); err != nil {
		return err
	}
	fmt.Fprintln(w, "withdrew 50 from cy")

	for _, t := range []struct {
		id, from, to string
		amount       int
	}{
		{"t-1", "ada", "bob", 120},
		{"t-2", "bob", "cy", 300},
		{"t-3", "bob", "ada", 100}, // bob goes overdrawn, within his limit
		{"t-4", "ada", "cy", 600},  // more than ada has
	} {
		err := bank.Transfer(ctx, t.id, t.from, t.to, t.amount)
		switch {
		case errors.Is(err, ErrOverdraft):
			fmt.Fprintf(w, "refused: %v\n", err)
		case err != nil:
			return err
		default:
			fmt.Fprintf(w, "transfer %s: %d from %s to %s\n", t.id, t.amount, t.from, t.to)
		}
	}

	fmt.Fprintln(w, "balances:")
	total := 0
	for _, id := range []string{"ada", "bob", "cy"} {
		a, err := bank.Account(ctx, id)
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "  %-4s %-14s %5d\n", id, a.Owner, a.Balance)
		total += a.Balance
	}
	fmt.Fprintf(w, "  total %19d\n", total)

	// The projection runs beside the commands; wait until it has seen them.
	if err := WaitCaughtUp(ctx, store, balances); err != nil {
		return err
	}
	rows, err := readModel.Balances(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "read model %q:\n", BalancesProjection)
	for _, b := range rows {
		fmt.Fprintf(w, "  %-4s %5d at v%d\n", b.Account, b.Balance, b.Version)
	}
	return nil
}
