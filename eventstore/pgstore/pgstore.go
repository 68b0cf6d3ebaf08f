// Package pgstore is the PostgreSQL event store: an append-only log in two
// tables (streams, events) of one schema, over database/sql through sqlx.
// lib/pq is the default driver; pgx's database/sql driver ("pgx") works too
// and is tested the same way.
//
// The global feed never skips an event: every row records the transaction
// that wrote it, and readers take only rows of transactions older than the
// oldest one still running, in (transaction id, position) order. See
// docs/eventstore.md for the guarantees and what they cost.
package pgstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/notify"
)

// Config tunes a Store. A nil *Config means all defaults.
type Config struct {
	// Schema holds the stele tables. Defaults to "stele".
	Schema string
	// Limits bound appends; zero fields take eventstore.DefaultLimits.
	Limits eventstore.Limits
	// DisableGroupCommit makes every Append a transaction of its own. By
	// default appends that arrive while a commit is in flight are folded into
	// the next one (each keeps its own checks and outcome).
	DisableGroupCommit bool
	// GroupCommitFlushers is how many group commits may be in flight at once.
	// The first takes whatever is queued; the others join in only when at
	// least 32 events are waiting, where a second commit in flight pays off.
	// Defaults to 2 (see docs/performance.md).
	GroupCommitFlushers int
	// GroupCommitLinger is how long a flusher that has just answered a group
	// waits for those callers to append again before it sends what is
	// queued. It applies only right after a commit, to callers known to be
	// active; an append that finds the committer idle is sent at once.
	// Defaults to 200µs; negative turns it off.
	GroupCommitLinger time.Duration
	// GroupCommitMaxEvents caps the events of one group commit. Defaults to 4,000.
	GroupCommitMaxEvents int
	// PollInterval is how often an idle subscriber looks for events written by
	// other processes (or committed through AppendTx); appends through this
	// Store wake its subscribers at once. Defaults to 100ms.
	PollInterval time.Duration
	// MaxAppendRetries bounds Append's own retries of retryable refusals.
	// Defaults to 50.
	MaxAppendRetries int
	// Logger receives structured logs. Defaults to slog.Default().
	Logger *slog.Logger
}

func (c *Config) withDefaults() (Config, error) {
	var out Config
	if c != nil {
		out = *c
	}
	if out.Schema == "" {
		out.Schema = "stele"
	}
	if out.GroupCommitFlushers == 0 {
		out.GroupCommitFlushers = 2
	}
	if out.GroupCommitLinger == 0 {
		out.GroupCommitLinger = 200 * time.Microsecond
	}
	if out.GroupCommitMaxEvents == 0 {
		out.GroupCommitMaxEvents = 4000
	}
	if out.PollInterval == 0 {
		out.PollInterval = 100 * time.Millisecond
	}
	if out.MaxAppendRetries == 0 {
		out.MaxAppendRetries = 50
	}
	if out.Logger == nil {
		out.Logger = slog.Default()
	}
	out.Limits = out.Limits.WithDefaults()
	var errs []error
	if err := ValidateSchema(out.Schema); err != nil {
		errs = append(errs, fmt.Errorf("Config.Schema: %w", err))
	}
	if out.GroupCommitFlushers < 0 {
		errs = append(errs, fmt.Errorf("pgstore: Config.GroupCommitFlushers %d: must be positive", out.GroupCommitFlushers))
	}
	if out.GroupCommitMaxEvents < out.Limits.MaxBatchEvents {
		errs = append(errs, fmt.Errorf("pgstore: Config.GroupCommitMaxEvents %d: must be at least Limits.MaxBatchEvents (%d)", out.GroupCommitMaxEvents, out.Limits.MaxBatchEvents))
	}
	if out.PollInterval < 0 {
		errs = append(errs, fmt.Errorf("pgstore: Config.PollInterval %s: must be positive", out.PollInterval))
	}
	return out, errors.Join(errs...)
}

// Store is the PostgreSQL event store. It is safe for concurrent use; Close
// it to stop its group-commit goroutines.
type Store struct {
	db     *sqlx.DB
	cfg    Config
	schema string // quoted
	wake   *notify.Notifier
	stmts  *statements // shared with the stores ForTenant returns
	commit *committer  // nil when group commit is off
	tenant string      // "" unless made by ForTenant
	child  bool        // made by ForTenant: Close leaves stmts to the parent
}

var _ eventstore.Store = (*Store)(nil)

// New returns a Store over db. The schema must have been migrated (Migrate or
// `stele migrate`). A nil config means all defaults.
func New(db *sqlx.DB, config *Config) (*Store, error) {
	cfg, err := config.withDefaults()
	if err != nil {
		return nil, err
	}
	if db == nil {
		return nil, errors.New("pgstore: New: db is nil")
	}
	s := &Store{db: db, cfg: cfg, schema: quoteIdent(cfg.Schema), wake: notify.New(cfg.PollInterval), stmts: &statements{}}
	s.stmts.init(s.schema)
	if !cfg.DisableGroupCommit {
		s.commit = newCommitter(s)
	}
	return s, nil
}

// Close stops the group committer after the appends already queued, and
// releases prepared statements. It does not close the *sqlx.DB.
func (s *Store) Close() error {
	if s.commit != nil {
		s.commit.close()
	}
	if s.child {
		return nil
	}
	return s.stmts.close()
}

// Schema returns the schema the store's tables live in.
func (s *Store) Schema() string { return s.cfg.Schema }

// DB returns the database the store uses.
func (s *Store) DB() *sqlx.DB { return s.db }

// WaitForAppend returns a channel closed at this store's next commit, or
// after PollInterval so that other writers' events are seen too.
func (s *Store) WaitForAppend() <-chan struct{} { return s.wake.Wait() }

// Notify wakes this store's subscribers now; call it after committing a
// transaction that used AppendTx to skip the poll interval.
func (s *Store) Notify() { s.wake.Notify() }

// statements are prepared once per Store on first use, so the append and read
// paths send no SQL text per call.
type statements struct {
	mu       sync.Mutex
	prepared map[string]*sql.Stmt
	text     map[string]string
}

const (
	stmtAppend          = "append"
	stmtAppendTenant    = "appendTenant"
	stmtStoredByID      = "stored"
	stmtReadFwd         = "readFwd"
	stmtReadBwd         = "readBwd"
	stmtVersion         = "version"
	stmtReadAll         = "readAll"
	stmtReadAllCategory = "readAllCategory"
	stmtReadAllSince    = "readAllSince"
	stmtReadAllCatSince = "readAllCategorySince"
	stmtHead            = "head"
	stmtListStreams     = "listStreams"
	stmtListCategory    = "listStreamsCategory"

	// tenantForm suffixes the name of a read statement's form for a store
	// bound to a tenant (statements.init).
	tenantForm = ".tenant"
)

// eventColumns are read from the events table aliased e. The transaction id
// is read as text under another name: an output column named transaction_id
// would capture ORDER BY transaction_id and sort the feed as text.
const eventColumns = `e.global_position, e.transaction_id::text AS xid, e.stream_id, e.version, e.event_id, e.event_type, e.content_type, e.data, e.metadata, e.recorded_at`

func (st *statements) init(schema string) {
	// Every statement names the tenant ('' for a store bound to none) as its
	// last parameter: the keys and indexes lead with it. The feed's reads are
	// functions of migration 0008, which pin their plans; the stream reads,
	// functions of 0010 planned on each call.
	feed := `SELECT * FROM ` + schema + `.read_feed(`
	catFeed := `SELECT * FROM ` + schema + `.read_category_feed(`
	cursor := `$1::text::xid8, $2::bigint, $3::int, `
	st.text = map[string]string{
		stmtAppend: `SELECT o_req, o_status, o_actual, o_first_pos, o_last_pos, o_xid FROM ` + schema +
			`.append_events($1::text[], $2::bigint[], $3::int[], $4::int[], $5::int[], $6::int[], $7::uuid[], $8::text[], $9::text[], $10::bytea[], $11::jsonb[], $12::boolean)`,
		// A tenant's group commit in one autocommit statement: the one-row
		// subquery sets the tenant for the statement's transaction (SET
		// LOCAL), and the function, whose first argument depends on that
		// row, runs only after it.
		stmtAppendTenant: `SELECT o_req, o_status, o_actual, o_first_pos, o_last_pos, o_xid
			FROM (SELECT set_config('` + TenantSetting + `', $13, true) AS tenant) t, LATERAL ` + schema +
			`.append_events(CASE WHEN t.tenant = $13 THEN $1::text[] END, $2::bigint[], $3::int[], $4::int[], $5::int[], $6::int[], $7::uuid[], $8::text[], $9::text[], $10::bytea[], $11::jsonb[], $12::boolean) o`,
		stmtStoredByID: `SELECT ` + eventColumns + ` FROM ` + schema + `.events e WHERE e.event_id = ANY ($1::uuid[]) AND e.tenant_id = $2`,
		// Stream reads are functions of migration 0010, planned per call.
		stmtReadFwd:         `SELECT * FROM ` + schema + `.read_stream($4, $1::text, $2::bigint, $3::bigint, false)`,
		stmtReadBwd:         `SELECT * FROM ` + schema + `.read_stream($4, $1::text, $2::bigint, $3::bigint, true)`,
		stmtVersion:         `SELECT * FROM ` + schema + `.stream_version($2, $1::text)`,
		stmtHead:            `SELECT * FROM ` + schema + `.feed_head($1)`,
		stmtReadAll:         feed + `$4, ` + cursor + `NULL)`,
		stmtReadAllSince:    feed + `$5, ` + cursor + `$4)`,
		stmtReadAllCategory: catFeed + `$5, $4, ` + cursor + `NULL)`,
		stmtReadAllCatSince: catFeed + `$6, $4, ` + cursor + `$5)`,
		stmtListStreams: `SELECT stream_id, category, version, created_at, updated_at FROM ` + schema + `.streams
			WHERE tenant_id = $3 AND stream_id > $1 AND version > 0 ORDER BY tenant_id, stream_id LIMIT $2`,
		stmtListCategory: `SELECT stream_id, category, version, created_at, updated_at FROM ` + schema + `.streams
			WHERE tenant_id = $4 AND category = $3 AND stream_id > $1 AND version > 0 ORDER BY tenant_id, category, stream_id LIMIT $2`,
	}
	// A store bound to a tenant reads through forms of these statements that
	// set the tenant themselves, for the statement's own transaction (SET
	// LOCAL), so a read stays one round trip: a one-row subquery sets it,
	// and the query, made LATERAL and taking the tenant from that row, can
	// only run after it. Row-level security, when on, reads the setting
	// inside the query. The number is the tenant's parameter.
	for name, param := range map[string]string{
		stmtStoredByID: "$2", stmtReadFwd: "$4", stmtReadBwd: "$4", stmtVersion: "$2", stmtHead: "$1",
		stmtReadAll: "$4", stmtReadAllSince: "$5", stmtReadAllCategory: "$5", stmtReadAllCatSince: "$6",
		stmtListStreams: "$3", stmtListCategory: "$4",
	} {
		st.text[name+tenantForm] = `SELECT x.* FROM (SELECT set_config('` + TenantSetting + `', ` + param + `::text, true) AS tenant) t,
			LATERAL (` + strings.ReplaceAll(st.text[name], param, "t.tenant") + `) x`
	}
	st.prepared = make(map[string]*sql.Stmt)
}

// get returns the prepared statement name, preparing it on first use. A
// failed prepare (say, the schema is not migrated yet) is retried next time.
func (s *Store) stmt(ctx context.Context, name string) (*sql.Stmt, error) {
	st := s.stmts
	st.mu.Lock()
	defer st.mu.Unlock()
	if p := st.prepared[name]; p != nil {
		return p, nil
	}
	p, err := s.db.PrepareContext(ctx, st.text[name])
	if err != nil {
		return nil, fmt.Errorf("preparing the %s statement in schema %s (is it migrated? run `stele migrate` or pgstore.Migrate): %w", name, s.cfg.Schema, err)
	}
	st.prepared[name] = p
	return p, nil
}

func (st *statements) close() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	var errs []error
	for name, p := range st.prepared {
		errs = append(errs, p.Close())
		delete(st.prepared, name)
	}
	return errors.Join(errs...)
}

// queryEvents runs the events statement name with args (the tenant is added
// as the last) and scans the rows.
func (s *Store) queryEvents(ctx context.Context, name string, sizeHint int, args ...any) ([]eventstore.Event, error) {
	p, err := s.readStmt(ctx, name)
	if err != nil {
		return nil, err
	}
	rows, err := p.QueryContext(ctx, append(args, s.tenant)...)
	if err != nil {
		return nil, err
	}
	return scanEvents(rows, sizeHint)
}

// readStmt returns the prepared read statement name in this store's form:
// for a store bound to a tenant, the form that sets the tenant itself.
func (s *Store) readStmt(ctx context.Context, name string) (*sql.Stmt, error) {
	return s.stmt(ctx, s.form(name))
}

// form names the form of read statement name this store uses.
func (s *Store) form(name string) string {
	if s.tenant != "" {
		return name + tenantForm
	}
	return name
}

func pageLimit(n int) int {
	if n <= 0 {
		return eventstore.DefaultPageSize
	}
	return n
}

// ReadStream reads one page of a stream.
func (s *Store) ReadStream(ctx context.Context, streamID string, opts eventstore.ReadStreamOpts) ([]eventstore.Event, error) {
	if err := eventstore.ValidateStreamID(streamID); err != nil {
		return nil, err
	}
	limit := pageLimit(opts.Limit)
	var events []eventstore.Event
	var err error
	if opts.Direction == eventstore.Backward {
		from := int64(opts.From)
		if from <= 0 {
			from = 1<<63 - 1
		}
		events, err = s.queryEvents(ctx, stmtReadBwd, limit, streamID, from, limit)
	} else {
		events, err = s.queryEvents(ctx, stmtReadFwd, limit, streamID, int64(max(opts.From, 1)), limit)
	}
	if err != nil {
		return nil, fmt.Errorf("pgstore: reading stream %q: %w", streamID, err)
	}
	return events, nil
}

// LoadStream reads a whole stream forwards with one query.
func (s *Store) LoadStream(ctx context.Context, streamID string) ([]eventstore.Event, error) {
	if err := eventstore.ValidateStreamID(streamID); err != nil {
		return nil, err
	}
	events, err := s.queryEvents(ctx, stmtReadFwd, 64, streamID, int64(1), int64(1<<62))
	if err != nil {
		return nil, fmt.Errorf("pgstore: loading stream %q: %w", streamID, err)
	}
	return events, nil
}

// StreamVersion returns the stream's current version (0 if it has none).
func (s *Store) StreamVersion(ctx context.Context, streamID string) (eventstore.Version, error) {
	if err := eventstore.ValidateStreamID(streamID); err != nil {
		return 0, err
	}
	p, err := s.readStmt(ctx, stmtVersion)
	if err != nil {
		return 0, fmt.Errorf("pgstore: reading version of %q: %w", streamID, err)
	}
	var v int64
	err = p.QueryRowContext(ctx, streamID, s.tenant).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("pgstore: reading version of %q: %w", streamID, err)
	}
	return eventstore.Version(v), nil
}

// ReadAll reads one page of the global feed after opts.After. Only events of
// transactions older than every transaction still running are returned, so
// nothing can later appear before the last event of a page.
func (s *Store) ReadAll(ctx context.Context, opts eventstore.ReadAllOpts) ([]eventstore.Event, error) {
	limit := pageLimit(opts.Limit)
	args := []any{strconv.FormatUint(opts.After.TxID, 10), opts.After.GlobalPosition, limit}
	name := stmtReadAll
	switch {
	case opts.Category != "" && !opts.Since.IsZero():
		name, args = stmtReadAllCatSince, append(args, opts.Category, opts.Since)
	case opts.Category != "":
		name, args = stmtReadAllCategory, append(args, opts.Category)
	case !opts.Since.IsZero():
		name, args = stmtReadAllSince, append(args, opts.Since)
	}
	events, err := s.queryEvents(ctx, name, limit, args...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: reading the feed after %s: %w", opts.After, err)
	}
	return events, nil
}

// Head returns the position of the last event the feed shows now.
func (s *Store) Head(ctx context.Context) (eventstore.Position, error) {
	p, err := s.readStmt(ctx, stmtHead)
	if err != nil {
		return eventstore.Position{}, fmt.Errorf("pgstore: reading the feed's head: %w", err)
	}
	var xid string
	var pos eventstore.Position
	err = p.QueryRowContext(ctx, s.tenant).Scan(&xid, &pos.GlobalPosition)
	if errors.Is(err, sql.ErrNoRows) {
		return eventstore.Start, nil
	}
	if err == nil {
		pos.TxID, err = strconv.ParseUint(xid, 10, 64)
	}
	if err != nil {
		return eventstore.Position{}, fmt.Errorf("pgstore: reading the feed's head: %w", err)
	}
	return pos, nil
}

// ListStreams pages through streams in id order.
func (s *Store) ListStreams(ctx context.Context, opts eventstore.ListStreamsOpts) ([]eventstore.StreamInfo, error) {
	limit := pageLimit(opts.Limit)
	name, args := stmtListStreams, []any{opts.After, limit, s.tenant}
	if opts.Category != "" {
		name, args = stmtListCategory, []any{opts.After, limit, opts.Category, s.tenant}
	}
	p, err := s.readStmt(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("pgstore: listing streams: %w", err)
	}
	rows, err := p.QueryContext(ctx, args...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: listing streams: %w", err)
	}
	defer rows.Close()
	var out []eventstore.StreamInfo
	for rows.Next() {
		var si eventstore.StreamInfo
		var v int64
		if err := rows.Scan(&si.StreamID, &si.Category, &v, &si.CreatedAt, &si.UpdatedAt); err != nil {
			return nil, fmt.Errorf("pgstore: listing streams: %w", err)
		}
		si.Version = eventstore.Version(v)
		out = append(out, si)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("pgstore: listing streams: %w", err)
	}
	return out, nil
}

// scanEvents reads rows of eventColumns and closes rows.
func scanEvents(rows *sql.Rows, sizeHint int) ([]eventstore.Event, error) {
	defer rows.Close()
	out := make([]eventstore.Event, 0, min(sizeHint, 1024))
	var xid string
	var meta []byte
	for rows.Next() {
		var e eventstore.Event
		var version int64
		if err := rows.Scan(&e.Position.GlobalPosition, &xid, &e.StreamID, &version, &e.ID, &e.Type,
			&e.ContentType, &e.Data, &meta, &e.RecordedAt); err != nil {
			return nil, err
		}
		e.Version = eventstore.Version(version)
		tx, err := strconv.ParseUint(xid, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("parsing transaction id %q: %w", xid, err)
		}
		e.Position.TxID = tx
		if len(meta) > 2 { // "{}" is the common case
			if e.Metadata, err = eventstore.DecodeMetadata(meta); err != nil {
				return nil, fmt.Errorf("decoding metadata of %s v%d: %w", e.StreamID, e.Version, err)
			}
		}
		out = append(out, e)
	}
	return out, rows.Err()
}
