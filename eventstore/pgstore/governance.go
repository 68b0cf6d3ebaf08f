package pgstore

// Data governance: retiring data on purpose (archive, retention, tombstone),
// each through Admin so it is audited, and a hash chain over history that
// Verify checks. The tables are made by migration 0007_governance; see
// docs/operations.md ("Retention, archival and tombstones", "Verifying
// history") for what each promises.
//
// Stream ids and category names are always bound as parameters; only the
// schema, checked by ValidateSchema, is ever written into SQL text.

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/stele-dev/stele/eventstore"
)

// Sentinels of the governance functions; match them with errors.Is.
var (
	// ErrStreamNotFound: the stream has never been written.
	ErrStreamNotFound = errors.New("pgstore: stream not found")
	// ErrStreamArchived: the stream is archived. An append to it fails with a
	// StreamRetiredError that matches this (see AsStreamRetired).
	ErrStreamArchived = errors.New("pgstore: stream is archived")
	// ErrStreamTombstoned: the stream was tombstoned; its id cannot be used again.
	ErrStreamTombstoned = errors.New("pgstore: stream is tombstoned")
	// ErrNothingArchived: RestoreArchivedStream found no archived events.
	ErrNothingArchived = errors.New("pgstore: the stream has no archived events")
	// ErrRetentionPolicy: a RetentionPolicy without a category or a limit.
	ErrRetentionPolicy = errors.New("pgstore: invalid retention policy")
	// ErrConcurrentChange: the stream or category changed while an admin
	// action was planned, more often than the action retries. Run it again.
	ErrConcurrentChange = errors.New("pgstore: changed concurrently; run the action again")
)

// SQLSTATEs raised by the streams trigger of migration 0007.
const (
	sqlStateArchived   = "SE701"
	sqlStateTombstoned = "SE702"
)

// StreamState says whether a stream is in use.
type StreamState string

const (
	StreamAbsent     StreamState = "absent"     // never written
	StreamLive       StreamState = "live"       // readable (some old events may be archived by retention)
	StreamArchived   StreamState = "archived"   // ArchiveStream: hidden, restorable
	StreamTombstoned StreamState = "tombstoned" // TombstoneStream: deleted for good, id kept
)

// StreamRetiredError is what an append to an archived or tombstoned stream
// fails with (through Append and AppendTx alike). The store's append path
// returns the driver's error wrapped; get this form with AsStreamRetired.
// errors.Is(e, ErrStreamArchived) or errors.Is(e, ErrStreamTombstoned) holds.
type StreamRetiredError struct {
	StreamID string
	State    StreamState // StreamArchived or StreamTombstoned
	Err      error       // the driver's error
}

func (e *StreamRetiredError) Error() string {
	if e.State == StreamTombstoned {
		return fmt.Sprintf("pgstore: stream %q is tombstoned; its id cannot be used again", e.StreamID)
	}
	return fmt.Sprintf("pgstore: stream %q is archived; restore it before appending", e.StreamID)
}

// Is matches ErrStreamArchived or ErrStreamTombstoned, by State.
func (e *StreamRetiredError) Is(target error) bool {
	return target == ErrStreamArchived && e.State == StreamArchived ||
		target == ErrStreamTombstoned && e.State == StreamTombstoned
}

func (e *StreamRetiredError) Unwrap() error { return e.Err }

// AsStreamRetired reports whether err (from Append or AppendTx) refused an
// append because the stream is archived or tombstoned, and says which.
//
//	if re, ok := pgstore.AsStreamRetired(err); ok && re.State == pgstore.StreamArchived { ... }
func AsStreamRetired(err error) (*StreamRetiredError, bool) {
	var re *StreamRetiredError
	if errors.As(err, &re) {
		return re, true
	}
	var st sqlState
	if !errors.As(err, &st) {
		return nil, false
	}
	out := &StreamRetiredError{Err: err}
	switch st.SQLState() {
	case sqlStateArchived:
		out.State = StreamArchived
	case sqlStateTombstoned:
		out.State = StreamTombstoned
	default:
		return nil, false
	}
	var pqErr *pq.Error
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pqErr):
		out.StreamID = pqErr.Detail
	case errors.As(err, &pgErr):
		out.StreamID = pgErr.Detail
	}
	return out, true
}

// StreamStatus describes one stream as governance sees it.
type StreamStatus struct {
	StreamID string
	Category string
	State    StreamState
	// Version is the stream's version: the current one when live, the one it
	// had when it was archived or tombstoned (reads show 0 then).
	Version eventstore.Version
	// Events are the stream's events in the log (readable); ArchivedEvents
	// those moved out by ArchiveStream or ApplyRetention.
	Events, ArchivedEvents int64
	RetiredAt              time.Time // zero when live
}

// LookupStream says whether a stream is live, archived, tombstoned or was
// never written. Store reads cannot tell: they show an archived or
// tombstoned stream as empty at version 0.
func LookupStream(ctx context.Context, db sqlx.QueryerContext, schema, streamID string) (StreamStatus, error) {
	if err := ValidateSchema(schema); err != nil {
		return StreamStatus{}, err
	}
	if err := eventstore.ValidateStreamID(streamID); err != nil {
		return StreamStatus{}, err
	}
	q := quoteIdent(schema)
	st := StreamStatus{StreamID: streamID, Category: eventstore.Category(streamID), State: StreamAbsent}
	var version, retiredVersion sql.NullInt64
	var state sql.NullString
	var retiredAt sql.NullTime
	err := db.QueryRowxContext(ctx, `SELECT s.version, r.state, r.version, r.retired_at,
			(SELECT count(*) FROM `+q+`.events e WHERE e.tenant_id = `+q+`.current_tenant() AND e.stream_id = s.stream_id),
			(SELECT count(*) FROM `+q+`.archived_events a WHERE a.tenant_id = s.tenant_id AND a.stream_id = s.stream_id)
		FROM `+q+`.streams s LEFT JOIN `+q+`.retired_streams r ON r.tenant_id = s.tenant_id AND r.stream_id = s.stream_id
		WHERE s.tenant_id = `+q+`.current_tenant() AND s.stream_id = $1`, streamID).Scan(&version, &state, &retiredVersion, &retiredAt, &st.Events, &st.ArchivedEvents)
	if errors.Is(err, sql.ErrNoRows) {
		return st, nil
	}
	if err != nil {
		return StreamStatus{}, fmt.Errorf("pgstore: looking up stream %q: %w", streamID, err)
	}
	st.State, st.Version = StreamLive, eventstore.Version(version.Int64)
	if state.Valid {
		st.State, st.Version, st.RetiredAt = StreamState(state.String), eventstore.Version(retiredVersion.Int64), retiredAt.Time
	}
	return st, nil
}

// ListRetired lists, in id order, the streams that are archived or
// tombstoned or have events archived by retention, at most limit (0: 1000),
// only those of category when it is not empty.
func ListRetired(ctx context.Context, db sqlx.QueryerContext, schema, category string, limit int) ([]StreamStatus, error) {
	if err := ValidateSchema(schema); err != nil {
		return nil, err
	}
	if limit <= 0 {
		limit = 1000
	}
	q := quoteIdent(schema)
	rows, err := db.QueryContext(ctx, `
		SELECT x.stream_id, coalesce(r.state, 'live'), coalesce(r.version, s.version, 0), r.retired_at,
		       (SELECT count(*) FROM `+q+`.events e WHERE e.tenant_id = `+q+`.current_tenant() AND e.stream_id = x.stream_id),
		       (SELECT count(*) FROM `+q+`.archived_events a WHERE a.tenant_id = `+q+`.current_tenant() AND a.stream_id = x.stream_id)
		FROM (SELECT stream_id FROM `+q+`.retired_streams WHERE tenant_id = `+q+`.current_tenant()
		      UNION SELECT DISTINCT stream_id FROM `+q+`.archived_events WHERE tenant_id = `+q+`.current_tenant()) x
		LEFT JOIN `+q+`.retired_streams r ON r.tenant_id = `+q+`.current_tenant() AND r.stream_id = x.stream_id
		LEFT JOIN `+q+`.streams s ON s.tenant_id = `+q+`.current_tenant() AND s.stream_id = x.stream_id
		WHERE $1 = '' OR split_part(x.stream_id, '-', 1) = $1
		ORDER BY x.stream_id LIMIT $2`, category, limit)
	if err != nil {
		return nil, fmt.Errorf("pgstore: listing retired streams: %w", err)
	}
	defer rows.Close()
	var out []StreamStatus
	for rows.Next() {
		var st StreamStatus
		var version int64
		var at sql.NullTime
		if err := rows.Scan(&st.StreamID, &st.State, &version, &at, &st.Events, &st.ArchivedEvents); err != nil {
			return nil, fmt.Errorf("pgstore: listing retired streams: %w", err)
		}
		st.Category, st.Version, st.RetiredAt = eventstore.Category(st.StreamID), eventstore.Version(version), at.Time
		out = append(out, st)
	}
	return out, rows.Err()
}

// errChanged is internal: what was planned no longer holds; plan again.
var errChanged = errors.New("changed while the action was planned")

// retryChanged runs an admin action up to three times while it meets
// errChanged.
func retryChanged[T any](f func() (T, error)) (T, error) {
	for attempt := 1; ; attempt++ {
		res, err := f()
		if errors.Is(err, errChanged) {
			if attempt < 3 {
				continue
			}
			return res, fmt.Errorf("%w: %w", ErrConcurrentChange, err)
		}
		return res, err
	}
}

// stateError turns a retired state into its sentinel.
func stateError(st StreamStatus) error {
	switch st.State {
	case StreamAbsent:
		return fmt.Errorf("%w: %q", ErrStreamNotFound, st.StreamID)
	case StreamArchived:
		return fmt.Errorf("%w: %q", ErrStreamArchived, st.StreamID)
	case StreamTombstoned:
		return fmt.Errorf("%w: %q", ErrStreamTombstoned, st.StreamID)
	}
	return nil
}

// eventCols are the events table's columns, in the order archived_events
// repeats them.
const eventCols = `global_position, transaction_id, stream_id, version, category, event_id, event_type, content_type, data, metadata, recorded_at`

// auditIDSQL is the admin_audit row of the Admin transaction running.
const auditIDSQL = `current_setting('stele.admin_action')::bigint`

// lockStream locks a stream's row for an admin action and checks it is as
// planned.
func lockStream(ctx context.Context, tx *sqlx.Tx, q string, st StreamStatus) (version int64, created time.Time, err error) {
	err = tx.QueryRowContext(ctx, `SELECT version, created_at FROM `+q+`.streams WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1 FOR UPDATE`, st.StreamID).Scan(&version, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, time.Time{}, fmt.Errorf("stream %q: %w", st.StreamID, errChanged)
	}
	if err != nil {
		return 0, time.Time{}, err
	}
	live := st.State == StreamLive
	if live && version != int64(st.Version) || !live && version != 0 {
		return 0, time.Time{}, fmt.Errorf("stream %q moved to version %d: %w", st.StreamID, version, errChanged)
	}
	return version, created, nil
}

// ArchiveResult says what ArchiveStream did.
type ArchiveResult struct {
	StreamID string
	Version  eventstore.Version // the stream's version, kept
	Events   int64              // events moved to the archive now
	AuditID  int64              // its row in the audit trail
}

// ArchiveStream moves a stream's events out of the log into the
// archived_events table, through Admin (action "archive"), so that reads no
// longer see it: ReadStream and LoadStream find no events, StreamVersion says
// 0, ListStreams and the feed (ReadAll, subscriptions, projection rebuilds)
// skip it. Every other stream and every event's position stay as they were;
// a consumer whose checkpoint is past the archived events notices nothing.
// Its snapshots (a cache) are deleted.
//
// The stream keeps its id and version: an append to it fails with a
// StreamRetiredError (AsStreamRetired) until RestoreArchivedStream brings it
// back, so it cannot be re-created with versions that collide with the
// archived ones. (An append whose expected version is neither Any, NoStream
// nor 0 fails first with the usual concurrency conflict, as against an empty
// stream.)
func ArchiveStream(ctx context.Context, db *sqlx.DB, schema, actor, streamID string) (ArchiveResult, error) {
	return retryChanged(func() (ArchiveResult, error) {
		st, err := LookupStream(ctx, db, schema, streamID)
		if err != nil {
			return ArchiveResult{}, err
		}
		if st.State != StreamLive {
			return ArchiveResult{}, stateError(st)
		}
		res := ArchiveResult{StreamID: streamID, Version: st.Version, Events: st.Events}
		q := quoteIdent(schema)
		detail := map[string]any{"version": st.Version, "events": st.Events}
		if st.ArchivedEvents > 0 {
			detail["archived_before"] = st.ArchivedEvents
		}
		res.AuditID, err = Admin(ctx, db, schema, AdminAction{Actor: actor, Action: "archive", Target: streamID, Detail: detail},
			func(tx *sqlx.Tx) error {
				version, created, err := lockStream(ctx, tx, q, st)
				if err != nil {
					return err
				}
				moved, err := execCount(ctx, tx, `WITH moved AS (
					DELETE FROM `+q+`.events WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1 RETURNING `+eventCols+`)
					INSERT INTO `+q+`.archived_events (`+eventCols+`, archived_by)
					SELECT `+eventCols+`, `+auditIDSQL+` FROM moved`, streamID)
				if err != nil {
					return err
				}
				if moved != st.Events {
					return fmt.Errorf("stream %q: %d events to archive, %d planned: %w", streamID, moved, st.Events, errChanged)
				}
				return retire(ctx, tx, q, streamID, StreamArchived, version, created)
			})
		return res, err
	})
}

// retire records a stream as archived or tombstoned and sets its row to
// version 0, where reads show it empty and the trigger refuses appends.
func retire(ctx context.Context, tx *sqlx.Tx, q, streamID string, state StreamState, version int64, created time.Time) error {
	if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.retired_streams (stream_id, category, state, version, created_at, retired_by)
		VALUES ($1, split_part($1, '-', 1), $2, $3, $4, `+auditIDSQL+`)
		ON CONFLICT (tenant_id, stream_id) DO UPDATE SET state = EXCLUDED.state, retired_at = now(), retired_by = EXCLUDED.retired_by`,
		streamID, string(state), version, created); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE `+q+`.streams SET version = 0, updated_at = now() WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1`, streamID); err != nil {
		return err
	}
	// Snapshots are a cache of the stream's state: they go with its events.
	_, err := tx.ExecContext(ctx, `DELETE FROM `+q+`.snapshots WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1`, streamID)
	return err
}

func execCount(ctx context.Context, tx *sqlx.Tx, query string, args ...any) (int64, error) {
	r, err := tx.ExecContext(ctx, query, args...)
	if err != nil {
		return 0, err
	}
	return r.RowsAffected()
}

// RestoreResult says what RestoreArchivedStream did.
type RestoreResult struct {
	StreamID string
	Version  eventstore.Version // the stream's version again
	Events   int64              // events moved back into the log
	AuditID  int64
}

// RestoreArchivedStream moves a stream's archived events back into the log,
// through Admin (action "unarchive"): an archived stream becomes live again
// at its old version, and a live stream gets back the events that retention
// archived. The events return at their original feed positions, byte for
// byte: readers of the stream and projection rebuilds see them again, but a
// subscriber whose checkpoint is already past them does not (they are
// behind it), and neither does the outbox relay, so nothing is published
// twice. Restoring a tombstoned stream fails with ErrStreamTombstoned.
func RestoreArchivedStream(ctx context.Context, db *sqlx.DB, schema, actor, streamID string) (RestoreResult, error) {
	return retryChanged(func() (RestoreResult, error) {
		st, err := LookupStream(ctx, db, schema, streamID)
		if err != nil {
			return RestoreResult{}, err
		}
		switch {
		case st.State == StreamAbsent || st.State == StreamTombstoned:
			return RestoreResult{}, stateError(st)
		case st.ArchivedEvents == 0 && st.State == StreamLive:
			return RestoreResult{}, fmt.Errorf("%w: %q", ErrNothingArchived, streamID)
		}
		res := RestoreResult{StreamID: streamID, Version: st.Version, Events: st.ArchivedEvents}
		q := quoteIdent(schema)
		res.AuditID, err = Admin(ctx, db, schema, AdminAction{Actor: actor, Action: "unarchive", Target: streamID,
			Detail: map[string]any{"version": st.Version, "events": st.ArchivedEvents, "was": st.State}},
			func(tx *sqlx.Tx) error {
				if _, _, err := lockStream(ctx, tx, q, st); err != nil {
					return err
				}
				moved, err := execCount(ctx, tx, `WITH moved AS (
					DELETE FROM `+q+`.archived_events WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1 RETURNING `+eventCols+`)
					INSERT INTO `+q+`.events (`+eventCols+`) OVERRIDING SYSTEM VALUE
					SELECT `+eventCols+` FROM moved`, streamID)
				if err != nil {
					return err
				}
				if moved != st.ArchivedEvents {
					return fmt.Errorf("stream %q: %d events to restore, %d planned: %w", streamID, moved, st.ArchivedEvents, errChanged)
				}
				if st.State != StreamArchived {
					return nil
				}
				if _, err := tx.ExecContext(ctx, `DELETE FROM `+q+`.retired_streams WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1`, streamID); err != nil {
					return err
				}
				_, err = tx.ExecContext(ctx, `UPDATE `+q+`.streams SET version = $2, updated_at = now() WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1`, streamID, int64(st.Version))
				return err
			})
		return res, err
	})
}

// TombstoneResult says what TombstoneStream did.
type TombstoneResult struct {
	StreamID       string
	Version        eventstore.Version // the version it had
	Events         int64              // events deleted from the log
	ArchivedEvents int64              // events deleted from the archive
	AuditID        int64
}

// TombstoneStream deletes a stream's events for good, from the log and from
// the archive, and its snapshots, through Admin (action "tombstone"). A
// marker stays in retired_streams (the id, its category and last version,
// when and by which audited action), so the id cannot be used again: an
// append fails with a StreamRetiredError (ErrStreamTombstoned). Reads show
// the stream as empty at version 0, as if it had never been written;
// LookupStream tells the two apart. Tombstoning an archived stream is
// allowed; restoring a tombstoned one is not.
//
// If history has been sealed (Seal), the stream's chain is completed first,
// and its hashes stay after its events are gone, so Verify still holds and
// can tell that the events existed (not what they held).
func TombstoneStream(ctx context.Context, db *sqlx.DB, schema, actor, streamID string) (TombstoneResult, error) {
	return retryChanged(func() (TombstoneResult, error) {
		st, err := LookupStream(ctx, db, schema, streamID)
		if err != nil {
			return TombstoneResult{}, err
		}
		if st.State == StreamAbsent || st.State == StreamTombstoned {
			return TombstoneResult{}, stateError(st)
		}
		res := TombstoneResult{StreamID: streamID, Version: st.Version, Events: st.Events, ArchivedEvents: st.ArchivedEvents}
		q := quoteIdent(schema)
		res.AuditID, err = Admin(ctx, db, schema, AdminAction{Actor: actor, Action: "tombstone", Target: streamID,
			Detail: map[string]any{"version": st.Version, "events": st.Events, "archived_events": st.ArchivedEvents, "was": st.State}},
			func(tx *sqlx.Tx) error {
				// The seal lock first: Seal takes it before the streams it seals.
				if err := lockSeal(ctx, tx, schema); err != nil {
					return err
				}
				_, created, err := lockStream(ctx, tx, q, st)
				if err != nil {
					return err
				}
				// The stream of the transaction's tenant.
				var sealed bool
				var tenant string
				if err := tx.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM `+q+`.chain_seals), `+q+`.current_tenant()`).Scan(&sealed, &tenant); err != nil {
					return err
				}
				if sealed {
					b, err := sealBatch(ctx, tx, q, streamKey{}, &streamKey{tenant, streamID})
					if err != nil {
						return err
					}
					if len(b.skipped) > 0 {
						return fmt.Errorf("its hash chain cannot be completed (%s); run stele verify", b.skipped[0].Detail)
					}
				}
				n, err := execCount(ctx, tx, `DELETE FROM `+q+`.events WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1`, streamID)
				if err != nil {
					return err
				}
				a, err := execCount(ctx, tx, `DELETE FROM `+q+`.archived_events WHERE tenant_id = `+q+`.current_tenant() AND stream_id = $1`, streamID)
				if err != nil {
					return err
				}
				if n != st.Events || a != st.ArchivedEvents {
					return fmt.Errorf("stream %q: %d+%d events to delete, %d+%d planned: %w", streamID, n, a, st.Events, st.ArchivedEvents, errChanged)
				}
				return retire(ctx, tx, q, streamID, StreamTombstoned, int64(st.Version), created)
			})
		return res, err
	})
}

// RetentionPolicy retires the old events of one category's streams. It
// works like a sliding window on each stream (as EventStoreDB's $maxAge and
// $maxCount do): an event is beyond the policy when it is older than MaxAge
// or when its stream has more than MaxCount newer events; every event of the
// stream up to the last one beyond the policy is archived, so what stays
// readable is always the stream's newest events, contiguous. A stream keeps
// its id and version and takes appends as before; a stream whose every event
// is beyond the policy reads as empty at its version.
//
// Retention suits categories read as recent history (logs, telemetry,
// notifications). An aggregate whose state is folded from its whole stream
// loses that state unless it keeps a snapshot newer than the cut: archive
// such streams whole (ArchiveStream) when they are closed instead.
type RetentionPolicy struct {
	Category string        // required: the part of the stream id before its first '-'
	MaxAge   time.Duration // events recorded longer ago are beyond it; 0: no age limit
	MaxCount int64         // each stream keeps at most its newest MaxCount events; 0: no count limit
}

// RetentionCut is what retention takes from one stream.
type RetentionCut struct {
	StreamID string
	UpTo     eventstore.Version // versions 1..UpTo leave the log
	Events   int64              // how many of those were still in the log
}

// RetentionResult says what ApplyRetention did, or PlanRetention would do.
type RetentionResult struct {
	Policy    RetentionPolicy
	OlderThan time.Time // the age cut (database clock); zero without MaxAge
	Streams   int       // streams that lose events
	Events    int64     // events archived
	Cuts      []RetentionCut
	AuditID   int64 // 0 for a plan, or when nothing was beyond the policy
}

func (p RetentionPolicy) validate() error {
	if err := validateCategory(p.Category); err != nil {
		return err
	}
	switch {
	case p.MaxAge < 0 || p.MaxCount < 0:
		return fmt.Errorf("%w: negative max age or max count", ErrRetentionPolicy)
	case p.MaxAge == 0 && p.MaxCount == 0:
		return fmt.Errorf("%w: give a max age, a max count or both", ErrRetentionPolicy)
	case p.MaxAge > 0 && p.MaxAge < time.Microsecond:
		return fmt.Errorf("%w: max age %s is below the database's precision", ErrRetentionPolicy, p.MaxAge)
	}
	return nil
}

// validateCategory: a category is what eventstore.Category returns for some
// valid stream id: not empty, no '-', printable UTF-8, not starting with '$'.
func validateCategory(c string) error {
	if err := eventstore.ValidateStreamID(c); err != nil {
		return fmt.Errorf("%w: category: %w", ErrRetentionPolicy, err)
	}
	if strings.Contains(c, "-") {
		return fmt.Errorf("%w: category %q contains '-': a category is the part of a stream id before its first '-'", ErrRetentionPolicy, c)
	}
	return nil
}

// PlanRetention says what ApplyRetention would archive now, and changes
// nothing (`stele retention apply --dry-run`).
func PlanRetention(ctx context.Context, db sqlx.QueryerContext, schema string, p RetentionPolicy) (RetentionResult, error) {
	if err := ValidateSchema(schema); err != nil {
		return RetentionResult{}, err
	}
	if err := p.validate(); err != nil {
		return RetentionResult{}, err
	}
	q := quoteIdent(schema)
	res := RetentionResult{Policy: p}
	var olderThan any // NULL: no age limit
	if p.MaxAge > 0 {
		if err := db.QueryRowxContext(ctx, `SELECT now() - $1::bigint * interval '1 microsecond'`, p.MaxAge.Microseconds()).Scan(&res.OlderThan); err != nil {
			return RetentionResult{}, fmt.Errorf("pgstore: retention of %q: %w", p.Category, err)
		}
		olderThan = res.OlderThan
	}
	rows, err := db.QueryContext(ctx, `
		WITH cut AS (
		  SELECT e.stream_id, max(e.version) AS upto
		  FROM `+q+`.events e JOIN `+q+`.streams s ON s.tenant_id = `+q+`.current_tenant() AND s.stream_id = e.stream_id
		  WHERE e.tenant_id = `+q+`.current_tenant() AND e.category = $1
		    AND (($2::bigint > 0 AND e.version <= s.version - $2::bigint)
		         OR ($3::timestamptz IS NOT NULL AND e.recorded_at < $3::timestamptz))
		  GROUP BY e.stream_id)
		SELECT c.stream_id, c.upto,
		       (SELECT count(*) FROM `+q+`.events x WHERE x.tenant_id = `+q+`.current_tenant() AND x.stream_id = c.stream_id AND x.version <= c.upto)
		FROM cut c ORDER BY c.stream_id`, p.Category, p.MaxCount, olderThan)
	if err != nil {
		return RetentionResult{}, fmt.Errorf("pgstore: planning retention of %q: %w", p.Category, err)
	}
	defer rows.Close()
	for rows.Next() {
		var c RetentionCut
		var upTo int64
		if err := rows.Scan(&c.StreamID, &upTo, &c.Events); err != nil {
			return RetentionResult{}, fmt.Errorf("pgstore: planning retention of %q: %w", p.Category, err)
		}
		c.UpTo = eventstore.Version(upTo)
		res.Cuts = append(res.Cuts, c)
		res.Events += c.Events
	}
	if err := rows.Err(); err != nil {
		return RetentionResult{}, fmt.Errorf("pgstore: planning retention of %q: %w", p.Category, err)
	}
	res.Streams = len(res.Cuts)
	return res, nil
}

// ApplyRetention archives the events of p.Category beyond the policy (see
// RetentionPolicy) into archived_events, through Admin (action "retention",
// the target the category, the detail the policy and the counts), in one
// transaction. Events are archived, not deleted: RestoreArchivedStream
// brings a stream's back, TombstoneStream deletes them for good. When
// nothing is beyond the policy, nothing is done and nothing is recorded.
func ApplyRetention(ctx context.Context, db *sqlx.DB, schema, actor string, p RetentionPolicy) (RetentionResult, error) {
	if actor == "" {
		return RetentionResult{}, ErrAdminAction
	}
	return retryChanged(func() (RetentionResult, error) {
		res, err := PlanRetention(ctx, db, schema, p)
		if err != nil || res.Events == 0 {
			return res, err
		}
		q := quoteIdent(schema)
		ids := make([]string, len(res.Cuts))
		upTo := make([]int64, len(res.Cuts))
		for i, c := range res.Cuts {
			ids[i], upTo[i] = c.StreamID, int64(c.UpTo)
		}
		detail := map[string]any{"max_age": p.MaxAge.String(), "max_count": p.MaxCount, "streams": res.Streams, "events": res.Events}
		if p.MaxAge > 0 {
			detail["older_than"] = res.OlderThan
		}
		res.AuditID, err = Admin(ctx, db, schema, AdminAction{Actor: actor, Action: "retention", Target: p.Category, Detail: detail},
			func(tx *sqlx.Tx) error {
				moved, err := execCount(ctx, tx, `WITH moved AS (
					DELETE FROM `+q+`.events e USING unnest($1::text[], $2::bigint[]) AS c(sid, upto)
					WHERE e.tenant_id = `+q+`.current_tenant() AND e.stream_id = c.sid AND e.version <= c.upto
					RETURNING `+prefixed("e.", eventCols)+`)
					INSERT INTO `+q+`.archived_events (`+eventCols+`, archived_by)
					SELECT `+eventCols+`, `+auditIDSQL+` FROM moved`, pq.StringArray(ids), pq.Int64Array(upTo))
				if err != nil {
					return err
				}
				if moved != res.Events {
					return fmt.Errorf("category %q: %d events to archive, %d planned: %w", p.Category, moved, res.Events, errChanged)
				}
				return nil
			})
		if err != nil {
			res.AuditID = 0
		}
		return res, err
	})
}

func prefixed(prefix, cols string) string {
	parts := strings.Split(cols, ", ")
	for i, c := range parts {
		parts[i] = prefix + c
	}
	return strings.Join(parts, ", ")
}

// RecordMigration records in the audit trail (action "migrate", the target
// the schema) that res applied migrations; it does nothing when res applied
// none. `stele migrate` calls it after Migrate; an application that migrates
// at start-up can too.
func RecordMigration(ctx context.Context, db *sqlx.DB, schema, actor string, res MigrateResult) (int64, error) {
	if len(res.Applied) == 0 {
		return 0, nil
	}
	names := make([]string, len(res.Applied))
	for i, m := range res.Applied {
		names[i] = m.String()
	}
	return Admin(ctx, db, schema, AdminAction{Actor: actor, Action: "migrate", Target: schema,
		Detail: map[string]any{"applied": names, "version": res.Version}}, nil)
}

// --- The hash chain ---------------------------------------------------------

// The hash of event v of a stream is SHA-256 over a domain tag, the hash of
// event v-1 (32 zero bytes for v = 1), and the event's stored fields, each
// length-prefixed: the tenant (only for a tenant other than ”, whose events
// hash under eventTenantHashTag), stream id, category, version, event id,
// type, content type, data, metadata (as jsonb's canonical text) and
// recorded_at (Unix microseconds). The feed position and transaction id are left out: a
// restore repair may legitimately renumber them.
const (
	eventHashTag = "stele.event.v1"
	auditHashTag = "stele.audit.v1"
	sealHashTag  = "stele.seal.v1"
	// A tenant's events, and seals that cover any, are hashed under their
	// own tags with the tenant included; tenant ''s keep the forms above,
	// so chains sealed before tenants existed verify unchanged.
	eventTenantHashTag = "stele.event.tenant.v1"
	sealTenantHashTag  = "stele.seal.tenant.v1"
)

var zeroHash = make([]byte, sha256.Size)

type hasher struct {
	h   hash.Hash
	buf [8]byte
}

func newHasher(tag string, prev []byte) *hasher {
	w := &hasher{h: sha256.New()}
	w.str(tag)
	w.bytes(prev)
	return w
}

func (w *hasher) int(v int64) {
	binary.BigEndian.PutUint64(w.buf[:], uint64(v))
	w.h.Write(w.buf[:])
}

func (w *hasher) bytes(b []byte) {
	w.int(int64(len(b)))
	w.h.Write(b)
}

func (w *hasher) str(s string) {
	w.int(int64(len(s)))
	_, _ = io.WriteString(w.h, s)
}

func (w *hasher) sum() []byte { return w.h.Sum(nil) }

// chainEvent is an event's hashed fields as read for the chain.
type chainEvent struct {
	tenant, streamID, category, eventID, typ, contentType, meta string
	version, micros                                             int64
	data                                                        []byte
}

// chainEventCols reads chainEvent from events or archived_events.
const chainEventCols = `tenant_id, stream_id, version, category, event_id::text, event_type, content_type, data, metadata::text,
	(extract(epoch FROM recorded_at) * 1000000)::bigint`

func (e *chainEvent) hash(prev []byte) []byte {
	var w *hasher
	if e.tenant == "" {
		w = newHasher(eventHashTag, prev)
	} else {
		w = newHasher(eventTenantHashTag, prev)
		w.str(e.tenant)
	}
	w.str(e.streamID)
	w.str(e.category)
	w.int(e.version)
	w.str(e.eventID)
	w.str(e.typ)
	w.str(e.contentType)
	w.bytes(e.data)
	w.str(e.meta)
	w.int(e.micros)
	return w.sum()
}

type chainAudit struct {
	id, micros                                int64
	actor, role, action, target, detailString string
}

const chainAuditCols = `a.id, (extract(epoch FROM a.at) * 1000000)::bigint, a.actor, a.role, a.action, a.target, a.detail::text`

func (a *chainAudit) hash(prev []byte) []byte {
	w := newHasher(auditHashTag, prev)
	w.int(a.id)
	w.int(a.micros)
	w.str(a.actor)
	w.str(a.role)
	w.str(a.action)
	w.str(a.target)
	w.str(a.detailString)
	return w.sum()
}

// streamKey names a stream: its tenant and id.
type streamKey struct{ tenant, id string }

func (k streamKey) compare(o streamKey) int {
	if c := strings.Compare(k.tenant, o.tenant); c != 0 {
		return c
	}
	return strings.Compare(k.id, o.id)
}

// sealSpan is what one seal covers of one stream's chain.
type sealSpan struct {
	tenant, streamID string
	first, last      int64
	head             []byte // the hash of last
}

// sealDigest commits to a seal: its id, the previous seal's digest, the span
// and head of each stream it sealed (in byte order of tenant, then stream
// id) and the span and head of the audit rows it sealed. A seal that covers
// any tenant's stream names every span's tenant.
func sealDigest(id int64, prev []byte, spans []sealSpan, audit sealSpan) []byte {
	tenants := slices.ContainsFunc(spans, func(s sealSpan) bool { return s.tenant != "" })
	tag := sealHashTag
	if tenants {
		tag = sealTenantHashTag
	}
	w := newHasher(tag, prev)
	w.int(id)
	w.int(int64(len(spans)))
	for _, s := range spans {
		if tenants {
			w.str(s.tenant)
		}
		w.str(s.streamID)
		w.int(s.first)
		w.int(s.last)
		w.bytes(s.head)
	}
	w.int(audit.first)
	w.int(audit.last)
	w.bytes(audit.head)
	return w.sum()
}

// SealResult says what Seal did.
type SealResult struct {
	Seals     int   // seals made now (one per batch of streams)
	Events    int64 // events chained now
	AuditRows int64 // audit rows chained now
	SealID    int64 // the latest seal, made now or before; 0: never sealed
	// Digest is the latest seal's digest in hex: it commits to everything
	// sealed so far. Keep it outside the database (a ticket, a log, a
	// signed message): `stele verify --digest` then shows the chain was not
	// rewritten since.
	Digest string
	// Skipped are streams whose chain could not be extended, with why: a
	// version missing from both the log and the archive. Verify reports
	// them too.
	Skipped []VerifyProblem
}

// sealBatchStreams bounds the streams one seal transaction covers.
const sealBatchStreams = 500

// lockSeal serialises seals (and tombstones, which seal) of one schema.
func lockSeal(ctx context.Context, tx *sqlx.Tx, schema string) error {
	_, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, "stele.seal:"+schema)
	return err
}

// Seal extends the hash chain over every event not yet chained (in the log
// or the archive) and every audit row not yet chained, in transactions of up
// to 500 streams, each recorded as a seal whose digest also commits to the
// previous seal's. It never slows appends: run it from cron or after a
// batch (`stele seal`). Appends made meanwhile are sealed next time.
func Seal(ctx context.Context, db *sqlx.DB, schema string) (SealResult, error) {
	if err := ValidateSchema(schema); err != nil {
		return SealResult{}, err
	}
	q := quoteIdent(schema)
	var res SealResult
	var after streamKey
	for {
		tx, err := db.BeginTxx(ctx, nil)
		if err != nil {
			return res, fmt.Errorf("pgstore: sealing: %w", err)
		}
		var b batchResult
		// Checked in the transaction that reads the rows: a pool's
		// sessions need not all be the same role.
		err = requireEveryTenant(ctx, tx, schema)
		if err == nil {
			err = lockSeal(ctx, tx, schema)
		}
		if err == nil {
			b, err = sealBatch(ctx, tx, q, after, nil)
		}
		if err == nil {
			err = tx.Commit()
		}
		if err != nil {
			_ = tx.Rollback()
			if errors.Is(err, ErrNeedsEveryTenant) {
				return res, err
			}
			return res, fmt.Errorf("pgstore: sealing: %w", err)
		}
		res.Skipped = append(res.Skipped, b.skipped...)
		if b.sealID > 0 {
			res.Seals++
			res.Events += b.events
			res.AuditRows += b.auditRows
		}
		if !b.more {
			break
		}
		after = b.lastStream
	}
	var digest []byte
	err := db.QueryRowxContext(ctx, `SELECT id, digest FROM `+q+`.chain_seals ORDER BY id DESC LIMIT 1`).Scan(&res.SealID, &digest)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return res, fmt.Errorf("pgstore: sealing: %w", err)
	}
	res.Digest = hex.EncodeToString(digest)
	return res, nil
}

type batchResult struct {
	sealID            int64
	events, auditRows int64
	lastStream        streamKey
	more              bool
	skipped           []VerifyProblem
}

// sealBatch seals, in tx (which holds the seal lock), the next streams after
// `after` with events not yet chained, or only stream `only`, and the audit
// rows not yet chained, as one seal.
func sealBatch(ctx context.Context, tx *sqlx.Tx, q string, after streamKey, only *streamKey) (batchResult, error) {
	var b batchResult
	// The streams to extend: live ones whose version is past their chain's
	// head, and archived ones likewise (their version is kept aside).
	filter, args := `(s.tenant_id, s.stream_id) > ($1, $2)`, []any{after.tenant, after.id, sealBatchStreams}
	if only != nil {
		filter, args = `s.tenant_id = $1 AND s.stream_id = $2`, []any{only.tenant, only.id, 1}
	}
	rows, err := tx.QueryContext(ctx, `
		SELECT s.tenant_id, s.stream_id, coalesce(r.version, s.version), coalesce(h.version, 0), h.hash
		FROM `+q+`.streams s
		LEFT JOIN `+q+`.retired_streams r ON r.tenant_id = s.tenant_id AND r.stream_id = s.stream_id
		LEFT JOIN `+q+`.chain_heads h ON h.tenant_id = s.tenant_id AND h.stream_id = s.stream_id
		WHERE `+filter+` AND coalesce(r.version, s.version) > coalesce(h.version, 0)
		  AND r.state IS DISTINCT FROM 'tombstoned'
		ORDER BY s.tenant_id, s.stream_id LIMIT $3`, args...)
	if err != nil {
		return b, err
	}
	type work struct {
		head, top int64
		prev      []byte
	}
	todo := map[streamKey]*work{}
	var keys []streamKey
	var tids, sids []string
	var heads, tops []int64
	for rows.Next() {
		var k streamKey
		w := &work{}
		if err := rows.Scan(&k.tenant, &k.id, &w.top, &w.head, &w.prev); err != nil {
			rows.Close()
			return b, err
		}
		if w.prev == nil {
			w.prev = zeroHash
		}
		todo[k] = w
		keys = append(keys, k)
		tids, sids, heads, tops = append(tids, k.tenant), append(sids, k.id), append(heads, w.head), append(tops, w.top)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return b, err
	}
	if only == nil && len(keys) == sealBatchStreams {
		b.more, b.lastStream = true, keys[len(keys)-1]
	}

	// Their events past the head, from the log and the archive in one
	// statement, so that an archive moving them meanwhile is seen whole.
	var spans []sealSpan
	var hTenants, hStreams []string
	var hVersions []int64
	var hHashes [][]byte
	if len(keys) > 0 {
		rows, err = tx.QueryContext(ctx, `
			SELECT x.* FROM (
			  SELECT `+chainEventCols+` FROM `+q+`.events
			  UNION ALL
			  SELECT `+chainEventCols+` FROM `+q+`.archived_events) x
			JOIN unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS w(tid, sid, head, top)
			  ON x.tenant_id = w.tid AND x.stream_id = w.sid AND x.version > w.head AND x.version <= w.top
			ORDER BY x.tenant_id, x.stream_id, x.version`, pq.StringArray(tids), pq.StringArray(sids), pq.Int64Array(heads), pq.Int64Array(tops))
		if err != nil {
			return b, err
		}
		var cur *sealSpan
		stopped := map[streamKey]bool{} // streams whose chain stopped at a gap
		for rows.Next() {
			var e chainEvent
			if err := rows.Scan(&e.tenant, &e.streamID, &e.version, &e.category, &e.eventID, &e.typ, &e.contentType, &e.data, &e.meta, &e.micros); err != nil {
				rows.Close()
				return b, err
			}
			k := streamKey{e.tenant, e.streamID}
			if stopped[k] {
				continue
			}
			w := todo[k]
			if e.version != w.head+1 {
				stopped[k] = true
				detail := fmt.Sprintf("version %d is missing from the log and the archive", w.head+1)
				if e.version == w.head {
					detail = fmt.Sprintf("version %d is in both the log and the archive", e.version)
				}
				b.skipped = append(b.skipped, VerifyProblem{Kind: ProblemOutOfChain, Tenant: k.tenant, StreamID: k.id, Version: w.head + 1, Detail: detail})
				continue
			}
			w.prev = e.hash(w.prev)
			w.head = e.version
			if cur == nil || cur.tenant != k.tenant || cur.streamID != k.id {
				spans = append(spans, sealSpan{tenant: k.tenant, streamID: k.id, first: e.version})
				cur = &spans[len(spans)-1]
			}
			cur.last, cur.head = e.version, w.prev
			hTenants, hStreams = append(hTenants, k.tenant), append(hStreams, k.id)
			hVersions, hHashes = append(hVersions, e.version), append(hHashes, w.prev)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return b, err
		}
		for _, k := range keys {
			if w := todo[k]; !stopped[k] && w.head < w.top {
				b.skipped = append(b.skipped, VerifyProblem{Kind: ProblemDeleted, Tenant: k.tenant, StreamID: k.id, Version: w.head + 1,
					Detail: fmt.Sprintf("the stream is at version %d but versions %d..%d are missing from the log and the archive", w.top, w.head+1, w.top)})
			}
		}
	}

	// The audit rows not yet chained, in id order, after the last one that is.
	var auditSpan sealSpan
	var aIDs, aSeqs []int64
	var aHashes [][]byte
	var prevSeq int64
	prevAudit := zeroHash
	err = tx.QueryRowContext(ctx, `SELECT seq, hash FROM `+q+`.audit_hashes ORDER BY seq DESC LIMIT 1`).Scan(&prevSeq, &prevAudit)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return b, err
	}
	rows, err = tx.QueryContext(ctx, `SELECT `+chainAuditCols+` FROM `+q+`.admin_audit a
		WHERE NOT EXISTS (SELECT 1 FROM `+q+`.audit_hashes h WHERE h.audit_id = a.id) ORDER BY a.id`)
	if err != nil {
		return b, err
	}
	for rows.Next() {
		var a chainAudit
		if err := rows.Scan(&a.id, &a.micros, &a.actor, &a.role, &a.action, &a.target, &a.detailString); err != nil {
			rows.Close()
			return b, err
		}
		prevSeq++
		prevAudit = a.hash(prevAudit)
		if auditSpan.first == 0 {
			auditSpan.first = prevSeq
		}
		auditSpan.last, auditSpan.head = prevSeq, prevAudit
		aIDs, aSeqs, aHashes = append(aIDs, a.id), append(aSeqs, prevSeq), append(aHashes, prevAudit)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return b, err
	}
	if len(hStreams) == 0 && len(aIDs) == 0 {
		return b, nil
	}

	// The seal: numbered after the last one, its digest chained to it.
	var prevID int64
	prevDigest := zeroHash
	err = tx.QueryRowContext(ctx, `SELECT id, digest FROM `+q+`.chain_seals ORDER BY id DESC LIMIT 1`).Scan(&prevID, &prevDigest)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return b, err
	}
	b.sealID = prevID + 1
	slices.SortFunc(spans, func(x, y sealSpan) int {
		return streamKey{x.tenant, x.streamID}.compare(streamKey{y.tenant, y.streamID})
	})
	digest := sealDigest(b.sealID, prevDigest, spans, auditSpan)
	if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.chain_seals (id, events, audit_rows, prev_digest, digest) VALUES ($1, $2, $3, $4, $5)`,
		b.sealID, len(hStreams), len(aIDs), prevDigest, digest); err != nil {
		return b, err
	}
	const chunk = 5000
	for i := 0; i < len(hStreams); i += chunk {
		j := min(i+chunk, len(hStreams))
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.event_hashes (tenant_id, stream_id, version, hash, seal_id)
			SELECT tid, sid, v, h, $5 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[]) AS u(tid, sid, v, h)`,
			pq.StringArray(hTenants[i:j]), pq.StringArray(hStreams[i:j]), pq.Int64Array(hVersions[i:j]), pq.ByteaArray(hHashes[i:j]), b.sealID); err != nil {
			return b, err
		}
	}
	if len(spans) > 0 {
		tenants := make([]string, len(spans))
		ids := make([]string, len(spans))
		versions := make([]int64, len(spans))
		hashes := make([][]byte, len(spans))
		for i, s := range spans {
			tenants[i], ids[i], versions[i], hashes[i] = s.tenant, s.streamID, s.last, s.head
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.chain_heads (tenant_id, stream_id, version, hash)
			SELECT tid, sid, v, h FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[]) AS u(tid, sid, v, h)
			ON CONFLICT (tenant_id, stream_id) DO UPDATE SET version = EXCLUDED.version, hash = EXCLUDED.hash`,
			pq.StringArray(tenants), pq.StringArray(ids), pq.Int64Array(versions), pq.ByteaArray(hashes)); err != nil {
			return b, err
		}
	}
	if len(aIDs) > 0 {
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.audit_hashes (seq, audit_id, hash, seal_id)
			SELECT s, id, h, $4 FROM unnest($1::bigint[], $2::bigint[], $3::bytea[]) AS u(s, id, h)`,
			pq.Int64Array(aSeqs), pq.Int64Array(aIDs), pq.ByteaArray(aHashes), b.sealID); err != nil {
			return b, err
		}
	}
	b.events, b.auditRows = int64(len(hStreams)), int64(len(aIDs))
	return b, nil
}

// Kinds of VerifyProblem.
const (
	// ProblemChanged: a sealed event's row no longer hashes to its chain.
	ProblemChanged = "changed"
	// ProblemDeleted: a sealed event, or the tail of a stream, is gone, and
	// the stream was not tombstoned.
	ProblemDeleted = "deleted"
	// ProblemOutOfChain: an event that no append wrote where it is: past
	// its stream's version, after a gap, in a tombstoned stream, in both the
	// log and the archive, or without a stream.
	ProblemOutOfChain = "out-of-chain"
	// ProblemChainBroken: the chain itself was cut: hash rows missing, or
	// a stream's recorded head disagrees with them.
	ProblemChainBroken = "chain-broken"
	// ProblemSeal: a seal's digest does not match what it sealed, or seals
	// are missing or out of order.
	ProblemSeal = "seal"
	// ProblemAuditChanged and ProblemAuditDeleted: a sealed audit-trail row
	// was changed or deleted.
	ProblemAuditChanged = "audit-changed"
	ProblemAuditDeleted = "audit-deleted"
	// ProblemDigestUnknown: the digest given to VerifyHistory is not one of
	// this store's seals: the sealed history was rewritten since it was
	// taken (or it belongs to another store).
	ProblemDigestUnknown = "digest-unknown"
)

// VerifyProblem is one thing Verify found wrong.
type VerifyProblem struct {
	Kind     string `json:"kind"`
	Tenant   string `json:"tenant,omitempty"`
	StreamID string `json:"stream_id,omitempty"`
	Version  int64  `json:"version,omitempty"`
	AuditID  int64  `json:"audit_id,omitempty"`
	SealID   int64  `json:"seal_id,omitempty"`
	Detail   string `json:"detail"`
}

func (p VerifyProblem) String() string {
	var where string
	switch {
	case p.StreamID != "" && p.Tenant != "":
		where = fmt.Sprintf(" %q v%d of tenant %q", p.StreamID, p.Version, p.Tenant)
	case p.StreamID != "":
		where = fmt.Sprintf(" %q v%d", p.StreamID, p.Version)
	case p.AuditID != 0:
		where = fmt.Sprintf(" audit row %d", p.AuditID)
	case p.SealID != 0:
		where = fmt.Sprintf(" seal %d", p.SealID)
	}
	return p.Kind + where + ": " + p.Detail
}

// VerifyOpts tunes VerifyHistory.
type VerifyOpts struct {
	// Digest, when set, is a seal digest (hex) kept outside the database:
	// it must still be one of the store's seals.
	Digest string
}

// VerifyReport is what VerifyHistory found.
type VerifyReport struct {
	Problems          []VerifyProblem
	Truncated         bool  // more than maxProblems; the rest were not listed
	Seals             int64 // seals checked
	LatestDigest      string
	SealedEvents      int64 // events (and hashes of tombstoned ones) checked against the chain
	UnsealedEvents    int64 // events past their stream's chain: run Seal to cover them
	SealedAuditRows   int64
	UnsealedAuditRows int64
}

// maxProblems bounds a report: a wholesale change would list every event.
const maxProblems = 10000

func (r *VerifyReport) add(p VerifyProblem) {
	if len(r.Problems) >= maxProblems {
		r.Truncated = true
		return
	}
	r.Problems = append(r.Problems, p)
}

// Verify recomputes the hash chain and reports every event whose row
// changed, was deleted or was inserted out of chain since it was sealed, and
// every changed or deleted audit row. No problems and no error means history
// is as sealed. See VerifyHistory.
func Verify(ctx context.Context, db *sqlx.DB, schema string) ([]VerifyProblem, error) {
	r, err := VerifyHistory(ctx, db, schema, VerifyOpts{})
	return r.Problems, err
}

// VerifyHistory checks, in one consistent snapshot:
//
//   - every sealed event, in the log or the archive, against its hash, and
//     each hash against the one before it;
//   - that no event sits where no append could have put it (past its
//     stream's version, after a gap, in a tombstoned stream);
//   - that each stream still has events up to its version;
//   - every sealed audit row against its hash;
//   - every seal's digest against the hashes it sealed and the seal before;
//   - opts.Digest, if given, against the seals.
//
// Admin actions keep it consistent: archived events are checked in the
// archive, and a tombstoned stream's hashes stay without its events.
//
// What it cannot see: a change made before the event was sealed, and a
// rewrite of the whole chain by someone who can write every table (the
// schema owner, a superuser) unless a digest kept outside is given.
func VerifyHistory(ctx context.Context, db *sqlx.DB, schema string, opts VerifyOpts) (VerifyReport, error) {
	var r VerifyReport
	if err := ValidateSchema(schema); err != nil {
		return r, err
	}
	var want []byte
	if opts.Digest != "" {
		var err error
		if want, err = hex.DecodeString(strings.TrimSpace(opts.Digest)); err != nil || len(want) != sha256.Size {
			return r, fmt.Errorf("pgstore: verify: digest %q: want 64 hex digits", opts.Digest)
		}
	}
	tx, err := db.BeginTxx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
	if err != nil {
		return r, fmt.Errorf("pgstore: verify: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // read-only
	if err := requireEveryTenant(ctx, tx, schema); err != nil {
		return r, err
	}
	q := quoteIdent(schema)
	for _, step := range []func(context.Context, *sqlx.Tx, string, *VerifyReport) error{
		verifyEvents, verifyEmptyStreams, verifyHeads, verifyAudit, verifySeals,
	} {
		if err := step(ctx, tx, q, &r); err != nil {
			return r, fmt.Errorf("pgstore: verify: %w", err)
		}
	}
	if want != nil {
		var found bool
		if err := tx.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM `+q+`.chain_seals WHERE digest = $1)`, want).Scan(&found); err != nil {
			return r, fmt.Errorf("pgstore: verify: %w", err)
		}
		if !found {
			r.add(VerifyProblem{Kind: ProblemDigestUnknown, Detail: fmt.Sprintf("digest %s is not one of this store's seals: the sealed history was rewritten since it was taken, or it is another store's", hex.EncodeToString(want))})
		}
	}
	return r, nil
}

// verifyEvents walks every hash row and every event, log and archive, in
// (stream, version) order.
func verifyEvents(ctx context.Context, tx *sqlx.Tx, q string, r *VerifyReport) error {
	rows, err := tx.QueryContext(ctx, `
		SELECT coalesce(h.tenant_id, x.tenant_id) AS tid, coalesce(h.stream_id, x.stream_id) AS sid,
		       coalesce(h.version, x.version) AS ver, h.hash,
		       x.src, x.category, x.event_id, x.event_type, x.content_type, x.data, x.meta, x.micros,
		       s.version, r.state, r.version
		FROM `+q+`.event_hashes h
		FULL JOIN (
		  SELECT 0 AS src, `+chainEventCols+` FROM `+q+`.events
		  UNION ALL
		  SELECT 1, `+chainEventCols+` FROM `+q+`.archived_events
		) x (src, tenant_id, stream_id, version, category, event_id, event_type, content_type, data, meta, micros)
		  ON x.tenant_id = h.tenant_id AND x.stream_id = h.stream_id AND x.version = h.version
		LEFT JOIN `+q+`.streams s ON s.tenant_id = coalesce(h.tenant_id, x.tenant_id) AND s.stream_id = coalesce(h.stream_id, x.stream_id)
		LEFT JOIN `+q+`.retired_streams r ON r.tenant_id = coalesce(h.tenant_id, x.tenant_id) AND r.stream_id = coalesce(h.stream_id, x.stream_id)
		ORDER BY 1, 2, 3, x.src`)
	if err != nil {
		return err
	}
	defer rows.Close()
	var (
		tid, sid   string
		first      = true
		lastV      int64  // the last version seen of the stream
		lastHashed int64  // the last version with a hash row
		prev       []byte // the stored hash of lastHashed; nil after a break
		limit      int64  // the stream's version; -1 without a streams row
		tomb       bool
	)
	endStream := func() {
		if first || tomb || limit < 0 || lastV >= limit {
			return
		}
		r.add(VerifyProblem{Kind: ProblemDeleted, Tenant: tid, StreamID: sid, Version: lastV + 1,
			Detail: fmt.Sprintf("the stream is at version %d but versions %d..%d are in neither the log nor the archive", limit, lastV+1, limit)})
	}
	for rows.Next() {
		var (
			rowTID, rowSID      string
			ver                 int64
			stored              []byte
			src                 sql.NullInt64
			e                   chainEvent
			category, id, typ   sql.NullString
			ctype, meta         sql.NullString
			micros              sql.NullInt64
			sVersion, rVersion  sql.NullInt64
			rState              sql.NullString
			data                []byte
			hasEvent, hasHashed bool
		)
		if err := rows.Scan(&rowTID, &rowSID, &ver, &stored, &src, &category, &id, &typ, &ctype, &data, &meta, &micros,
			&sVersion, &rState, &rVersion); err != nil {
			return err
		}
		if first || rowTID != tid || rowSID != sid {
			endStream()
			tid, sid, first, lastV, lastHashed, prev = rowTID, rowSID, false, 0, 0, zeroHash
			limit = -1
			switch {
			case rVersion.Valid:
				limit = rVersion.Int64
			case sVersion.Valid:
				limit = sVersion.Int64
			}
			tomb = rState.String == string(StreamTombstoned)
		} else if ver == lastV {
			r.add(VerifyProblem{Kind: ProblemOutOfChain, Tenant: tid, StreamID: sid, Version: ver, Detail: "the event is in both the log and the archive"})
			continue
		}
		hasEvent, hasHashed = src.Valid, stored != nil
		misplaced := false // reported already as out of chain
		if hasEvent {
			e = chainEvent{tenant: rowTID, streamID: rowSID, version: ver, category: category.String, eventID: id.String, typ: typ.String,
				contentType: ctype.String, data: data, meta: meta.String, micros: micros.Int64}
			misplaced = true
			switch {
			case tomb:
				r.add(VerifyProblem{Kind: ProblemOutOfChain, Tenant: tid, StreamID: sid, Version: ver, Detail: "an event of a tombstoned stream"})
			case limit < 0:
				r.add(VerifyProblem{Kind: ProblemOutOfChain, Tenant: tid, StreamID: sid, Version: ver, Detail: "an event of a stream that has no streams row"})
			case ver > limit:
				r.add(VerifyProblem{Kind: ProblemOutOfChain, Tenant: tid, StreamID: sid, Version: ver,
					Detail: fmt.Sprintf("version %d is past the stream's version %d: no append wrote it", ver, limit)})
			default:
				misplaced = false
			}
		}
		if hasHashed {
			r.SealedEvents++
			if ver != lastHashed+1 {
				r.add(VerifyProblem{Kind: ProblemChainBroken, Tenant: tid, StreamID: sid, Version: lastHashed + 1,
					Detail: fmt.Sprintf("the hashes of versions %d..%d are missing", lastHashed+1, ver-1)})
				prev = nil
			}
			switch {
			case hasEvent && !misplaced && prev != nil && !bytesEqual(e.hash(prev), stored):
				r.add(VerifyProblem{Kind: ProblemChanged, Tenant: tid, StreamID: sid, Version: ver, Detail: "the event differs from what was sealed"})
			case !hasEvent && !tomb:
				r.add(VerifyProblem{Kind: ProblemDeleted, Tenant: tid, StreamID: sid, Version: ver, Detail: "a sealed event is in neither the log nor the archive"})
			}
			prev, lastHashed = stored, ver
		} else if hasEvent {
			r.UnsealedEvents++
			if ver != lastV+1 && !misplaced {
				r.add(VerifyProblem{Kind: ProblemOutOfChain, Tenant: tid, StreamID: sid, Version: ver,
					Detail: fmt.Sprintf("versions %d..%d before it are in neither the log nor the archive", lastV+1, ver-1)})
			}
		}
		lastV = ver
	}
	if err := rows.Err(); err != nil {
		return err
	}
	endStream()
	return nil
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// verifyEmptyStreams finds streams with a version but nothing at all left
// of them (no events, archived or not, no hashes), which verifyEvents never
// meets.
func verifyEmptyStreams(ctx context.Context, tx *sqlx.Tx, q string, r *VerifyReport) error {
	rows, err := tx.QueryContext(ctx, `
		SELECT s.tenant_id, s.stream_id, coalesce(r.version, s.version)
		FROM `+q+`.streams s LEFT JOIN `+q+`.retired_streams r ON r.tenant_id = s.tenant_id AND r.stream_id = s.stream_id
		WHERE coalesce(r.version, s.version) > 0 AND r.state IS DISTINCT FROM 'tombstoned'
		  AND NOT EXISTS (SELECT 1 FROM `+q+`.events e WHERE e.tenant_id = s.tenant_id AND e.stream_id = s.stream_id)
		  AND NOT EXISTS (SELECT 1 FROM `+q+`.archived_events a WHERE a.tenant_id = s.tenant_id AND a.stream_id = s.stream_id)
		  AND NOT EXISTS (SELECT 1 FROM `+q+`.event_hashes h WHERE h.tenant_id = s.tenant_id AND h.stream_id = s.stream_id)
		ORDER BY 1, 2`)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var tid, sid string
		var v int64
		if err := rows.Scan(&tid, &sid, &v); err != nil {
			return err
		}
		r.add(VerifyProblem{Kind: ProblemDeleted, Tenant: tid, StreamID: sid, Version: 1,
			Detail: fmt.Sprintf("the stream is at version %d but none of its events is in the log or the archive", v)})
	}
	return rows.Err()
}

// verifyHeads checks chain_heads, where Seal continues from, against the
// hash rows.
func verifyHeads(ctx context.Context, tx *sqlx.Tx, q string, r *VerifyReport) error {
	rows, err := tx.QueryContext(ctx, `
		SELECT coalesce(c.tenant_id, m.tenant_id), coalesce(c.stream_id, m.stream_id), coalesce(c.version, 0), coalesce(m.v, 0)
		FROM `+q+`.chain_heads c
		FULL JOIN (SELECT tenant_id, stream_id, max(version) AS v FROM `+q+`.event_hashes GROUP BY tenant_id, stream_id) m
		  ON m.tenant_id = c.tenant_id AND m.stream_id = c.stream_id
		LEFT JOIN `+q+`.event_hashes h ON h.tenant_id = c.tenant_id AND h.stream_id = c.stream_id AND h.version = c.version
		WHERE m.v IS DISTINCT FROM c.version OR h.hash IS DISTINCT FROM c.hash
		ORDER BY 1, 2`)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var tid, sid string
		var head, last int64
		if err := rows.Scan(&tid, &sid, &head, &last); err != nil {
			return err
		}
		r.add(VerifyProblem{Kind: ProblemChainBroken, Tenant: tid, StreamID: sid, Version: head,
			Detail: fmt.Sprintf("the recorded head of the chain (version %d) does not match its last hash (version %d)", head, last)})
	}
	return rows.Err()
}

// verifyAudit walks the sealed audit rows in the order they were chained.
func verifyAudit(ctx context.Context, tx *sqlx.Tx, q string, r *VerifyReport) error {
	rows, err := tx.QueryContext(ctx, `
		SELECT h.seq, h.audit_id, h.hash, a.id IS NOT NULL, `+chainAuditCols+`
		FROM `+q+`.audit_hashes h LEFT JOIN `+q+`.admin_audit a ON a.id = h.audit_id
		ORDER BY h.seq`)
	if err != nil {
		return err
	}
	defer rows.Close()
	var lastSeq int64
	prev := zeroHash
	for rows.Next() {
		var seq, auditID int64
		var stored []byte
		var present bool
		var id, micros sql.NullInt64
		var actor, role, action, target, detail sql.NullString
		if err := rows.Scan(&seq, &auditID, &stored, &present, &id, &micros, &actor, &role, &action, &target, &detail); err != nil {
			return err
		}
		r.SealedAuditRows++
		if seq != lastSeq+1 {
			r.add(VerifyProblem{Kind: ProblemChainBroken, AuditID: auditID, Detail: fmt.Sprintf("the audit chain's entries %d..%d are missing", lastSeq+1, seq-1)})
			prev = nil
		}
		switch {
		case !present:
			r.add(VerifyProblem{Kind: ProblemAuditDeleted, AuditID: auditID, Detail: "a sealed audit row is gone"})
		case prev != nil:
			a := chainAudit{id: id.Int64, micros: micros.Int64, actor: actor.String, role: role.String, action: action.String,
				target: target.String, detailString: detail.String}
			if !bytesEqual(a.hash(prev), stored) {
				r.add(VerifyProblem{Kind: ProblemAuditChanged, AuditID: auditID, Detail: "the audit row differs from what was sealed"})
			}
		}
		prev, lastSeq = stored, seq
	}
	if err := rows.Err(); err != nil {
		return err
	}
	return tx.QueryRowContext(ctx, `SELECT count(*) FROM `+q+`.admin_audit a
		WHERE NOT EXISTS (SELECT 1 FROM `+q+`.audit_hashes h WHERE h.audit_id = a.id)`).Scan(&r.UnsealedAuditRows)
}

// verifySeals recomputes each seal's digest from the hash rows it sealed.
func verifySeals(ctx context.Context, tx *sqlx.Tx, q string, r *VerifyReport) error {
	type seal struct {
		id, events, auditRows int64
		prevDigest, digest    []byte
		spans                 []sealSpan
		audit                 sealSpan
		gotEvents, gotAudit   int64
	}
	var seals []*seal
	byID := map[int64]*seal{}
	rows, err := tx.QueryContext(ctx, `SELECT id, events, audit_rows, prev_digest, digest FROM `+q+`.chain_seals ORDER BY id`)
	if err != nil {
		return err
	}
	for rows.Next() {
		s := &seal{}
		if err := rows.Scan(&s.id, &s.events, &s.auditRows, &s.prevDigest, &s.digest); err != nil {
			rows.Close()
			return err
		}
		seals = append(seals, s)
		byID[s.id] = s
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	// Each seal's spans, in byte order of tenant and stream id as Seal
	// wrote them.
	rows, err = tx.QueryContext(ctx, `
		SELECT h.seal_id, h.tenant_id, h.stream_id, min(h.version), max(h.version), count(*),
		       (array_agg(h.hash ORDER BY h.version DESC))[1]
		FROM `+q+`.event_hashes h GROUP BY h.seal_id, h.tenant_id, h.stream_id
		ORDER BY h.seal_id, h.tenant_id COLLATE "C", h.stream_id COLLATE "C"`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var sealID, n int64
		var sp sealSpan
		if err := rows.Scan(&sealID, &sp.tenant, &sp.streamID, &sp.first, &sp.last, &n, &sp.head); err != nil {
			rows.Close()
			return err
		}
		s := byID[sealID]
		if s == nil {
			r.add(VerifyProblem{Kind: ProblemSeal, SealID: sealID, Tenant: sp.tenant, StreamID: sp.streamID, Version: sp.first, Detail: "hashes of a seal that does not exist"})
			continue
		}
		s.spans = append(s.spans, sp)
		s.gotEvents += n
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	rows, err = tx.QueryContext(ctx, `
		SELECT seal_id, min(seq), max(seq), count(*), (array_agg(hash ORDER BY seq DESC))[1]
		FROM `+q+`.audit_hashes GROUP BY seal_id ORDER BY seal_id`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var sealID, n int64
		var sp sealSpan
		if err := rows.Scan(&sealID, &sp.first, &sp.last, &n, &sp.head); err != nil {
			rows.Close()
			return err
		}
		if s := byID[sealID]; s != nil {
			s.audit, s.gotAudit = sp, n
		} else {
			r.add(VerifyProblem{Kind: ProblemSeal, SealID: sealID, Detail: "audit hashes of a seal that does not exist"})
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	prev := zeroHash
	for i, s := range seals {
		// Sorted as sealBatch sorts them, whatever the database's encoding
		// makes of COLLATE "C".
		slices.SortFunc(s.spans, func(x, y sealSpan) int {
			return streamKey{x.tenant, x.streamID}.compare(streamKey{y.tenant, y.streamID})
		})
		r.Seals++
		if s.id != int64(i+1) {
			r.add(VerifyProblem{Kind: ProblemSeal, SealID: s.id, Detail: fmt.Sprintf("seals %d..%d are missing", i+1, s.id-1)})
		}
		if !bytesEqual(s.prevDigest, prev) {
			r.add(VerifyProblem{Kind: ProblemSeal, SealID: s.id, Detail: "the seal does not follow the one before it"})
		}
		if s.gotEvents != s.events || s.gotAudit != s.auditRows ||
			!bytesEqual(sealDigest(s.id, s.prevDigest, s.spans, s.audit), s.digest) {
			r.add(VerifyProblem{Kind: ProblemSeal, SealID: s.id,
				Detail: fmt.Sprintf("the seal's digest does not match the hashes it sealed (%d of %d events, %d of %d audit rows found)", s.gotEvents, s.events, s.gotAudit, s.auditRows)})
		}
		prev = s.digest
	}
	if len(seals) > 0 {
		r.LatestDigest = hex.EncodeToString(seals[len(seals)-1].digest)
	}
	return nil
}
