package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/outbox"
)

func newOutboxCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "outbox",
		Short: "Show how far each outbox relay has got",
		Long: `The outbox relay (package outbox) publishes the events appended to the store to
a message broker, moving its checkpoint once the broker confirmed them. Relays
that keep their lease and checkpoint in PostgreSQL (outbox.Config.DB) are
recorded in the outbox_relays table, where these commands find them.`,
	}
	cmd.AddCommand(newOutboxStatusCmd(g))
	return cmd
}

func newOutboxStatusCmd(g *globalOpts) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status [NAME]",
		Short: "Lease, checkpoint, backlog and throughput of every outbox relay",
		Long: `Show every outbox relay recorded in the schema (or only relay NAME):

  OWNER            the relay instance that holds, or last held, the lease
                   (outbox.Config.Owner, by default host:pid:random)
  EPOCH            grows by one each time the lease changes hands
  LEASE            until when the owner holds the lease; "released" when it
                   stopped cleanly, "expired" when the lease ran out without
                   being renewed or released (a crashed or stuck process;
                   another instance takes over at its next try)
  CHECKPOINT       the position of the last event relayed (TXID/POS); events
                   up to it were confirmed by the broker
  BACKLOG          events in the feed after the checkpoint (counted up to
                   100000, shown as 100000+ past that)
  BACKLOG_SECONDS  age of the oldest of those events (0 when caught up)
  PUBLISHED        messages the broker confirmed, all time
  LAST_LATENCY_MS  for the last batch published, the time from the append of
                   its newest event to the broker's confirmation
  LAST_PUBLISH_AT  when that batch was confirmed

--json prints one object per relay with every field, including last_error:
the last failure (a publish the broker refused, a database error), cleared by
the next checkpoint. A relay that keeps failing keeps its checkpoint and its
backlog grows; look there first.

The backlog counts the whole feed, before the relay's filters
(Config.Categories, Types, Filter, Map): a relay that publishes one category
shows a backlog of other events too, which it will skip. A relay started with
Config.From and no checkpoint yet is shown from the start of the log.

A relay that is caught up and idle keeps an old LAST_PUBLISH_AT; backlog 0
says it is up to date. LEASE times are the database's clock.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			name := ""
			if len(args) == 1 {
				name = args[0]
			}
			store, closeStore, err := g.openStore(ctx)
			if err != nil {
				return err
			}
			defer closeStore()
			db := store.DB()
			if err := requireTable(ctx, db, g.schema, "outbox_relays", "outbox"); err != nil {
				return err
			}
			// Leases are the database's time: compare them with its clock.
			var now time.Time
			if err := db.GetContext(ctx, &now, `SELECT now()`); err != nil {
				return err
			}
			relays, err := outbox.ReadStatus(ctx, store, db, g.schema, name)
			if errors.Is(err, outbox.ErrNoRelay) {
				return fmt.Errorf("no outbox relay %q in schema %s: no relay of that name has run against it (stele outbox status lists them): %w",
					name, g.schema, err)
			}
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			tw := newTable(w)
			if !asJSON {
				fmt.Fprintln(tw, "NAME\tOWNER\tEPOCH\tLEASE\tCHECKPOINT\tBACKLOG\tBACKLOG_SECONDS\tPUBLISHED\tLAST_LATENCY_MS\tLAST_PUBLISH_AT")
			}
			for _, st := range relays {
				r := relayJSONOf(st, now)
				if asJSON {
					err = writeJSONLine(w, r)
				} else {
					lease := r.Lease
					if lease == leaseHeld {
						lease = r.LeaseUntil.Format(time.RFC3339)
					}
					latency := "-"
					if r.LastLatencyMS != nil {
						latency = fmt.Sprintf("%.1f", *r.LastLatencyMS)
					}
					_, err = fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%.1f\t%d\t%s\t%s\n", r.Name, cellText(r.Owner), r.Epoch, lease,
						r.Checkpoint, lagText(r.Backlog), r.BacklogSeconds, r.Published, latency, timeText(r.LastPublishAt))
				}
				if err != nil {
					return err
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per relay")
	return cmd
}

// The states of a relay's lease.
const (
	leaseHeld     = "held"
	leaseReleased = "released"
	leaseExpired  = "expired"
)

type relayJSON struct {
	Name           string     `json:"name"`
	Owner          string     `json:"owner"`
	Epoch          int64      `json:"epoch"`
	Lease          string     `json:"lease"`       // held, released or expired
	LeaseUntil     *time.Time `json:"lease_until"` // null when released
	Checkpoint     string     `json:"checkpoint"`
	Backlog        int        `json:"backlog"` // maxLag means at least that many
	BacklogSeconds float64    `json:"backlog_seconds"`
	Published      int64      `json:"published"`
	LastPublishAt  *time.Time `json:"last_publish_at"` // null: nothing published yet
	LastLatencyMS  *float64   `json:"last_latency_ms"`
	LastError      string     `json:"last_error"`
}

func relayJSONOf(st outbox.Status, now time.Time) relayJSON {
	r := relayJSON{
		Name: st.Name, Owner: st.Owner, Epoch: st.Epoch, Lease: leaseReleased,
		Checkpoint: st.Checkpoint.String(), Backlog: st.Backlog, BacklogSeconds: st.BacklogAge.Seconds(),
		Published: st.Published, LastError: st.LastError,
	}
	if !st.LeaseUntil.IsZero() {
		until := st.LeaseUntil
		r.LeaseUntil, r.Lease = &until, leaseHeld
		if !until.After(now) {
			r.Lease = leaseExpired
		}
	}
	if !st.LastPublishAt.IsZero() {
		at := st.LastPublishAt
		ms := float64(st.LastLatency) / float64(time.Millisecond)
		r.LastPublishAt, r.LastLatencyMS = &at, &ms
	}
	return r
}

// requireTable turns "relation does not exist" into advice; what names the
// feature the table belongs to.
func requireTable(ctx context.Context, db *sqlx.DB, schema, table, what string) error {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return err
	}
	var ok bool
	if err := db.GetContext(ctx, &ok, `SELECT to_regclass($1) IS NOT NULL`, `"`+schema+`".`+table); err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("schema %s has no %s tables; run stele migrate --schema %s", schema, what, schema)
	}
	return nil
}

// cellText keeps a table cell one non-empty word.
func cellText(s string) string {
	if s == "" {
		return "-"
	}
	return oneLine(s)
}
