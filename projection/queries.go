package projection

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

// queries are the statements over the checkpoint and dead-letter tables of
// one schema (created by pgstore's migrations).
type queries struct {
	leaseKey, table, rebuilds                string
	loadCP, saveCP, parkDL, countDL, listDL  string
	deleteDL, getDL, requestRetry, requested string
	setSlot, getSlot, setState               string
}

func newQueries(schema string) (queries, error) {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return queries{}, fmt.Errorf("projection: Config.Schema: %w", err)
	}
	s := `"` + schema + `"`
	// Rows belong to the transaction's tenant ('' for none): inserts take it
	// from the column default, and reads name it.
	tenant := `tenant_id = coalesce(current_setting('` + pgstore.TenantSetting + `', true), '')`
	dlCols := `id, projection, stream_id, version, transaction_id::text, position, event_id::text, event_type, error, attempts, failed_at`
	return queries{
		leaseKey: "stele.projection:" + schema,
		table:    s + `.projection_dead_letters`,
		rebuilds: s + `.projection_rebuilds`,
		loadCP:   `SELECT transaction_id::text, position FROM ` + s + `.projection_checkpoints WHERE name = $1 AND ` + tenant,
		saveCP: `INSERT INTO ` + s + `.projection_checkpoints (name, transaction_id, position, updated_at) VALUES ($1, $2::text::xid8, $3, now())
			ON CONFLICT (tenant_id, name) DO UPDATE SET transaction_id = excluded.transaction_id, position = excluded.position, updated_at = now()`,
		parkDL: `INSERT INTO ` + s + `.projection_dead_letters (projection, stream_id, version, transaction_id, position, event_id, event_type, error, attempts)
			VALUES ($1, $2, $3, $4::text::xid8, $5, $6, $7, $8, $9)
			ON CONFLICT (tenant_id, projection, event_id) DO UPDATE SET error = excluded.error, attempts = excluded.attempts, failed_at = now()`,
		countDL:  `SELECT count(*) FROM ` + s + `.projection_dead_letters WHERE projection = $1 AND ` + tenant,
		listDL:   `SELECT ` + dlCols + ` FROM ` + s + `.projection_dead_letters WHERE (projection = $1 OR $1 = '') AND ` + tenant + ` ORDER BY id`,
		getDL:    `SELECT ` + dlCols + ` FROM ` + s + `.projection_dead_letters WHERE id = $1 AND ` + tenant,
		deleteDL: `DELETE FROM ` + s + `.projection_dead_letters WHERE id = $1 AND ` + tenant,
		setSlot: `INSERT INTO ` + s + `.projection_slots (name, slot) VALUES ($1, $2)
			ON CONFLICT (name) DO UPDATE SET slot = excluded.slot, switched_at = now()`,
		getSlot: `SELECT slot FROM ` + s + `.projection_slots WHERE name = $1`,
		setState: `INSERT INTO ` + s + `.projection_checkpoints (name, state, state_error, state_at) VALUES ($1, $2, $3, now())
			ON CONFLICT (tenant_id, name) DO UPDATE SET state = excluded.state, state_error = excluded.state_error, state_at = now()`,
		requestRetry: `UPDATE ` + s + `.projection_dead_letters SET retry_requested_at = now() WHERE id = $1 AND ` + tenant,
		requested:    `SELECT id FROM ` + s + `.projection_dead_letters WHERE projection = $1 AND ` + tenant + ` AND retry_requested_at IS NOT NULL ORDER BY id`,
	}, nil
}

type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowxContext(ctx context.Context, query string, args ...any) *sqlx.Row
	QueryxContext(ctx context.Context, query string, args ...any) (*sqlx.Rows, error)
}

func (q queries) loadCheckpoint(ctx context.Context, db querier, name string) (eventstore.Position, error) {
	var xid string
	var p eventstore.Position
	err := db.QueryRowxContext(ctx, q.loadCP, name).Scan(&xid, &p.GlobalPosition)
	if errors.Is(err, errNoRows) {
		return eventstore.Start, nil
	}
	if err == nil {
		p.TxID, err = strconv.ParseUint(xid, 10, 64)
	}
	if err != nil {
		return eventstore.Position{}, fmt.Errorf("loading checkpoint of %s: %w", name, err)
	}
	return p, nil
}

func (q queries) saveCheckpoint(ctx context.Context, db querier, name string, p eventstore.Position) error {
	if _, err := db.ExecContext(ctx, q.saveCP, name, strconv.FormatUint(p.TxID, 10), p.GlobalPosition); err != nil {
		return fmt.Errorf("saving checkpoint of %s at %s: %w", name, p, err)
	}
	return nil
}

func (q queries) park(ctx context.Context, db querier, name string, e eventstore.Event, cause error, attempts int) error {
	_, err := db.ExecContext(ctx, q.parkDL, name, e.StreamID, int64(e.Version), strconv.FormatUint(e.Position.TxID, 10),
		e.Position.GlobalPosition, e.ID.String(), e.Type, cause.Error(), attempts)
	if err != nil {
		return fmt.Errorf("parking %s v%d for %s: %w", e.StreamID, e.Version, name, err)
	}
	return nil
}

func (q queries) countDeadLetters(ctx context.Context, db querier, name string) (int, error) {
	var n int
	err := db.QueryRowxContext(ctx, q.countDL, name).Scan(&n)
	return n, err
}

func scanDeadLetter(row interface{ Scan(...any) error }) (DeadLetter, error) {
	var d DeadLetter
	var v int64
	var xid string
	err := row.Scan(&d.ID, &d.Projection, &d.StreamID, &v, &xid, &d.Position.GlobalPosition, &d.EventID, &d.EventType, &d.Error, &d.Attempts, &d.FailedAt)
	if err != nil {
		return d, err
	}
	d.Version = eventstore.Version(v)
	d.Position.TxID, err = strconv.ParseUint(xid, 10, 64)
	return d, err
}

// ListDeadLetters lists the dead letters of projection name ("" for all) in
// the schema, oldest first.
func ListDeadLetters(ctx context.Context, db *sqlx.DB, schema, name string) ([]DeadLetter, error) {
	q, err := newQueries(schema)
	if err != nil {
		return nil, err
	}
	rows, err := db.QueryxContext(ctx, q.listDL, name)
	if err != nil {
		return nil, fmt.Errorf("projection: listing dead letters: %w", err)
	}
	defer rows.Close()
	var out []DeadLetter
	for rows.Next() {
		d, err := scanDeadLetter(rows)
		if err != nil {
			return nil, fmt.Errorf("projection: listing dead letters: %w", err)
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// DiscardDeadLetter deletes dead letter id without handling it.
func DiscardDeadLetter(ctx context.Context, db *sqlx.DB, schema string, id int64) error {
	q, err := newQueries(schema)
	if err != nil {
		return err
	}
	res, err := db.ExecContext(ctx, q.deleteDL, id)
	if err != nil {
		return fmt.Errorf("projection: discarding dead letter %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("projection: dead letter %d: %w", id, ErrNoDeadLetter)
	}
	return nil
}

// RequestRetry asks the running projection that parked dead letter id to
// handle it again (it looks between batches, and at least every few seconds
// when idle); `stele dlq retry` uses it, because the handler's code lives in
// the application, not in the CLI. On success the dead letter disappears; on
// failure it stays, with the new error.
func RequestRetry(ctx context.Context, db *sqlx.DB, schema string, id int64) error {
	q, err := newQueries(schema)
	if err != nil {
		return err
	}
	res, err := db.ExecContext(ctx, q.requestRetry, id)
	if err != nil {
		return fmt.Errorf("projection: requesting a retry of dead letter %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("projection: dead letter %d: %w", id, ErrNoDeadLetter)
	}
	return nil
}

// ErrNoDeadLetter: no dead letter has that id.
var ErrNoDeadLetter = errors.New("no such dead letter")

// RetryDeadLetter reads the parked event from store and hands it to handler
// (a Handler or a TxHandler) once more; on success the dead letter is removed
// (in the handler's transaction for a TxHandler). On failure it stays.
// With a store bound to a tenant (pgstore.Store.ForTenant), the dead letter
// is that tenant's, and the handler's transaction is the tenant's.
func RetryDeadLetter(ctx context.Context, store eventstore.Store, db *sqlx.DB, schema string, id int64, handler any) error {
	q, err := newQueries(schema)
	if err != nil {
		return err
	}
	tenant := ""
	if ts, ok := store.(interface{ Tenant() string }); ok {
		tenant = ts.Tenant()
	}
	return retryDeadLetter(ctx, q, store, db, tenant, id, handler)
}

func retryDeadLetter(ctx context.Context, q queries, store eventstore.Store, db *sqlx.DB, tenant string, id int64, handler any) error {
	var txh BatchTxHandler
	switch h := handler.(type) {
	case BatchTxHandler:
		txh = h
	case TxHandler:
		txh = oneByOne{h}
	case Handler:
	default:
		return fmt.Errorf("projection: handler %T is neither a Handler nor a TxHandler", handler)
	}
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if tenant != "" {
		if err := pgstore.SetTenant(ctx, tx, tenant); err != nil {
			return err
		}
	}
	// The row lock makes concurrent retries of one dead letter take turns:
	// the second finds it gone rather than applying the event again.
	d, err := scanDeadLetter(tx.QueryRowxContext(ctx, q.getDL+` FOR UPDATE`, id))
	if errors.Is(err, errNoRows) {
		return fmt.Errorf("projection: dead letter %d: %w", id, ErrNoDeadLetter)
	}
	if err != nil {
		return fmt.Errorf("projection: reading dead letter %d: %w", id, err)
	}
	page, err := store.ReadStream(ctx, d.StreamID, eventstore.ReadStreamOpts{From: d.Version, Limit: 1})
	if err != nil || len(page) == 0 || page[0].ID.String() != d.EventID {
		return fmt.Errorf("projection: dead letter %d: event %s v%d not found in the store (%v)", id, d.StreamID, d.Version, err)
	}
	e := page[0]
	if txh != nil {
		err = txh.HandleBatchTx(ctx, tx, []eventstore.Event{e}) // exactly once, with the delete
	} else {
		err = handler.(Handler).Handle(ctx, e) // at least once
	}
	if err != nil {
		return fmt.Errorf("projection: retrying dead letter %d: %w", id, err)
	}
	if _, err := tx.ExecContext(ctx, q.deleteDL, id); err != nil {
		return err
	}
	return tx.Commit()
}
