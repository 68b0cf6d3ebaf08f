package main

// Data governance commands: archive, tombstone, retention, seal, verify and
// audit, and the audit row `stele migrate` leaves.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore/pgstore"
)

const actorUsage = "who does it, for the audit trail (default $STELE_ACTOR, else the OS user)"

// actorOf resolves --actor: the flag, else $STELE_ACTOR, else the OS user.
func actorOf(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if a := os.Getenv("STELE_ACTOR"); a != "" {
		return a, nil
	}
	if u, err := user.Current(); err == nil && u.Username != "" {
		return u.Username, nil
	}
	if a := os.Getenv("USER"); a != "" {
		return a, nil
	}
	return "", errors.New("no actor: give --actor NAME (or set $STELE_ACTOR) to say who does this")
}

// withMigrateAudit makes `stele migrate` record what it applied in the
// audit trail (action "migrate"), right after Migrate committed.
func withMigrateAudit(g *globalOpts, cmd *cobra.Command) *cobra.Command {
	var actor string
	cmd.Flags().StringVar(&actor, "actor", "", actorUsage)
	migrate := cmd.RunE
	cmd.RunE = func(c *cobra.Command, args []string) error {
		ctx := c.Context()
		who, err := actorOf(actor)
		if err != nil {
			return err
		}
		if err := pgstore.ValidateSchema(g.schema); err != nil {
			return err
		}
		db, err := g.openDB(ctx)
		if err != nil {
			return err
		}
		defer db.Close()
		before, err := schemaVersion(ctx, db, g.schema)
		if err != nil {
			return err
		}
		if err := migrate(c, args); err != nil {
			return err
		}
		res := pgstore.MigrateResult{Version: before}
		rows, err := db.QueryContext(ctx, `SELECT version, name FROM "`+g.schema+`".schema_migrations WHERE version > $1 ORDER BY version`, before)
		if err != nil {
			return fmt.Errorf("migrated, but reading what was applied for the audit trail failed: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			var m pgstore.Migration
			if err := rows.Scan(&m.Version, &m.Name); err != nil {
				return err
			}
			res.Applied, res.Version = append(res.Applied, m), m.Version
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if _, err := pgstore.RecordMigration(ctx, db, g.schema, who, res); err != nil {
			return fmt.Errorf("migrated, but recording it in the audit trail failed: %w", err)
		}
		return nil
	}
	return cmd
}

// schemaVersion is the schema's migration version, 0 before the first.
func schemaVersion(ctx context.Context, db *sqlx.DB, schema string) (int, error) {
	var exists bool
	if err := db.GetContext(ctx, &exists, `SELECT to_regclass($1) IS NOT NULL`, `"`+schema+`".schema_migrations`); err != nil {
		return 0, err
	}
	if !exists {
		return 0, nil
	}
	var v int
	err := db.GetContext(ctx, &v, `SELECT coalesce(max(version), 0) FROM "`+schema+`".schema_migrations`)
	return v, err
}

// requireGovernance turns "relation does not exist" into advice.
func requireGovernance(ctx context.Context, db *sqlx.DB, schema string) error {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return err
	}
	var ok bool
	if err := db.GetContext(ctx, &ok, `SELECT to_regclass($1) IS NOT NULL`, `"`+schema+`".retired_streams`); err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("schema %s has no governance tables (migration 0007); run stele migrate --schema %s", schema, schema)
	}
	return nil
}

// openGov opens the database and checks the governance tables are there.
// audited runs an audited admin command: it requires --actor, opens the
// database, and hands both to fn.
func (g *globalOpts) audited(cmd *cobra.Command, actor string, fn func(ctx context.Context, db *sqlx.DB, who string) error) error {
	ctx := cmd.Context()
	who, err := actorOf(actor)
	if err != nil {
		return err
	}
	db, err := g.openGov(ctx)
	if err != nil {
		return err
	}
	defer db.Close()
	return fn(ctx, db, who)
}

func (g *globalOpts) openGov(ctx context.Context) (*sqlx.DB, error) {
	db, err := g.openDB(ctx)
	if err != nil {
		return nil, err
	}
	if err := requireGovernance(ctx, db, g.schema); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

func newArchiveCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "archive",
		Short: "Archive streams out of the log, list them, restore them",
		Long: `An archived stream's events move from the log to the archived_events table:
reads, the feed, projection rebuilds and stele streams ls no longer see it, and
appends to it are refused until it is restored. Every other stream and every
event's feed position stay as they were. Each archive and restore is recorded
in the audit trail (stele audit).`,
	}
	cmd.AddCommand(newArchiveStreamCmd(g), newArchiveRestoreCmd(g), newArchiveLsCmd(g))
	return cmd
}

func newArchiveStreamCmd(g *globalOpts) *cobra.Command {
	var actor string
	cmd := &cobra.Command{
		Use:   "stream STREAM",
		Short: "Move a stream's events to the archive (audited)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.audited(cmd, actor, func(ctx context.Context, db *sqlx.DB, who string) error {
				res, err := pgstore.ArchiveStream(ctx, db, g.schema, who, args[0])
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "archived %s: %d events moved to the archive, version %d kept (audit %d); restore with stele archive restore %s\n",
					res.StreamID, res.Events, res.Version, res.AuditID, res.StreamID)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&actor, "actor", "", actorUsage)
	return cmd
}

func newArchiveRestoreCmd(g *globalOpts) *cobra.Command {
	var actor string
	cmd := &cobra.Command{
		Use:   "restore STREAM",
		Short: "Move a stream's archived events back into the log (audited)",
		Long: `Move a stream's archived events (by stele archive stream or by retention) back
into the log, at their original feed positions. Readers of the stream and
projection rebuilds see them again; subscribers already past those positions
do not, so nothing is delivered or published twice.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.audited(cmd, actor, func(ctx context.Context, db *sqlx.DB, who string) error {
				res, err := pgstore.RestoreArchivedStream(ctx, db, g.schema, who, args[0])
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "restored %s: %d events back in the log at their original positions, version %d (audit %d)\n",
					res.StreamID, res.Events, res.Version, res.AuditID)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&actor, "actor", "", actorUsage)
	return cmd
}

type retiredJSON struct {
	StreamID       string     `json:"stream_id"`
	State          string     `json:"state"`
	Version        int64      `json:"version"`
	Events         int64      `json:"events"`
	ArchivedEvents int64      `json:"archived_events"`
	RetiredAt      *time.Time `json:"retired_at"`
}

func newArchiveLsCmd(g *globalOpts) *cobra.Command {
	var category string
	var limit int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List archived and tombstoned streams, and streams with events archived by retention",
		Long: `List, in id order:

  STATE            archived, tombstoned, or live (a live stream whose old events
                   retention archived)
  VERSION          the stream's version (kept when archived or tombstoned)
  EVENTS           its events in the log
  ARCHIVED_EVENTS  its events in the archive
  RETIRED_AT       when it was archived or tombstoned`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			db, err := g.openGov(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			list, err := pgstore.ListRetired(ctx, db, g.schema, category, limit)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			tw := newTable(w)
			if !asJSON {
				fmt.Fprintln(tw, "STREAM\tSTATE\tVERSION\tEVENTS\tARCHIVED_EVENTS\tRETIRED_AT")
			}
			for _, st := range list {
				var at *time.Time
				if !st.RetiredAt.IsZero() {
					at = &st.RetiredAt
				}
				if asJSON {
					err = writeJSONLine(w, retiredJSON{StreamID: st.StreamID, State: string(st.State), Version: int64(st.Version),
						Events: st.Events, ArchivedEvents: st.ArchivedEvents, RetiredAt: at})
				} else {
					_, err = fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\n", st.StreamID, st.State, st.Version, st.Events, st.ArchivedEvents, timeText(at))
				}
				if err != nil {
					return err
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&category, "category", "", "only streams of this category")
	cmd.Flags().IntVar(&limit, "limit", 1000, "list at most N streams")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per stream")
	return cmd
}

func newTombstoneCmd(g *globalOpts) *cobra.Command {
	var actor string
	var yes bool
	cmd := &cobra.Command{
		Use:   "tombstone STREAM",
		Short: "Delete a stream's events for good and keep its id from reuse (audited)",
		Long: `Delete every event of STREAM, in the log and in the archive, and its
snapshots. This cannot be undone. A marker keeps the id: appends to it are
refused, and reads show it empty at version 0. If history is sealed, the
stream's hashes stay so that stele verify still holds.

Without --yes, only says what would be deleted.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.audited(cmd, actor, func(ctx context.Context, db *sqlx.DB, who string) error {
				if !yes {
					st, err := pgstore.LookupStream(ctx, db, g.schema, args[0])
					if err != nil {
						return err
					}
					return fmt.Errorf("stream %s is %s with %d events in the log and %d in the archive; tombstoning deletes them for good: run again with --yes",
						st.StreamID, st.State, st.Events, st.ArchivedEvents)
				}
				res, err := pgstore.TombstoneStream(ctx, db, g.schema, who, args[0])
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "tombstoned %s: %d events deleted from the log and %d from the archive; its id stays taken (audit %d)\n",
					res.StreamID, res.Events, res.ArchivedEvents, res.AuditID)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&actor, "actor", "", actorUsage)
	cmd.Flags().BoolVar(&yes, "yes", false, "really delete")
	return cmd
}

func newRetentionCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "retention",
		Short: "Archive the old events of a category",
	}
	cmd.AddCommand(newRetentionApplyCmd(g))
	return cmd
}

type retentionJSON struct {
	Category  string     `json:"category"`
	MaxAge    string     `json:"max_age,omitempty"`
	MaxCount  int64      `json:"max_count,omitempty"`
	OlderThan *time.Time `json:"older_than,omitempty"`
	DryRun    bool       `json:"dry_run"`
	Streams   int        `json:"streams"`
	Events    int64      `json:"events"`
	AuditID   int64      `json:"audit_id,omitempty"`
	Cuts      []cutJSON  `json:"cuts,omitempty"`
}

type cutJSON struct {
	StreamID string `json:"stream_id"`
	UpTo     int64  `json:"up_to_version"`
	Events   int64  `json:"events"`
}

func newRetentionApplyCmd(g *globalOpts) *cobra.Command {
	var p pgstore.RetentionPolicy
	var actor string
	var dryRun, asJSON bool
	cmd := &cobra.Command{
		Use:   "apply --category C [--max-age D] [--max-count N]",
		Short: "Archive the events of a category beyond a max age or max count (audited)",
		Long: `Archive, in every stream of category C, the events beyond the policy, as a
sliding window over each stream:

  --max-age D    events recorded longer than D ago (720h = 30 days)
  --max-count N  all but the newest N events of each stream

With both, an event beyond either goes. Everything up to a stream's last event
beyond the policy is archived, so what stays readable is each stream's newest
events; the stream keeps its id and version and takes appends as before.
Events are moved to the archive, not deleted (stele archive restore brings a
stream's back; stele tombstone deletes for good). The action is recorded in the
audit trail with the counts. --dry-run lists what would go and changes nothing.

Retention suits categories read as recent history. An aggregate folded from its
whole stream loses its state unless a snapshot newer than the cut exists.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			who, err := actorOf(actor)
			if err != nil && !dryRun {
				return err
			}
			db, err := g.openGov(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			var res pgstore.RetentionResult
			if dryRun {
				res, err = pgstore.PlanRetention(ctx, db, g.schema, p)
			} else {
				res, err = pgstore.ApplyRetention(ctx, db, g.schema, who, p)
			}
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				out := retentionJSON{Category: p.Category, MaxCount: p.MaxCount, DryRun: dryRun,
					Streams: res.Streams, Events: res.Events, AuditID: res.AuditID}
				if p.MaxAge > 0 {
					out.MaxAge, out.OlderThan = p.MaxAge.String(), &res.OlderThan
				}
				if dryRun {
					for _, c := range res.Cuts {
						out.Cuts = append(out.Cuts, cutJSON{StreamID: c.StreamID, UpTo: int64(c.UpTo), Events: c.Events})
					}
				}
				return writeJSONLine(w, out)
			}
			policy := retentionText(p, res)
			switch {
			case dryRun:
				fmt.Fprintf(w, "dry run: retention of category %s (%s) would archive %d events of %d streams; nothing changed\n",
					p.Category, policy, res.Events, res.Streams)
				if len(res.Cuts) > 0 {
					tw := newTable(w)
					fmt.Fprintln(tw, "STREAM\tUP_TO_VERSION\tEVENTS")
					for _, c := range res.Cuts {
						fmt.Fprintf(tw, "%s\t%d\t%d\n", c.StreamID, c.UpTo, c.Events)
					}
					return tw.Flush()
				}
			case res.Events == 0:
				fmt.Fprintf(w, "retention of category %s (%s): nothing beyond the policy; nothing done\n", p.Category, policy)
			default:
				fmt.Fprintf(w, "retention of category %s (%s): archived %d events of %d streams (audit %d)\n",
					p.Category, policy, res.Events, res.Streams, res.AuditID)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&p.Category, "category", "", "the category: the part of the stream ids before their first '-' (required)")
	f.DurationVar(&p.MaxAge, "max-age", 0, "archive events recorded longer ago than this (e.g. 720h)")
	f.Int64Var(&p.MaxCount, "max-count", 0, "keep only each stream's newest N events")
	f.StringVar(&actor, "actor", "", actorUsage)
	f.BoolVar(&dryRun, "dry-run", false, "say what would be archived; change nothing")
	f.BoolVar(&asJSON, "json", false, "print the result as one JSON object (with --dry-run, each stream's cut)")
	_ = cmd.MarkFlagRequired("category")
	return cmd
}

func retentionText(p pgstore.RetentionPolicy, res pgstore.RetentionResult) string {
	var parts []string
	if p.MaxAge > 0 {
		parts = append(parts, fmt.Sprintf("max age %s: recorded before %s", p.MaxAge, res.OlderThan.Format(time.RFC3339)))
	}
	if p.MaxCount > 0 {
		parts = append(parts, "max count "+strconv.FormatInt(p.MaxCount, 10))
	}
	return strings.Join(parts, ", ")
}

type sealJSON struct {
	Seals     int                     `json:"seals"`
	Events    int64                   `json:"events"`
	AuditRows int64                   `json:"audit_rows"`
	SealID    int64                   `json:"seal_id"`
	Digest    string                  `json:"digest"`
	Skipped   []pgstore.VerifyProblem `json:"skipped,omitempty"`
}

func newSealCmd(g *globalOpts) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "seal",
		Short: "Extend the hash chain over events and audit rows not yet sealed",
		Long: `Chain every event not yet sealed (in the log and the archive) onto its stream's
hash chain, and every audit row onto the audit trail's, and record a seal whose
digest commits to them and to the previous seal. Appends are never slowed: run
it from cron or after a batch.

Keep the digest it prints outside the database (a ticket, a log, a signed
message): stele verify --digest DIGEST then proves the sealed history was not
rewritten since, even by someone who can write every table.

The chain covers every tenant's streams. With row-level security on (stele
tenancy enable), run it as a role that bypasses it: a superuser or a role
with BYPASSRLS.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			db, err := g.openGov(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			res, err := pgstore.Seal(ctx, db, g.schema)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				return writeJSONLine(w, sealJSON{Seals: res.Seals, Events: res.Events, AuditRows: res.AuditRows,
					SealID: res.SealID, Digest: res.Digest, Skipped: res.Skipped})
			}
			if res.Seals == 0 {
				fmt.Fprint(w, "nothing new to seal")
			} else {
				fmt.Fprintf(w, "sealed %d events and %d audit rows", res.Events, res.AuditRows)
			}
			if res.SealID > 0 {
				fmt.Fprintf(w, "; seal %d, digest %s", res.SealID, res.Digest)
			}
			fmt.Fprintln(w)
			for _, p := range res.Skipped {
				fmt.Fprintf(w, "not sealed: %s\n", p)
			}
			if len(res.Skipped) > 0 {
				return fmt.Errorf("%d streams could not be sealed; run stele verify", len(res.Skipped))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as one JSON object")
	return cmd
}

type verifyJSON struct {
	OK                bool                    `json:"ok"`
	Problems          []pgstore.VerifyProblem `json:"problems"`
	Truncated         bool                    `json:"truncated,omitempty"`
	Seals             int64                   `json:"seals"`
	LatestDigest      string                  `json:"latest_digest"`
	SealedEvents      int64                   `json:"sealed_events"`
	UnsealedEvents    int64                   `json:"unsealed_events"`
	SealedAuditRows   int64                   `json:"sealed_audit_rows"`
	UnsealedAuditRows int64                   `json:"unsealed_audit_rows"`
}

// errVerifyFailed makes `stele verify` exit 1 after printing the problems.
var errVerifyFailed = errors.New("history verification failed")

func newVerifyCmd(g *globalOpts) *cobra.Command {
	var digest string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Check that sealed history was not altered (exit 1 if it was)",
		Long: `Recompute the hash chains that stele seal built and report every event whose
row changed, was deleted or was inserted out of chain, every changed or deleted
audit row, and every seal that no longer matches what it sealed. Archived and
tombstoned streams verify as they are: archiving, retention and tombstones keep
the chain consistent.

--digest checks a digest that stele seal printed earlier and that was kept
outside the database: it must still be one of the store's seals.

Exits 1 if anything is wrong. Events appended since the last seal are not
covered yet: they are counted as unsealed. Like seal, it reads every tenant's
streams, so with row-level security on it runs as a role that bypasses it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			db, err := g.openGov(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			r, err := pgstore.VerifyHistory(ctx, db, g.schema, pgstore.VerifyOpts{Digest: digest})
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				problems := r.Problems
				if problems == nil {
					problems = []pgstore.VerifyProblem{}
				}
				err = writeJSONLine(w, verifyJSON{OK: len(r.Problems) == 0, Problems: problems, Truncated: r.Truncated, Seals: r.Seals,
					LatestDigest: r.LatestDigest, SealedEvents: r.SealedEvents, UnsealedEvents: r.UnsealedEvents,
					SealedAuditRows: r.SealedAuditRows, UnsealedAuditRows: r.UnsealedAuditRows})
			} else {
				for _, p := range r.Problems {
					fmt.Fprintln(w, p.String())
				}
				if r.Truncated {
					fmt.Fprintln(w, "... more problems not listed")
				}
				fmt.Fprintf(w, "checked %d seals, %d sealed events, %d sealed audit rows; %d events and %d audit rows not sealed yet\n",
					r.Seals, r.SealedEvents, r.SealedAuditRows, r.UnsealedEvents, r.UnsealedAuditRows)
				if len(r.Problems) == 0 {
					fmt.Fprint(w, "ok: history is as sealed")
					if r.LatestDigest != "" {
						fmt.Fprintf(w, "; latest digest %s", r.LatestDigest)
					}
					fmt.Fprintln(w)
				}
			}
			if err != nil {
				return err
			}
			if len(r.Problems) > 0 {
				return fmt.Errorf("%w: %d problems", errVerifyFailed, len(r.Problems))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&digest, "digest", "", "a digest printed by stele seal and kept outside the database")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as one JSON object")
	return cmd
}

type auditJSON struct {
	ID     int64     `json:"id"`
	At     time.Time `json:"at"`
	Actor  string    `json:"actor"`
	Role   string    `json:"role"`
	Action string    `json:"action"`
	Target string    `json:"target"`
	Detail any       `json:"detail"`
}

func newAuditCmd(g *globalOpts) *cobra.Command {
	var limit int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Print the audit trail of administrative actions, newest first",
		Long: `Print the audit trail: every administrative action (migrate, archive,
unarchive, retention, tombstone, restore repair, forget, ...) with who asked
(ACTOR, as given with --actor), the database ROLE that did it, when, on what,
and the details. The trail is append-only: the table refuses changes, and
stele seal / stele verify chain it like the events.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			trail, err := pgstore.Audit(ctx, db, g.schema, limit)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			tw := newTable(w)
			if !asJSON {
				fmt.Fprintln(tw, "ID\tAT\tACTOR\tROLE\tACTION\tTARGET\tDETAIL")
			}
			for _, a := range trail {
				if asJSON {
					err = writeJSONLine(w, auditJSON{ID: a.ID, At: a.At, Actor: a.Actor, Role: a.Role, Action: a.Action,
						Target: a.Target, Detail: rawJSON(a.Detail)})
				} else {
					_, err = fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", a.ID, a.At.Format(time.RFC3339), oneLine(a.Actor), a.Role,
						a.Action, orDash(oneLine(a.Target)), oneLine(string(a.Detail)))
				}
				if err != nil {
					return err
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 100, "print at most N rows")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per row")
	return cmd
}

type rawJSON []byte

func (r rawJSON) MarshalJSON() ([]byte, error) {
	if len(r) == 0 {
		return []byte("{}"), nil
	}
	return r, nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
