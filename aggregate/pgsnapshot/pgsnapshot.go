// Package pgsnapshot keeps aggregate snapshots in PostgreSQL, in the
// snapshots table that pgstore's migrations create beside the events.
package pgsnapshot

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

// Store is an aggregate.SnapshotStore over a migrated stele schema.
type Store struct {
	db           *sqlx.DB
	load, upsert string
	tenant       string // "" unless made by ForTenant
}

var _ aggregate.SnapshotStore = (*Store)(nil)

// New returns a snapshot store in schema (run pgstore.Migrate first).
func New(db *sqlx.DB, schema string) (*Store, error) {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return nil, err
	}
	t := `"` + schema + `".snapshots`
	return &Store{
		db:   db,
		load: `SELECT version, schema_version, data, taken_at FROM ` + t + ` WHERE tenant_id = $2 AND stream_id = $1`,
		// A slower writer never replaces a newer snapshot.
		upsert: `INSERT INTO ` + t + ` (stream_id, version, schema_version, data) VALUES ($1, $2, $3, $4)
			ON CONFLICT (tenant_id, stream_id) DO UPDATE SET version = excluded.version, schema_version = excluded.schema_version,
			data = excluded.data, taken_at = now() WHERE ` + t + `.version <= excluded.version`,
	}, nil
}

// ForTenant returns a snapshot store for one tenant's streams (the
// counterpart of pgstore.Store.ForTenant).
func (s *Store) ForTenant(tenant string) (*Store, error) {
	if err := pgstore.ValidateTenant(tenant); err != nil {
		return nil, err
	}
	t := *s
	t.tenant = tenant
	return &t, nil
}

// Tenant returns the tenant the snapshots belong to, "" for none.
func (s *Store) Tenant() string { return s.tenant }

// within runs fn on the pool, or for a tenant in a transaction that set it.
func (s *Store) within(ctx context.Context, fn func(q sqlx.ExecerContext, row func(string, ...any) *sql.Row) error) error {
	if s.tenant == "" {
		return fn(s.db, func(q string, args ...any) *sql.Row { return s.db.QueryRowContext(ctx, q, args...) })
	}
	tx, err := s.db.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // a no-op after Commit
	if err := pgstore.SetTenant(ctx, tx, s.tenant); err != nil {
		return err
	}
	if err := fn(tx, func(q string, args ...any) *sql.Row { return tx.QueryRowContext(ctx, q, args...) }); err != nil {
		return err
	}
	return tx.Commit()
}

// LoadSnapshot returns the stream's snapshot, if any.
func (s *Store) LoadSnapshot(ctx context.Context, streamID string) (aggregate.Snapshot, bool, error) {
	snap := aggregate.Snapshot{StreamID: streamID}
	var v int64
	err := s.within(ctx, func(_ sqlx.ExecerContext, row func(string, ...any) *sql.Row) error {
		return row(s.load, streamID, s.tenant).Scan(&v, &snap.SchemaVersion, &snap.Data, &snap.TakenAt)
	})
	if errors.Is(err, sql.ErrNoRows) {
		return aggregate.Snapshot{}, false, nil
	}
	if err != nil {
		return aggregate.Snapshot{}, false, fmt.Errorf("pgsnapshot: loading %q: %w", streamID, err)
	}
	snap.Version = eventstore.Version(v)
	return snap, true, nil
}

// SaveSnapshot stores snap unless a later one is stored.
func (s *Store) SaveSnapshot(ctx context.Context, snap aggregate.Snapshot) error {
	if err := s.within(ctx, func(q sqlx.ExecerContext, _ func(string, ...any) *sql.Row) error {
		_, err := q.ExecContext(ctx, s.upsert, snap.StreamID, int64(snap.Version), snap.SchemaVersion, snap.Data)
		return err
	}); err != nil {
		return fmt.Errorf("pgsnapshot: saving %q at v%d: %w", snap.StreamID, snap.Version, err)
	}
	return nil
}
