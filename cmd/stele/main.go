// Command stele administers a PostgreSQL event store: it migrates the schema,
// shows and follows streams, reports projections and their dead letters, and
// runs the standard benchmarks.
package main

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	_ "github.com/jackc/pgx/v5/stdlib" // driver "pgx"
	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // driver "postgres"
	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore/pgstore"
)

const defaultDSN = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

func main() {
	// Cancelled on Ctrl-C so that long-running commands (streams tail) stop
	// cleanly and close their connections.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "stele:", err)
		os.Exit(1)
	}
}

// globalOpts holds the root command's persistent flags; every subcommand
// constructor takes it.
type globalOpts struct {
	dsn    string
	schema string
	driver string
	tenant string
}

func newRootCmd() *cobra.Command {
	g := &globalOpts{}
	root := &cobra.Command{
		Use:   "stele",
		Short: "Administer a stele event store in PostgreSQL",
		// Runtime errors are not usage errors; main prints them once.
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	f := root.PersistentFlags()
	// The default is resolved when connecting, so --help never prints a
	// password that $STELE_DSN may hold.
	f.StringVar(&g.dsn, "dsn", "", "PostgreSQL connection URL (default $STELE_DSN, else "+defaultDSN+")")
	f.StringVar(&g.schema, "schema", "stele", "schema holding the event store tables")
	f.StringVar(&g.driver, "driver", "postgres", "database/sql driver: postgres (lib/pq) or pgx")
	f.StringVar(&g.tenant, "tenant", "", "act as this tenant: every connection sets stele.tenant (streams, sagas, projections, dlq, outbox status)")

	root.AddCommand(
		withMigrateAudit(g, newMigrateCmd(g)),
		newStreamsCmd(g),
		newBenchCmd(g),
		newProjectionsCmd(g), newDLQCmd(g), newOutboxCmd(g), newBusCmd(g), newSagasCmd(g), newGdprCmd(g),
		newArchiveCmd(g), newTombstoneCmd(g), newRetentionCmd(g), newSealCmd(g), newVerifyCmd(g), newAuditCmd(g),
		newRestoreCheckCmd(g), newRestoreRepairCmd(g), newRestoreMapCmd(g), newTenancyCmd(g),
	)
	return root
}

func (g *globalOpts) openDB(ctx context.Context) (*sqlx.DB, error) {
	if g.driver != "postgres" && g.driver != "pgx" {
		return nil, fmt.Errorf("--driver %q: want postgres or pgx", g.driver)
	}
	dsn := cmp.Or(g.dsn, os.Getenv("STELE_DSN"), defaultDSN)
	db, err := sqlx.Open(g.driver, dsn)
	if err != nil {
		return nil, err
	}
	if g.tenant != "" {
		// Every connection of the command's own pool sets the tenant for
		// its session: each query of the command, the store's, the dead
		// letters', the checkpoints' and the governance's, is the tenant's.
		db.Close()
		if db, err = pgstore.OpenForTenant(g.driver, dsn, g.tenant); err != nil {
			return nil, err
		}
	}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("connecting to PostgreSQL: %w", err)
	}
	return db, nil
}

// openStore returns a store over a database of its own; close releases both.
func (g *globalOpts) openStore(ctx context.Context) (*pgstore.Store, func(), error) {
	db, err := g.openDB(ctx)
	if err != nil {
		return nil, nil, err
	}
	// The CLI only reads, so it needs no group-commit goroutines.
	store, err := pgstore.New(db, &pgstore.Config{Schema: g.schema, DisableGroupCommit: true})
	if err != nil {
		db.Close()
		return nil, nil, err
	}
	if g.tenant == "" {
		return store, func() { store.Close(); db.Close() }, nil
	}
	bound, err := store.ForTenant(g.tenant)
	if err != nil {
		store.Close()
		db.Close()
		return nil, nil, err
	}
	return bound, func() { bound.Close(); store.Close(); db.Close() }, nil
}
