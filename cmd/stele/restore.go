package main

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

// errRepairNeeded makes `stele restore-check` exit with status 1.
var errRepairNeeded = errors.New("restore repair needed: stop every writer and consumer of the schema, then run stele restore-repair --actor NAME (docs/operations.md, \"Backup and restore\")")

const restoreLong = `The global feed is ordered by PostgreSQL transaction ids, and those ids only
mean something in the cluster that assigned them. After a dump is restored into
another cluster (pg_dump/pg_restore, or a base backup made into a new cluster,
or pg_upgrade), stored ids can be far beyond the new cluster's counter: the
feed does not show those events, checkpoints skip new ones, appends to old
streams are refused, and new events interleave with restored ones.
See docs/operations.md, "Backup and restore".`

func newRestoreCheckCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "restore-check",
		Short: "Tell whether the schema's data came from another cluster and needs a restore repair",
		Long: restoreLong + `

restore-check compares the cluster recorded in the schema (at migrate time, or
by the last repair) with the one it is connected to, and every stored
transaction id (events, streams, projection and relay checkpoints, dead
letters) with this cluster's counter. It only reads. Run it as the schema
owner right after a restore, before any writer or consumer starts.

Exit status 0: nothing to do. 1: a repair is needed (or the check failed).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			st, err := pgstore.RestoreCheck(ctx, db, g.schema)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			printRestoreStatus(w, st)
			if !st.NeedsRepair {
				return nil
			}
			return errRepairNeeded
		},
	}
}

func printRestoreStatus(w io.Writer, st pgstore.RestoreStatus) {
	tw := newTable(w)
	fmt.Fprintf(tw, "schema\t%s\n", st.Schema)
	if st.RecordedSystemID == "" {
		fmt.Fprintf(tw, "recorded in\tnothing recorded\n")
	} else {
		fmt.Fprintf(tw, "recorded in\tcluster %s, database %s (by %s at %s; next transaction id then %d)\n",
			st.RecordedSystemID, st.RecordedDatabase, st.RecordedBy, st.RecordedAt.UTC().Format(time.RFC3339), st.RecordedHorizon)
	}
	fmt.Fprintf(tw, "this is\tcluster %s, database %s (next transaction id %d, oldest running %d)\n", st.SystemID, st.Database, st.Horizon, st.Xmin)
	fmt.Fprintf(tw, "events\t%d (%d beyond this cluster's counter), newest transaction id stored %d\n", st.Events, st.EventsAhead, st.MaxTxID)
	fmt.Fprintf(tw, "streams\t%d (%d beyond)\n", st.Streams, st.StreamsAhead)
	fmt.Fprintf(tw, "checkpoints\t%d (%d beyond)\n", st.Checkpoints, st.CheckpointsAhead)
	_ = tw.Flush()
	for _, u := range st.Unknown {
		fmt.Fprintf(w, "warning: column %s holds transaction ids a repair does not know how to map; a repair that must rewrite ids refuses\n", u)
	}
	if !st.NeedsRepair {
		msg := "ok: the stored transaction ids belong to this cluster"
		if st.DatabaseChanged {
			msg += fmt.Sprintf(" (the data moved from database %s to %s of the same cluster: the ids stay valid)", st.RecordedDatabase, st.Database)
		}
		fmt.Fprintln(w, msg)
		return
	}
	fmt.Fprintln(w, "REPAIR NEEDED:")
	for _, r := range st.Reasons() {
		fmt.Fprintf(w, "  - %s\n", r)
	}
	if st.RewriteNeeded {
		fmt.Fprintln(w, "restore-repair will renumber the stored transaction ids, keeping the feed's order exactly, and move every checkpoint with them.")
	} else {
		fmt.Fprintln(w, "every stored id is already below this cluster's transactions: restore-repair will only record this cluster.")
	}
	fmt.Fprintf(w, "Stop every writer, projection, relay and subscriber of schema %s, then run: stele restore-repair --schema %s --actor NAME\n", st.Schema, st.Schema)
}

func newRestoreRepairCmd(g *globalOpts) *cobra.Command {
	var actor string
	cmd := &cobra.Command{
		Use:   "restore-repair --actor NAME",
		Short: "Renumber transaction ids restored from another cluster, keeping the feed's order (audited)",
		Long: restoreLong + `

restore-repair gives every event a new transaction id below every transaction
of this cluster, keeping the feed's order exactly and every global position as
it was; it moves every stored checkpoint (projections, relays, dead letters)
to the same place in the feed and maps each stream's last writer, then records
this cluster. If the new ids do not fit below this cluster's counter, it first
runs empty transactions to advance it. It is one transaction through the
audited admin path (action "restore-repair"); the audit row records the map.
When every stored id is already below this cluster's transactions (after a
pg_upgrade, say) it only records this cluster.

Before: stop every writer, projection, relay and subscriber of the schema
(their in-memory positions are old ids). After: start them again; they resume
from their moved checkpoints. Positions kept outside the schema are mapped with
stele restore-map. Refuses when restore-check finds nothing to repair.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			res, err := pgstore.RestoreRepair(ctx, db, g.schema, actor)
			if errors.Is(err, pgstore.ErrNothingToRepair) {
				return fmt.Errorf("schema %s: %w", g.schema, err)
			}
			if err != nil {
				return err
			}
			printRepair(cmd.OutOrStdout(), g.schema, res)
			return nil
		},
	}
	cmd.Flags().StringVar(&actor, "actor", "", "who runs the repair, for the audit trail (required)")
	_ = cmd.MarkFlagRequired("actor")
	return cmd
}

func printRepair(w io.Writer, schema string, res pgstore.RepairResult) {
	fmt.Fprintf(w, "repaired schema %s (audit #%d): recorded cluster %s, was %s\n", schema, res.AuditID, res.SystemID, orNone(res.PreviousSystemID))
	if !res.Rewritten {
		fmt.Fprintln(w, "no transaction id needed rewriting: every stored id was below this cluster's transactions")
		return
	}
	if res.BurnedXids > 0 {
		fmt.Fprintf(w, "advanced this cluster's transaction counter by %d (empty transactions) so the new ids fit below it\n", res.BurnedXids)
	}
	fmt.Fprintf(w, "renumbered %d events: %d old transaction ids (%d..%d) became 1..%d, feed order and global positions unchanged\n",
		res.Events, res.OldTransactions, res.OldMinTxID, res.OldMaxTxID, res.Runs)
	fmt.Fprintf(w, "mapped the last writer of %d streams\n", res.Streams)
	fmt.Fprintf(w, "moved %d stored positions:\n", len(res.Moved))
	tw := newTable(w)
	fmt.Fprintln(tw, "  TABLE\tKEY\tOLD\tNEW")
	const show = 50
	for i, c := range res.Moved {
		if i == show {
			break
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", c.Table, c.Key, c.Old, c.New)
	}
	_ = tw.Flush()
	if len(res.Moved) > show {
		fmt.Fprintf(w, "  ... and %d more (the audit row lists up to 500)\n", len(res.Moved)-show)
	}
	fmt.Fprintln(w, "start the writers and consumers again; they resume from the moved checkpoints. Map positions kept outside the schema with stele restore-map.")
}

func orNone(s string) string {
	if s == "" {
		return "(none recorded)"
	}
	return s
}

func newRestoreMapCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "restore-map TXID/POS...",
		Short: "Map feed positions taken before the latest restore repair to the positions after it",
		Long: `Consumers that keep their checkpoint outside the schema (a read model in another
database, a broker consumer's offset store) hold positions with the old
transaction ids. restore-map prints, for each position taken before the latest
restore repair, the position of the same event after it (exact for positions of
events and for 0/0, the start).`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			var old []eventstore.Position
			for _, a := range args {
				p, err := eventstore.ParsePosition(a)
				if err != nil {
					return err
				}
				old = append(old, p)
			}
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			for _, p := range old {
				m, err := pgstore.RestoreMapPosition(ctx, db, g.schema, p)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s -> %s\n", p, m)
			}
			return nil
		},
	}
}
