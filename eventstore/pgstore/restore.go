package pgstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
)

// The feed orders events by (transaction_id, global_position) and shows only
// rows of transactions older than every one still running. Transaction ids
// are a cluster's own counter: after a logical restore (pg_dump/pg_restore)
// into another cluster, or into the same cluster after it was rolled back to
// an earlier point, the stored ids no longer relate to the counter. Rows whose
// id the counter has not reached are invisible to the feed until it does
// (possibly forever), checkpoints beyond the counter skip new events, and new
// appends interleave with restored rows. RestoreCheck detects this and
// RestoreRepair renumbers the stored ids, keeping the feed's order exactly;
// docs/operations.md ("Backup and restore") explains the procedure.

// RestoreStatus is what RestoreCheck found.
type RestoreStatus struct {
	Schema string

	// The cluster this schema's data was recorded in (by migrate, or by the
	// last restore repair), as the cluster_identity row says.
	RecordedSystemID string
	RecordedDatabase string
	RecordedHorizon  uint64 // the next transaction id when it was recorded
	RecordedAt       time.Time
	RecordedBy       string

	// This cluster and database now. Horizon is the first transaction id the
	// cluster has not assigned (pg_snapshot_xmax of the check's snapshot);
	// Xmin the oldest transaction still running.
	SystemID string
	Database string
	Horizon  uint64
	Xmin     uint64

	// IdentityChanged: the data was recorded in another cluster (a dump
	// restored elsewhere, a pg_upgrade, a base backup turned into a new
	// cluster with initdb's help). DatabaseChanged alone (same cluster,
	// another database) is harmless: the ids come from the same counter.
	// CounterBehind: this cluster's counter is below the one recorded.
	IdentityChanged bool
	DatabaseChanged bool
	CounterBehind   bool

	// Stored transaction ids. Events counts the rows of the feed (the events
	// table and any other table of event rows); Checkpoints the rows that
	// hold a feed position (projection and relay checkpoints, dead letters).
	// *Ahead count those at or beyond Horizon: transactions this cluster has
	// not run. MaxTxID is the largest id stored in any of them.
	Events, EventsAhead           int64
	Streams, StreamsAhead         int64
	Checkpoints, CheckpointsAhead int64
	MaxTxID                       uint64

	// AppendedHere counts, when the identity changed, events this cluster
	// appended after the restore, before any repair: rows whose own xmin is
	// their transaction id, past every restored row. A repair would have to
	// put them before the restored history (their ids are smaller), where
	// consumers resuming mid-feed would never read them: RestoreRepair
	// refuses while there are any.
	AppendedHere int64

	// Unknown lists xid8 columns ("table.column") a repair would not know how
	// to map; RestoreRepair refuses to rewrite while there are any.
	Unknown []string

	// RewriteNeeded: some stored id is at or beyond Horizon, or the data
	// comes from another cluster and some id is not below every transaction
	// still running here. RestoreRepair renumbers the ids.
	RewriteNeeded bool
	// NeedsRepair: RewriteNeeded, or the identity changed (then a repair with
	// nothing to rewrite records this cluster's identity).
	NeedsRepair bool
}

// Reasons says in words why a repair is needed (none when it is not).
func (s RestoreStatus) Reasons() []string {
	var out []string
	switch {
	case s.RecordedSystemID == "":
		out = append(out, "no cluster identity is recorded: the data's origin is unknown")
	case s.IdentityChanged:
		out = append(out, fmt.Sprintf("the data was recorded in cluster %s, this is cluster %s", s.RecordedSystemID, s.SystemID))
	}
	if s.EventsAhead > 0 {
		out = append(out, fmt.Sprintf("%d of %d events carry a transaction id at or beyond this cluster's next one (%d): the feed does not show them", s.EventsAhead, s.Events, s.Horizon))
	}
	if s.StreamsAhead > 0 {
		out = append(out, fmt.Sprintf("%d streams' last_xid is beyond this cluster's next transaction id: appends to them are refused", s.StreamsAhead))
	}
	if s.CheckpointsAhead > 0 {
		out = append(out, fmt.Sprintf("%d checkpoints are beyond this cluster's next transaction id: their consumers would skip new events", s.CheckpointsAhead))
	}
	if s.RewriteNeeded && s.AppendedHere > 0 {
		out = append(out, fmt.Sprintf("%d events were appended in this cluster after the restore: a repair refuses (restore again and repair before any writer starts)", s.AppendedHere))
	}
	if s.RewriteNeeded && s.EventsAhead+s.StreamsAhead+s.CheckpointsAhead == 0 {
		out = append(out, fmt.Sprintf("stored transaction ids (up to %d) are not below every transaction still running here (oldest %d): new appends could interleave with them", s.MaxTxID, s.Xmin))
	}
	return out
}

// CheckpointChange is one stored feed position a repair moved.
type CheckpointChange struct {
	Table    string // projection_checkpoints, outbox_relays, projection_dead_letters, ...
	Key      string // the row's name or id
	Old, New eventstore.Position
}

// RepairResult says what RestoreRepair did.
type RepairResult struct {
	AuditID int64         // the admin_audit row of the repair
	Before  RestoreStatus // what RestoreCheck said first

	// Rewritten is false when only the identity was recorded: every stored
	// id was already below every transaction of this cluster.
	Rewritten bool
	// Events rows of the feed were renumbered. OldTransactions distinct ids
	// (from OldMinTxID to OldMaxTxID) became the ids 1..Runs.
	Events          int64
	OldTransactions int64
	Runs            int64
	OldMinTxID      uint64
	OldMaxTxID      uint64
	// BurnedXids transactions were run, doing nothing, so that Runs fits
	// below this cluster's oldest running transaction.
	BurnedXids int64
	Streams    int64              // streams rows whose last_xid was mapped
	Moved      []CheckpointChange // every stored feed position, old and new

	PreviousSystemID, SystemID string
}

// ErrNothingToRepair is returned by RestoreRepair when RestoreCheck finds
// nothing to repair.
var ErrNothingToRepair = errors.New("pgstore: nothing to repair: the stored transaction ids belong to this cluster")

// ErrAppendedBeforeRepair is returned by RestoreRepair when events were
// appended to a restored copy before it was repaired (RestoreStatus.AppendedHere).
var ErrAppendedBeforeRepair = errors.New("pgstore: events were appended to the restored schema before its repair; their place in the feed would be before the restored history, where consumers resuming from their checkpoints would never read them: restore the dump again and repair it before any writer starts")

// errRestoreChanged: the store changed between planning and applying.
var errRestoreChanged = errors.New("the store changed while the repair was being planned; stop every writer and consumer and run it again")

// maxBurn bounds the transaction ids a repair may consume. Reaching it would
// take on the order of a billion runs of out-of-order commits.
const maxBurn = 1 << 30

// feedTables are the tables of a schema that store transaction ids.
type feedTables struct {
	rows    []string      // tables of event rows: transaction_id xid8 and global_position bigint; events first
	points  []pointColumn // tables holding feed positions: transaction_id xid8 and position bigint
	streams bool          // streams.last_xid
	unknown []string
}

type pointColumn struct{ table, position string }

func (f feedTables) equal(g feedTables) bool {
	return strings.Join(f.rows, ",") == strings.Join(g.rows, ",") && fmt.Sprint(f.points) == fmt.Sprint(g.points) &&
		f.streams == g.streams && strings.Join(f.unknown, ",") == strings.Join(g.unknown, ",")
}

// discoverFeedTables finds every xid8 column of the schema's tables (not
// partitions: the parent covers them). Tables other engineers add later are
// handled by their shape: event rows (transaction_id with global_position)
// are renumbered with the events, feed positions (transaction_id with
// position) are mapped like checkpoints, anything else stops a repair.
func discoverFeedTables(ctx context.Context, tx *sqlx.Tx, schema string) (feedTables, error) {
	var f feedTables
	rows, err := tx.QueryContext(ctx, `
		SELECT c.relname, a.attname,
		       coalesce((SELECT string_agg(p.attname, ',' ORDER BY p.attname) FROM pg_attribute p
		                  WHERE p.attrelid = c.oid AND p.attnum > 0 AND NOT p.attisdropped
		                    AND p.atttypid = 'int8'::regtype AND p.attname IN ('global_position', 'position')), '')
		  FROM pg_class c
		  JOIN pg_namespace n ON n.oid = c.relnamespace
		  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
		 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND a.atttypid = 'xid8'::regtype
		 ORDER BY c.relname = 'events' DESC, c.relname, a.attname`, schema)
	if err != nil {
		return f, err
	}
	defer rows.Close()
	for rows.Next() {
		var table, column, positions string
		if err := rows.Scan(&table, &column, &positions); err != nil {
			return f, err
		}
		pos := strings.Split(positions, ",")
		has := func(name string) bool {
			for _, p := range pos {
				if p == name {
					return true
				}
			}
			return false
		}
		switch {
		case table == "cluster_identity" || table == "restore_runs":
			// ours: they record ids, they do not order anything
		case table == "streams" && column == "last_xid":
			f.streams = true
		case column == "transaction_id" && has("global_position"):
			f.rows = append(f.rows, table)
		case column == "transaction_id" && has("position"):
			f.points = append(f.points, pointColumn{table, "position"})
		default:
			f.unknown = append(f.unknown, table+"."+column)
		}
	}
	if err := rows.Err(); err != nil {
		return f, err
	}
	if len(f.rows) == 0 || f.rows[0] != "events" || !f.streams {
		return f, fmt.Errorf("schema %s has no events or streams table with transaction ids; run stele migrate", schema)
	}
	return f, nil
}

// RestoreCheck reports whether the transaction ids stored in schema belong to
// the cluster db is connected to: whether the data was recorded in another
// cluster, and whether any stored id is at or beyond this cluster's counter
// (rows the feed cannot show, checkpoints that would skip events). It only
// reads. Run it as the schema owner, before any writer or consumer starts on
// a restored database.
func RestoreCheck(ctx context.Context, db *sqlx.DB, schema string) (RestoreStatus, error) {
	if err := ValidateSchema(schema); err != nil {
		return RestoreStatus{}, err
	}
	tx, err := db.BeginTxx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
	if err != nil {
		return RestoreStatus{}, fmt.Errorf("pgstore: restore check: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // read only
	st, _, err := checkRestore(ctx, tx, schema)
	if err != nil {
		return st, fmt.Errorf("pgstore: restore check of %s: %w", schema, err)
	}
	return st, nil
}

func parseXid(s string) (uint64, error) {
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("transaction id %q: %w", s, err)
	}
	return v, nil
}

func xidText(v uint64) string { return strconv.FormatUint(v, 10) }

// checkRestore fills a RestoreStatus inside tx.
func checkRestore(ctx context.Context, tx *sqlx.Tx, schema string) (RestoreStatus, feedTables, error) {
	st := RestoreStatus{Schema: schema}
	q := quoteIdent(schema)
	// Row-level security must not hide rows from the check or the repair:
	// with it off, a query it would filter fails instead.
	if _, err := tx.ExecContext(ctx, `SET LOCAL row_security = off`); err != nil {
		return st, feedTables{}, err
	}
	var present bool
	if err := tx.QueryRowContext(ctx, `SELECT to_regclass($1) IS NOT NULL`, q+".cluster_identity").Scan(&present); err != nil {
		return st, feedTables{}, err
	}
	if !present {
		return st, feedTables{}, fmt.Errorf("no cluster_identity table: run stele migrate --schema %s (it records this cluster, so run restore-check before migrating a restored schema)", schema)
	}
	var horizon, xmin, recHorizon string
	if err := tx.QueryRowContext(ctx, `SELECT (pg_control_system()).system_identifier::text, current_database(),
			pg_snapshot_xmax(pg_current_snapshot())::text, pg_snapshot_xmin(pg_current_snapshot())::text`).
		Scan(&st.SystemID, &st.Database, &horizon, &xmin); err != nil {
		return st, feedTables{}, fmt.Errorf("reading this cluster's identity: %w", err)
	}
	err := tx.QueryRowContext(ctx, `SELECT system_identifier, database, xid_horizon::text, recorded_at, recorded_by FROM `+q+`.cluster_identity`).
		Scan(&st.RecordedSystemID, &st.RecordedDatabase, &recHorizon, &st.RecordedAt, &st.RecordedBy)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		recHorizon = "0"
	case err != nil:
		return st, feedTables{}, fmt.Errorf("reading the recorded cluster identity: %w", err)
	}
	for _, p := range []struct {
		s string
		v *uint64
	}{{horizon, &st.Horizon}, {xmin, &st.Xmin}, {recHorizon, &st.RecordedHorizon}} {
		if *p.v, err = parseXid(p.s); err != nil {
			return st, feedTables{}, err
		}
	}
	st.IdentityChanged = st.RecordedSystemID != st.SystemID
	st.DatabaseChanged = st.RecordedDatabase != st.Database
	st.CounterBehind = st.RecordedHorizon > st.Horizon

	tables, err := discoverFeedTables(ctx, tx, schema)
	if err != nil {
		return st, tables, err
	}
	st.Unknown = tables.unknown
	count := func(table, column string, n, ahead *int64) error {
		var max string
		var c, a int64
		err := tx.QueryRowContext(ctx, `SELECT count(*), count(*) FILTER (WHERE `+column+` >= $1::text::xid8),
				coalesce(max(`+column+`), '0')::text FROM `+q+`.`+quoteIdent(table), horizon).Scan(&c, &a, &max)
		if err != nil {
			return fmt.Errorf("reading %s.%s: %w", table, column, err)
		}
		m, err := parseXid(max)
		if err != nil {
			return err
		}
		*n += c
		*ahead += a
		st.MaxTxID = maxU(st.MaxTxID, m)
		return nil
	}
	for _, t := range tables.rows {
		if err := count(t, "transaction_id", &st.Events, &st.EventsAhead); err != nil {
			return st, tables, err
		}
	}
	if err := count("streams", "last_xid", &st.Streams, &st.StreamsAhead); err != nil {
		return st, tables, err
	}
	for _, p := range tables.points {
		if err := count(p.table, "transaction_id", &st.Checkpoints, &st.CheckpointsAhead); err != nil {
			return st, tables, err
		}
	}
	// At or beyond the horizon: ids this cluster never assigned. From another
	// cluster: any id not below every running transaction might share its id
	// with one of ours, or precede one that is still to append.
	st.RewriteNeeded = st.MaxTxID >= st.Horizon || (st.IdentityChanged && st.MaxTxID >= st.Xmin)
	st.NeedsRepair = st.RewriteNeeded || st.IdentityChanged
	if st.IdentityChanged {
		// A restored row's xmin is the restoring transaction's; an appended
		// one's is its own transaction id. Appends after the restore also
		// come after every restored position.
		if err := tx.QueryRowContext(ctx, `WITH c AS (
				SELECT global_position AS pos, (xmin = transaction_id::xid AND transaction_id < $1::text::xid8) AS here FROM `+q+`.events)
			SELECT count(*) FILTER (WHERE here AND pos > (SELECT coalesce(max(pos), 0) FROM c WHERE NOT here)) FROM c`, horizon).
			Scan(&st.AppendedHere); err != nil {
			return st, tables, fmt.Errorf("looking for events appended since the restore: %w", err)
		}
	}
	return st, tables, nil
}

func maxU(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

// The map. Every row of every event-row table, read in the old feed order
// (transaction_id, global_position), is cut into runs: a run ends where the
// next row's global_position is not greater than the previous one's. Run k
// (from 1) becomes transaction id k. Within a run, ordering by global_position
// is the old order; across runs the new id orders them. So the new order by
// (transaction_id, global_position) is the old order, row for row.
const mapTable = `pg_temp.stele_restore_map`

func buildMap(ctx context.Context, tx *sqlx.Tx, schema string, tables feedTables) error {
	q := quoteIdent(schema)
	var union []string
	for _, t := range tables.rows {
		union = append(union, `SELECT `+pqLiteral(t)+`::text AS src, transaction_id AS old_tx, global_position AS pos FROM `+q+`.`+quoteIdent(t))
	}
	stmts := []string{
		`CREATE TEMP TABLE stele_restore_map ON COMMIT DROP AS
		 WITH r AS (` + strings.Join(union, " UNION ALL ") + `),
		 b AS (SELECT src, old_tx, pos,
		              coalesce((pos <= lag(pos) OVER (ORDER BY old_tx, pos, src))::int, 0) AS brk
		         FROM r)
		 SELECT src, old_tx, pos, run, run::text::xid8 AS new_tx
		   FROM (SELECT src, old_tx, pos,
		                (1 + sum(brk) OVER (ORDER BY old_tx, pos, src ROWS UNBOUNDED PRECEDING))::bigint AS run
		           FROM b) s`,
		`CREATE INDEX ON ` + mapTable + ` (old_tx, pos)`,
		`CREATE INDEX ON ` + mapTable + ` (src, pos)`,
		`ANALYZE ` + mapTable,
	}
	for _, s := range stmts {
		if _, err := tx.ExecContext(ctx, s); err != nil {
			return fmt.Errorf("building the transaction id map: %w", err)
		}
	}
	// Check the claim rather than trust it: walking the old order, the new
	// key must rise at every row.
	var bad int64
	if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM (
			SELECT new_tx, pos, lag(new_tx) OVER w AS ptx, lag(pos) OVER w AS ppos
			  FROM `+mapTable+` WINDOW w AS (ORDER BY old_tx, pos, src)) x
		 WHERE (ptx, ppos) >= (new_tx, pos)`).Scan(&bad); err != nil {
		return fmt.Errorf("checking the transaction id map: %w", err)
	}
	if bad != 0 {
		return fmt.Errorf("the transaction id map does not keep the feed order at %d rows (duplicate global positions?)", bad)
	}
	return nil
}

// pqLiteral quotes a table name (already a catalog name) as a string literal.
func pqLiteral(s string) string { return `'` + strings.ReplaceAll(s, `'`, `''`) + `'` }

// mapStats are the facts of a map, compared between plan and apply.
type mapStats struct {
	Events          int64  `json:"events"`
	OldTransactions int64  `json:"old_transactions"`
	Runs            int64  `json:"runs"`
	OldMin          uint64 `json:"old_tx_min"`
	OldMax          uint64 `json:"old_tx_max"`
}

func readMapStats(ctx context.Context, tx *sqlx.Tx) (mapStats, error) {
	var m mapStats
	var lo, hi string
	err := tx.QueryRowContext(ctx, `SELECT count(*), count(DISTINCT old_tx), coalesce(max(run), 0),
			coalesce(min(old_tx), '0')::text, coalesce(max(old_tx), '0')::text FROM `+mapTable).
		Scan(&m.Events, &m.OldTransactions, &m.Runs, &lo, &hi)
	if err != nil {
		return m, fmt.Errorf("reading the transaction id map: %w", err)
	}
	if m.OldMin, err = parseXid(lo); err == nil {
		m.OldMax, err = parseXid(hi)
	}
	return m, err
}

// pointMapSQL selects, for every row of a table of feed positions, its key,
// its position, and the image of that position: the new key of the last row
// of the feed at or before it in the old order, or (0, 0) when none is.
// A consumer reads the rows after its checkpoint; the rows after that image
// in the new order are exactly the rows that were after the checkpoint.
func pointMapSQL(schema string, p pointColumn) string {
	t := quoteIdent(schema) + `.` + quoteIdent(p.table)
	pos := quoteIdent(p.position)
	return `SELECT c.ctid AS row_id,
	               coalesce(to_jsonb(c) ->> 'name', to_jsonb(c) ->> 'id', c.ctid::text) AS key,
	               c.transaction_id AS old_tx, c.` + pos + ` AS old_pos,
	               coalesce(m.new_tx, '0'::xid8) AS new_tx, coalesce(m.pos, 0) AS new_pos
	          FROM ` + t + ` c
	          LEFT JOIN LATERAL (SELECT x.new_tx, x.pos FROM ` + mapTable + ` x
	                              WHERE (x.old_tx, x.pos) <= (c.transaction_id, c.` + pos + `)
	                              ORDER BY x.old_tx DESC, x.pos DESC LIMIT 1) m ON true`
}

func scanChanges(rows *sql.Rows, table string) ([]CheckpointChange, error) {
	defer rows.Close()
	var out []CheckpointChange
	for rows.Next() {
		var c CheckpointChange
		var ot, nt string
		if err := rows.Scan(&c.Key, &ot, &c.Old.GlobalPosition, &nt, &c.New.GlobalPosition); err != nil {
			return nil, err
		}
		var err error
		if c.Old.TxID, err = parseXid(ot); err == nil {
			c.New.TxID, err = parseXid(nt)
		}
		if err != nil {
			return nil, err
		}
		c.Table = table
		out = append(out, c)
	}
	return out, rows.Err()
}

func previewPoints(ctx context.Context, tx *sqlx.Tx, schema string, tables feedTables) ([]CheckpointChange, error) {
	var out []CheckpointChange
	for _, p := range tables.points {
		rows, err := tx.QueryContext(ctx, `SELECT key, old_tx::text, old_pos, new_tx::text, new_pos FROM (`+pointMapSQL(schema, p)+`) v ORDER BY key`)
		if err != nil {
			return nil, fmt.Errorf("mapping %s: %w", p.table, err)
		}
		ch, err := scanChanges(rows, p.table)
		if err != nil {
			return nil, fmt.Errorf("mapping %s: %w", p.table, err)
		}
		out = append(out, ch...)
	}
	return out, nil
}

// repairPlan is worked out before the audited transaction, so that its facts
// go into the audit row; the transaction works them out again under its
// locks and refuses to go on if anything differs.
type repairPlan struct {
	status  RestoreStatus
	tables  feedTables
	stats   mapStats
	changes []CheckpointChange
}

func planRepair(ctx context.Context, db *sqlx.DB, schema string) (repairPlan, error) {
	var p repairPlan
	tx, err := db.BeginTxx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead})
	if err != nil {
		return p, err
	}
	defer tx.Rollback() //nolint:errcheck // it only made a temporary table
	if p.status, p.tables, err = checkRestore(ctx, tx, schema); err != nil {
		return p, err
	}
	if !p.status.RewriteNeeded {
		return p, nil
	}
	if len(p.tables.unknown) > 0 {
		return p, fmt.Errorf("columns of type xid8 that a repair cannot map: %s (teach pgstore's restore repair about them)", strings.Join(p.tables.unknown, ", "))
	}
	if err := buildMap(ctx, tx, schema, p.tables); err != nil {
		return p, err
	}
	if p.stats, err = readMapStats(ctx, tx); err != nil {
		return p, err
	}
	if p.changes, err = previewPoints(ctx, tx, schema, p.tables); err != nil {
		return p, err
	}
	return p, nil
}

// burnXids runs n empty transactions that each take a transaction id.
func burnXids(ctx context.Context, db *sqlx.DB, n int64) error {
	for n > 0 {
		k := min(n, 1_000_000)
		// COMMIT inside DO needs a statement outside a transaction block: the
		// pool's autocommit statement is one. Each iteration takes one id.
		if _, err := db.ExecContext(ctx, `DO $$ BEGIN FOR i IN 1..`+strconv.FormatInt(k, 10)+
			` LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$`); err != nil {
			return fmt.Errorf("consuming transaction ids: %w", err)
		}
		n -= k
	}
	return nil
}

// counters reads this cluster's next transaction id and oldest running one.
func counters(ctx context.Context, db *sqlx.DB) (next, xmin uint64, err error) {
	var a, b string
	if err = db.QueryRowContext(ctx, `SELECT pg_snapshot_xmax(s)::text, pg_snapshot_xmin(s)::text FROM pg_current_snapshot() s`).Scan(&a, &b); err != nil {
		return 0, 0, err
	}
	if next, err = parseXid(a); err == nil {
		xmin, err = parseXid(b)
	}
	return next, xmin, err
}

// oldestRunning describes the oldest transaction of the cluster, for an error.
func oldestRunning(ctx context.Context, db *sqlx.DB) string {
	var pid int
	var xid, state, datname, app string
	err := db.QueryRowContext(ctx, `SELECT pid, backend_xid::text, coalesce(state, ''), coalesce(datname, ''), coalesce(application_name, '')
		FROM pg_stat_activity WHERE backend_xid IS NOT NULL ORDER BY age(backend_xid) DESC LIMIT 1`).Scan(&pid, &xid, &state, &datname, &app)
	if err != nil {
		return "an older transaction is still running"
	}
	return fmt.Sprintf("transaction %s (pid %d, database %q, application %q, %s) is still running", xid, pid, datname, app, state)
}

// RestoreRepair makes the transaction ids stored in schema belong to this
// cluster again, through the audited admin path (Admin, action
// "restore-repair"), and records this cluster's identity.
//
// When ids must be rewritten, every row of the feed gets a new transaction id
// below every transaction this cluster has running or will run, keeping the
// feed's order exactly (see buildMap), global positions unchanged; every
// stored feed position (projection and relay checkpoints, dead letters, any
// other table with transaction_id and position) moves to the image of the
// last event at or before it, and streams.last_xid to the image of its
// transaction. A consumer that resumes from a moved checkpoint reads exactly
// the events it had not read, in the order it would have; new appends come
// after every restored event. If the new ids do not fit below this cluster's
// counter, empty transactions are run first to advance it.
//
// When the ids already fit (a pg_upgrade, a restore into a busier cluster),
// only the identity is recorded.
//
// Stop every writer, projection, relay and subscriber of the schema first:
// their in-memory positions are old ids. Returns ErrNothingToRepair when
// RestoreCheck finds nothing to do.
func RestoreRepair(ctx context.Context, db *sqlx.DB, schema, actor string) (RepairResult, error) {
	var res RepairResult
	if err := ValidateSchema(schema); err != nil {
		return res, err
	}
	if actor == "" {
		return res, ErrAdminAction
	}
	plan, err := planRepair(ctx, db, schema)
	res.Before = plan.status
	if err != nil {
		return res, fmt.Errorf("pgstore: restore repair of %s: %w", schema, err)
	}
	if !plan.status.NeedsRepair {
		return res, ErrNothingToRepair
	}
	if plan.status.RewriteNeeded && plan.status.AppendedHere > 0 {
		return res, fmt.Errorf("%w (%d events)", ErrAppendedBeforeRepair, plan.status.AppendedHere)
	}
	res.PreviousSystemID, res.SystemID = plan.status.RecordedSystemID, plan.status.SystemID
	if plan.status.RewriteNeeded {
		// Run k gets transaction id k: every k must be below the oldest
		// transaction running now, so that no running or later transaction
		// can append before a restored event.
		next, xmin, err := counters(ctx, db)
		if err != nil {
			return res, fmt.Errorf("pgstore: restore repair of %s: reading the transaction counter: %w", schema, err)
		}
		if uint64(plan.stats.Runs) >= xmin {
			n := int64(uint64(plan.stats.Runs)+1) - int64(next) + 16
			if n > maxBurn {
				return res, fmt.Errorf("pgstore: restore repair of %s: %d runs would need %d transaction ids consumed first; refusing", schema, plan.stats.Runs, n)
			}
			if n > 0 {
				if err := burnXids(ctx, db, n); err != nil {
					return res, fmt.Errorf("pgstore: restore repair of %s: %w", schema, err)
				}
				res.BurnedXids = n
			}
			if _, xmin, err = counters(ctx, db); err != nil {
				return res, fmt.Errorf("pgstore: restore repair of %s: %w", schema, err)
			}
			if uint64(plan.stats.Runs) >= xmin {
				return res, fmt.Errorf("pgstore: restore repair of %s: the %d new transaction ids must be below every running transaction, but %s; end it and run the repair again",
					schema, plan.stats.Runs, oldestRunning(ctx, db))
			}
		}
	}
	detail := repairDetail(plan, res.BurnedXids)
	id, err := Admin(ctx, db, schema, AdminAction{Actor: actor, Action: "restore-repair", Target: schema, Detail: detail},
		func(tx *sqlx.Tx) error { return applyRepair(ctx, tx, schema, plan, &res) })
	if err != nil {
		return res, err
	}
	res.AuditID = id
	return res, nil
}

func repairDetail(plan repairPlan, burned int64) map[string]any {
	st := plan.status
	d := map[string]any{
		"reasons":                st.Reasons(),
		"from_system_identifier": st.RecordedSystemID,
		"from_database":          st.RecordedDatabase,
		"from_xid_horizon":       xidText(st.RecordedHorizon),
		"to_system_identifier":   st.SystemID,
		"to_database":            st.Database,
		"to_xid_horizon":         xidText(st.Horizon),
		"rewrite":                st.RewriteNeeded,
	}
	if !st.RewriteNeeded {
		return d
	}
	d["map"] = plan.stats
	d["rule"] = "rows read in old (transaction_id, global_position) order, cut into runs of rising global_position; run k gets transaction_id k; global_position unchanged; a stored position moves to the new key of the last row at or before it; streams.last_xid to the new id of its transaction"
	d["new_tx_min"], d["new_tx_max"] = min(plan.stats.Runs, 1), plan.stats.Runs
	d["burned_xids"] = burned
	d["runs_table"] = "restore_runs (audit_id = this row's id)"
	const keep = 500
	var moved []map[string]any
	for i, c := range plan.changes {
		if i == keep {
			break
		}
		moved = append(moved, map[string]any{"table": c.Table, "key": c.Key, "old": c.Old.String(), "new": c.New.String()})
	}
	d["positions_moved"] = moved
	d["positions_total"] = len(plan.changes)
	return d
}

// applyRepair runs inside the audited transaction.
func applyRepair(ctx context.Context, tx *sqlx.Tx, schema string, plan repairPlan, res *RepairResult) error {
	q := quoteIdent(schema)
	if _, err := tx.ExecContext(ctx, `SET LOCAL lock_timeout = '30s'`); err != nil {
		return err
	}
	// Writers and checkpointers wait until the repair commits (they should
	// all be stopped; this makes sure no row changes under it).
	lock := []string{q + `.cluster_identity`, q + `.restore_runs`, q + `.streams`}
	for _, t := range plan.tables.rows {
		lock = append(lock, q+`.`+quoteIdent(t))
	}
	for _, p := range plan.tables.points {
		lock = append(lock, q+`.`+quoteIdent(p.table))
	}
	if _, err := tx.ExecContext(ctx, `LOCK TABLE `+strings.Join(lock, ", ")+` IN EXCLUSIVE MODE`); err != nil {
		return fmt.Errorf("locking the store (stop its writers and consumers): %w", err)
	}
	st, tables, err := checkRestore(ctx, tx, schema)
	if err != nil {
		return err
	}
	// Under the locks, the data must be what was planned. (The decision is
	// the plan's: consuming ids may since have moved the counter past some
	// stored ids, which does not make the old ones right.)
	p := plan.status
	if !tables.equal(plan.tables) || st.SystemID != p.SystemID || st.MaxTxID != p.MaxTxID ||
		st.Events != p.Events || st.Streams != p.Streams || st.Checkpoints != p.Checkpoints || st.AppendedHere != p.AppendedHere {
		return errRestoreChanged
	}
	switch {
	case p.RewriteNeeded:
		if err := rewrite(ctx, tx, schema, plan, res); err != nil {
			return err
		}
	case st.RewriteNeeded:
		return errRestoreChanged
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.cluster_identity (system_identifier, database, xid_horizon, recorded_by)
		SELECT (pg_control_system()).system_identifier::text, current_database(), pg_current_xact_id(), 'restore-repair'
		ON CONFLICT (singleton) DO UPDATE SET system_identifier = excluded.system_identifier, database = excluded.database,
			xid_horizon = excluded.xid_horizon, recorded_at = now(), recorded_by = excluded.recorded_by`); err != nil {
		return fmt.Errorf("recording this cluster's identity: %w", err)
	}
	return nil
}

func rewrite(ctx context.Context, tx *sqlx.Tx, schema string, plan repairPlan, res *RepairResult) error {
	q := quoteIdent(schema)
	if err := buildMap(ctx, tx, schema, plan.tables); err != nil {
		return err
	}
	stats, err := readMapStats(ctx, tx)
	if err != nil {
		return err
	}
	if stats != plan.stats {
		return errRestoreChanged
	}
	var xminText string
	if err := tx.QueryRowContext(ctx, `SELECT pg_snapshot_xmin(pg_current_snapshot())::text`).Scan(&xminText); err != nil {
		return err
	}
	xmin, err := parseXid(xminText)
	if err != nil {
		return err
	}
	if uint64(stats.Runs) >= xmin {
		return fmt.Errorf("the %d new transaction ids must be below every running transaction, but the oldest is %d; end it and run the repair again", stats.Runs, xmin)
	}
	res.Rewritten = true
	res.Events, res.OldTransactions, res.Runs = stats.Events, stats.OldTransactions, stats.Runs
	res.OldMinTxID, res.OldMaxTxID = stats.OldMin, stats.OldMax

	// The rows: each keeps its global_position and takes its run's id.
	for _, t := range plan.tables.rows {
		var want int64
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM `+mapTable+` WHERE src = $1`, t).Scan(&want); err != nil {
			return err
		}
		r, err := tx.ExecContext(ctx, `UPDATE `+q+`.`+quoteIdent(t)+` e SET transaction_id = m.new_tx
			FROM `+mapTable+` m WHERE m.src = $1 AND m.pos = e.global_position AND m.old_tx = e.transaction_id`, t)
		if err != nil {
			return fmt.Errorf("renumbering %s: %w", t, err)
		}
		if n, err := r.RowsAffected(); err != nil || n != want {
			return fmt.Errorf("renumbering %s: %d rows changed, want %d (%v)", t, n, want, err)
		}
	}
	// The per-stream order guard: a stream's last writer, mapped like its
	// events (the new id of the last row at or before that transaction).
	r, err := tx.ExecContext(ctx, `UPDATE `+q+`.streams s SET last_xid = coalesce(
			(SELECT m.new_tx FROM `+mapTable+` m WHERE m.old_tx <= s.last_xid ORDER BY m.old_tx DESC, m.pos DESC LIMIT 1), '0')`)
	if err != nil {
		return fmt.Errorf("mapping streams.last_xid: %w", err)
	}
	res.Streams, _ = r.RowsAffected()
	// Checkpoints and other stored positions.
	for _, p := range plan.tables.points {
		rows, err := tx.QueryContext(ctx, `WITH v AS (`+pointMapSQL(schema, p)+`)
			UPDATE `+q+`.`+quoteIdent(p.table)+` t SET transaction_id = v.new_tx, `+quoteIdent(p.position)+` = v.new_pos
			  FROM v WHERE t.ctid = v.row_id
			RETURNING v.key, v.old_tx::text, v.old_pos, v.new_tx::text, v.new_pos`)
		if err != nil {
			return fmt.Errorf("mapping %s: %w", p.table, err)
		}
		ch, err := scanChanges(rows, p.table)
		if err != nil {
			return fmt.Errorf("mapping %s: %w", p.table, err)
		}
		res.Moved = append(res.Moved, ch...)
	}
	if !sameChanges(res.Moved, plan.changes) {
		return errRestoreChanged
	}
	// Keep the runs, for positions stored outside this schema.
	if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.restore_runs
			(audit_id, new_tx, first_old_tx, first_position, last_old_tx, last_position, events)
		SELECT current_setting('stele.admin_action')::bigint, new_tx, min(old_tx), min(pos), max(old_tx), max(pos), count(*)
		  FROM `+mapTable+` GROUP BY new_tx`); err != nil {
		return fmt.Errorf("recording the runs: %w", err)
	}
	return nil
}

func sameChanges(a, b []CheckpointChange) bool {
	if len(a) != len(b) {
		return false
	}
	key := func(c CheckpointChange) string { return c.Table + "\x00" + c.Key }
	seen := map[string]CheckpointChange{}
	for _, c := range b {
		seen[key(c)] = c
	}
	for _, c := range a {
		if seen[key(c)] != c {
			return false
		}
	}
	return true
}

// ErrNoRestoreRepair is returned by RestoreMapPosition when no repair has
// rewritten transaction ids in the schema.
var ErrNoRestoreRepair = errors.New("pgstore: no restore repair has rewritten transaction ids in this schema")

// RestoreMapPosition maps a feed position taken before the latest restore
// repair (an event's Position, or a checkpoint kept outside this schema: a
// read model in another database, a broker consumer's offset store) to the
// position of the same event after it. A position between two runs maps to
// the last event before it, one before the first event to Start. It is exact for positions of events and for Start, which is what
// stele's consumers store; it maps through the latest repair only.
func RestoreMapPosition(ctx context.Context, db *sqlx.DB, schema string, old eventstore.Position) (eventstore.Position, error) {
	if err := ValidateSchema(schema); err != nil {
		return eventstore.Position{}, err
	}
	if old == eventstore.Start {
		return eventstore.Start, nil
	}
	q := quoteIdent(schema)
	var audit sql.NullInt64
	if err := db.QueryRowContext(ctx, `SELECT max(audit_id) FROM `+q+`.restore_runs`).Scan(&audit); err != nil {
		return eventstore.Position{}, fmt.Errorf("pgstore: mapping %s: %w", old, err)
	}
	if !audit.Valid {
		return eventstore.Position{}, ErrNoRestoreRepair
	}
	var nt, lt string
	var lastPos int64
	err := db.QueryRowContext(ctx, `SELECT new_tx::text, last_old_tx::text, last_position FROM `+q+`.restore_runs
		WHERE audit_id = $1 AND (first_old_tx, first_position) <= ($2::text::xid8, $3::bigint)
		ORDER BY first_old_tx DESC, first_position DESC LIMIT 1`, audit.Int64, xidText(old.TxID), old.GlobalPosition).Scan(&nt, &lt, &lastPos)
	if errors.Is(err, sql.ErrNoRows) {
		return eventstore.Start, nil
	}
	if err != nil {
		return eventstore.Position{}, fmt.Errorf("pgstore: mapping %s: %w", old, err)
	}
	newTx, err := parseXid(nt)
	if err != nil {
		return eventstore.Position{}, err
	}
	lastTx, err := parseXid(lt)
	if err != nil {
		return eventstore.Position{}, err
	}
	last := eventstore.Position{TxID: lastTx, GlobalPosition: lastPos}
	if last.Less(old) {
		return eventstore.Position{TxID: newTx, GlobalPosition: lastPos}, nil
	}
	return eventstore.Position{TxID: newTx, GlobalPosition: old.GlobalPosition}, nil
}
