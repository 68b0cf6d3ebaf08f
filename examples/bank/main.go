// Command bank is the worked example of docs/aggregates.md: an Account
// aggregate with an overdraft rule, deposits, withdrawals and transfers
// between accounts, with snapshots every 50 events, and a read model of
// balances fed by a projection (readmodel.go, docs/projections.md).
//
// An outbox relay publishes the account events, as public messages, to a
// bus, where a statements service keeps a line per message (notify.go,
// docs/outbox.md).
//
// It runs on the in-memory store and the in-process bus by default; give
// --dsn to use PostgreSQL and --bus to use a broker:
//
//	go run ./examples/bank
//	go run ./examples/bank --dsn 'postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable' \
//	    --bus amqp://guest:guest@127.0.0.1:5672/
//
// With --trace it traces the run with OpenTelemetry (package telemetry) and
// prints, after the story, each command's trace as a tree: its reads and
// appends, the projection applying each event, and the relay's publish and
// the statements service's handling of it, across the bus.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // driver "postgres"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/aggregate/pgsnapshot"
	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/telemetry"
)

func main() {
	dsn := flag.String("dsn", "", "PostgreSQL URL (default: the in-memory store)")
	schema := flag.String("schema", "bank", "PostgreSQL schema to keep the events and snapshots in")
	busURL := flag.String("bus", "gochannel", "the bus: gochannel, postgres://…, amqp://…, nats://…, redis://… or kafka://…")
	traced := flag.Bool("trace", false, "print each command's trace (OpenTelemetry spans) after the story")
	flag.Parse()

	ctx := context.Background()
	busCfg, err := broker.ParseURL(*busURL)
	if err != nil {
		log.Fatal(err)
	}
	busCfg.Logger = slog.New(slog.DiscardHandler)
	b, err := broker.Open(ctx, busCfg)
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	store, snaps, closeStore, err := open(ctx, *dsn, *schema)
	if err != nil {
		log.Fatal(err)
	}
	var tp *sdktrace.TracerProvider
	if *traced {
		// Spans are kept in memory and printed as trees when the provider
		// shuts down; a service would export them to a collector instead.
		tp = sdktrace.NewTracerProvider(sdktrace.WithSyncer(telemetry.NewTreeExporter(os.Stdout)))
		err = runTraced(ctx, os.Stdout, store, snaps, b, tp)
	} else {
		err = run(ctx, os.Stdout, store, snaps, b)
	}
	closeStore()
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

func run(ctx context.Context, w io.Writer, store eventstore.Store, snaps aggregate.SnapshotStore, b *broker.Broker) error {
	return runTraced(ctx, w, store, snaps, b, nil)
}

// runTraced is run, traced through tp when it is not nil: each command is
// a span, and the store, the read model's handler, the relay's publisher
// and the statements router get the telemetry decorators.
func runTraced(ctx context.Context, w io.Writer, store eventstore.Store, snaps aggregate.SnapshotStore, b *broker.Broker, tp trace.TracerProvider) error {
	var tracer trace.Tracer = noop.NewTracerProvider().Tracer("")
	commands := store
	var tel *telemetry.Telemetry
	if tp != nil {
		var err error
		if tel, err = telemetry.New(telemetry.Config{TracerProvider: tp, MeterProvider: metricnoop.NewMeterProvider()}); err != nil {
			return err
		}
		tracer, commands = tp.Tracer("examples/bank"), tel.Store(store)
	}
	command := func(name string, do func(context.Context) error) error {
		ctx, span := tracer.Start(ctx, name)
		defer span.End()
		return do(ctx)
	}
	bank, err := NewBank(commands, snaps)
	if err != nil {
		return err
	}
	// The statements service listens on the bus; the relay publishes to it.
	statements, stopStatements, err := StartStatements(ctx, store, b, tel)
	if err != nil {
		return err
	}
	defer stopStatements()
	// The read model follows the log from the start, live.
	balances, readModel, err := StartReadModel(ctx, store, tel)
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
		if err := command("open "+a.id, func(ctx context.Context) error {
			return bank.Open(ctx, a.id, a.owner, a.overdraft, a.first)
		}); err != nil {
			return err
		}
		fmt.Fprintf(w, "opened %s for %s with %d (overdraft limit %d)\n", a.id, a.owner, a.first, a.overdraft)
	}

	if err := command("deposit salary-1", func(ctx context.Context) error { return bank.Deposit(ctx, "cy", 300, "salary-1") }); err != nil {
		return err
	}
	fmt.Fprintln(w, "deposited 300 to cy")
	if err := command("withdraw atm-1", func(ctx context.Context) error { return bank.Withdraw(ctx, "cy", 50, "atm-1") }); err != nil {
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
		err := command("transfer "+t.id, func(ctx context.Context) error { return bank.Transfer(ctx, t.id, t.from, t.to, t.amount) })
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

	// The statements service hears of every account event through the bus.
	want, err := accountEvents(ctx, store)
	if err != nil {
		return err
	}
	for deadline := time.Now().Add(30 * time.Second); statements.Handled() < want; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("statements: only %d of %d messages arrived in 30s", statements.Handled(), want)
		}
	}
	fmt.Fprintf(w, "statements (%d messages over the %s bus):\n", want, b.Kind())
	statements.Print(w)
	return nil
}

// accountEvents counts the events of every account stream.
func accountEvents(ctx context.Context, store eventstore.Store) (int, error) {
	n := 0
	for after := ""; ; {
		page, err := store.ListStreams(ctx, eventstore.ListStreamsOpts{Category: "account", After: after})
		if err != nil {
			return 0, err
		}
		for _, si := range page {
			n += int(si.Version)
		}
		if len(page) < eventstore.DefaultPageSize {
			return n, nil
		}
		after = page[len(page)-1].StreamID
	}
}
