package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/projection"
)

func newProjectionsCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "projections",
		Short: "Show how far each projection has got",
	}
	cmd.AddCommand(newProjectionsStatusCmd(g), newProjectionsRebuildCmd(g))
	return cmd
}

// maxLag is where projection.Lag stops counting.
const maxLag = projection.MaxLagCount

func newProjectionsStatusCmd(g *globalOpts) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Checkpoint, lag and dead letters of every projection",
		Long: `Show every projection that has a checkpoint or dead letters in the schema:

  CHECKPOINT          the position of the last event it handled (TXID/POS)
  LAG_EVENTS          events in the feed after the checkpoint (counted up to 100000)
  LAG_SECONDS         age of the oldest of those events (0 when caught up)
  DEAD_LETTERS        events parked after their handler failed every retry
  LAST_CHECKPOINT_AT  when the checkpoint last moved

  STATE               running, waiting (for the lease), failed or stopped, as the
                      runner last reported it; a process that died cannot report,
                      so check LAG too (--json adds the error and when it changed)

A projection that is caught up and idle keeps an old LAST_CHECKPOINT_AT; lag 0
says it is up to date.

Lag counts the whole feed. A projection fed one category (Config.Category)
can show lag for events of other categories that it will never handle.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			store, closeStore, err := g.openStore(ctx)
			if err != nil {
				return err
			}
			defer closeStore()
			rows, err := loadProjections(ctx, store.DB(), g.schema, store.Tenant())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			tw := newTable(w)
			if !asJSON {
				fmt.Fprintln(tw, "NAME\tSTATE\tCHECKPOINT\tLAG_EVENTS\tLAG_SECONDS\tDEAD_LETTERS\tLAST_CHECKPOINT_AT")
			}
			for _, p := range rows {
				if p.LagEvents, p.LagSeconds, err = projection.Lag(ctx, store, p.checkpoint, ""); err != nil {
					return fmt.Errorf("measuring the lag of %s: %w", p.Name, err)
				}
				if asJSON {
					err = writeJSONLine(w, p)
				} else {
					_, err = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.1f\t%d\t%s\n", p.Name, p.State, p.Checkpoint, lagText(p.LagEvents),
						p.LagSeconds, p.DeadLetters, timeText(p.UpdatedAt))
				}
				if err != nil {
					return err
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per projection")
	return cmd
}

type projectionJSON struct {
	Name        string     `json:"name"`
	Checkpoint  string     `json:"checkpoint"`
	LagEvents   int        `json:"lag_events"` // maxLag means at least that many
	LagSeconds  float64    `json:"lag_seconds"`
	DeadLetters int        `json:"dead_letters"`
	UpdatedAt   *time.Time `json:"last_checkpoint_at"` // null: no checkpoint yet
	State       string     `json:"state"`              // as the runner last reported it
	StateError  string     `json:"state_error,omitempty"`
	StateAt     *time.Time `json:"state_at,omitempty"`
	checkpoint  eventstore.Position
}

// loadProjections reads the checkpoints and dead-letter counts. A projection
// with dead letters but no checkpoint yet (a Handler that parked and then
// crashed before its first checkpoint) is shown at the start of the feed,
// where it would resume.
func loadProjections(ctx context.Context, db *sqlx.DB, schema, tenant string) ([]projectionJSON, error) {
	if err := requireProjectionTables(ctx, db, schema); err != nil {
		return nil, err
	}
	s := `"` + schema + `"`
	// The tenant's rows only (and, under row-level security, visible).
	tx, err := db.BeginTxx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer tx.Rollback() //nolint:errcheck // read-only
	if tenant != "" {
		if err := pgstore.SetTenant(ctx, tx, tenant); err != nil {
			return nil, err
		}
	}
	rows, err := tx.QueryContext(ctx, `
		SELECT coalesce(c.name, d.projection), coalesce(c.transaction_id::text, '0'), coalesce(c.position, 0),
		       c.updated_at, coalesce(d.n, 0), coalesce(c.state, 'idle'), coalesce(c.state_error, ''), c.state_at
		FROM (SELECT * FROM `+s+`.projection_checkpoints WHERE tenant_id = $1) c
		FULL JOIN (SELECT projection, count(*) AS n FROM `+s+`.projection_dead_letters WHERE tenant_id = $1 GROUP BY projection) d
		       ON d.projection = c.name
		ORDER BY 1`, tenant)
	if err != nil {
		return nil, fmt.Errorf("reading projection checkpoints: %w", err)
	}
	defer rows.Close()
	var out []projectionJSON
	for rows.Next() {
		var p projectionJSON
		var xid string
		var updated *time.Time
		if err := rows.Scan(&p.Name, &xid, &p.checkpoint.GlobalPosition, &updated, &p.DeadLetters, &p.State, &p.StateError, &p.StateAt); err != nil {
			return nil, fmt.Errorf("reading projection checkpoints: %w", err)
		}
		if p.checkpoint.TxID, err = strconv.ParseUint(xid, 10, 64); err != nil {
			return nil, fmt.Errorf("checkpoint of %s: %w", p.Name, err)
		}
		p.Checkpoint, p.UpdatedAt = p.checkpoint.String(), updated
		out = append(out, p)
	}
	return out, rows.Err()
}

// requireProjectionTables turns "relation does not exist" into advice.
func requireProjectionTables(ctx context.Context, db *sqlx.DB, schema string) error {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return err
	}
	var ok bool
	err := db.GetContext(ctx, &ok, `SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL`,
		`"`+schema+`".projection_checkpoints`, `"`+schema+`".projection_dead_letters`)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("schema %s has no projection tables; run stele migrate --schema %s", schema, schema)
	}
	return nil
}

func lagText(n int) string {
	if n >= maxLag {
		return fmt.Sprintf("%d+", maxLag)
	}
	return strconv.Itoa(n)
}

func timeText(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.Format(time.RFC3339)
}

func newDLQCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dlq",
		Short: "List, retry and discard the dead letters of projections",
		Long: `A dead letter is an event that a projection's handler failed to handle after
every retry, under PolicyPark. The projection went on past it; the event is
parked in the projection_dead_letters table until it is retried or discarded.`,
	}
	cmd.AddCommand(newDLQLsCmd(g), newDLQRetryCmd(g), newDLQDiscardCmd(g))
	return cmd
}

type deadLetterJSON struct {
	ID         int64     `json:"id"`
	Projection string    `json:"projection"`
	StreamID   string    `json:"stream_id"`
	Version    int64     `json:"version"`
	Position   string    `json:"position"`
	EventID    string    `json:"event_id"`
	Type       string    `json:"type"`
	Attempts   int       `json:"attempts"`
	FailedAt   time.Time `json:"failed_at"`
	Error      string    `json:"error"`
}

func newDLQLsCmd(g *globalOpts) *cobra.Command {
	var name string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List dead letters, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			if err := requireProjectionTables(ctx, db, g.schema); err != nil {
				return err
			}
			dls, err := projection.ListDeadLetters(ctx, db, g.schema, name)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			tw := newTable(w)
			if !asJSON {
				fmt.Fprintln(tw, "ID\tPROJECTION\tSTREAM\tVERSION\tTYPE\tATTEMPTS\tFAILED_AT\tERROR")
			}
			for _, d := range dls {
				if asJSON {
					err = writeJSONLine(w, deadLetterJSON{
						ID: d.ID, Projection: d.Projection, StreamID: d.StreamID, Version: int64(d.Version),
						Position: d.Position.String(), EventID: d.EventID, Type: d.EventType,
						Attempts: d.Attempts, FailedAt: d.FailedAt, Error: d.Error,
					})
				} else {
					_, err = fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%d\t%s\t%s\n", d.ID, d.Projection, d.StreamID, d.Version,
						d.EventType, d.Attempts, d.FailedAt.Format(time.RFC3339), oneLine(d.Error))
				}
				if err != nil {
					return err
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&name, "projection", "", "only the dead letters of this projection")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per dead letter")
	return cmd
}

func newDLQRetryCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "retry ID",
		Short: "Ask the running projection to handle a dead letter again",
		Long: `Ask the projection that parked dead letter ID to handle it again.

The handler's code lives in your application, not in this CLI, so this only
records the request. The running projection picks it up within a few seconds.
If the handler succeeds, the dead letter disappears from stele dlq ls. If it
fails, the dead letter stays, with the new error and one more attempt. If the
projection is not running, the request waits until it starts.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			id, db, err := g.openDeadLetter(ctx, args[0])
			if err != nil {
				return err
			}
			defer db.Close()
			if err := projection.RequestRetry(ctx, db, g.schema, id); err != nil {
				return noDeadLetter(err, id, g.schema)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "requested a retry of dead letter %d; the running projection handles it within seconds (see stele dlq ls)\n", id)
			return err
		},
	}
}

// openDeadLetter parses a dead-letter id and opens the database, checking
// that the schema has the projection tables.
func (g *globalOpts) openDeadLetter(ctx context.Context, arg string) (int64, *sqlx.DB, error) {
	id, err := parseDeadLetterID(arg)
	if err != nil {
		return 0, nil, err
	}
	db, err := g.openDB(ctx)
	if err != nil {
		return 0, nil, err
	}
	if err := requireProjectionTables(ctx, db, g.schema); err != nil {
		db.Close()
		return 0, nil, err
	}
	return id, db, nil
}

func newDLQDiscardCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "discard ID",
		Short: "Delete a dead letter without handling it",
		Long: `Delete dead letter ID. Its event stays in the log; the projection never handles
it. The projection's read model therefore lacks that event for good, unless it
is rebuilt.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			id, db, err := g.openDeadLetter(ctx, args[0])
			if err != nil {
				return err
			}
			defer db.Close()
			// Read what is discarded first, to say so afterwards.
			var d struct {
				Projection, StreamID, EventType, Error string
				Version                                int64
			}
			err = db.QueryRowContext(ctx, `SELECT projection, stream_id, version, event_type, error FROM "`+g.schema+
				`".projection_dead_letters WHERE id = $1 AND tenant_id = coalesce(current_setting('stele.tenant', true), '')`, id).Scan(&d.Projection, &d.StreamID, &d.Version, &d.EventType, &d.Error)
			if err == nil {
				err = projection.DiscardDeadLetter(ctx, db, g.schema, id)
			} else if errors.Is(err, sql.ErrNoRows) {
				err = projection.ErrNoDeadLetter
			}
			if err != nil {
				return noDeadLetter(err, id, g.schema)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "discarded dead letter %d of projection %s: %s v%d (%s), which failed with: %s\n",
				id, d.Projection, d.StreamID, d.Version, d.EventType, oneLine(d.Error))
			return err
		},
	}
}

func parseDeadLetterID(s string) (int64, error) {
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id <= 0 {
		return 0, fmt.Errorf("dead letter id %q: want the number stele dlq ls shows", s)
	}
	return id, nil
}

// noDeadLetter explains ErrNoDeadLetter; other errors pass through.
func noDeadLetter(err error, id int64, schema string) error {
	if errors.Is(err, projection.ErrNoDeadLetter) {
		return fmt.Errorf("dead letter %d not found in schema %s: it was retried, discarded or never parked (see stele dlq ls): %w",
			id, schema, projection.ErrNoDeadLetter)
	}
	return err
}

// oneLine keeps a table row on one line whatever the handler's error says.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func writeJSONLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
