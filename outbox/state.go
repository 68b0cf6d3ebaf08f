package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

// lease is a relay's hold on its name: the epoch it won and its checkpoint
// at that moment.
type lease struct {
	epoch      int64
	checkpoint eventstore.Position
}

// progress is what a relay records with each checkpoint.
type progress struct {
	pos       eventstore.Position
	published int
	latency   time.Duration
}

// state keeps relays' leases and checkpoints. Every write after acquire is
// fenced by the epoch: it takes effect only while the epoch is still the
// caller's, and reports false when another relay has taken over.
type state interface {
	acquire(ctx context.Context, name, owner string, ttl time.Duration) (lease, bool, error)
	renew(ctx context.Context, name string, epoch int64, ttl time.Duration) (bool, error)
	commit(ctx context.Context, name string, epoch int64, ttl time.Duration, p progress) (bool, error)
	fail(ctx context.Context, name string, epoch int64, cause error) error
	release(ctx context.Context, name string, epoch int64) error
	read(ctx context.Context, name string) (Status, error)
	names(ctx context.Context) ([]string, error)
}

// MemoryState keeps relay leases and checkpoints in memory, for the embedded
// default and tests. Relays that should compete for one name in a process
// share one MemoryState.
type MemoryState struct {
	mu     sync.Mutex
	relays map[string]*Status
}

// NewMemoryState returns an empty state.
func NewMemoryState() *MemoryState { return &MemoryState{relays: map[string]*Status{}} }

func (m *MemoryState) get(name string) *Status {
	st := m.relays[name]
	if st == nil {
		st = &Status{Name: name}
		m.relays[name] = st
	}
	return st
}

func (m *MemoryState) acquire(_ context.Context, name, owner string, ttl time.Duration) (lease, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.get(name)
	if time.Now().Before(st.LeaseUntil) {
		return lease{}, false, nil
	}
	st.Epoch++
	st.Owner, st.LeaseUntil = owner, time.Now().Add(ttl)
	return lease{epoch: st.Epoch, checkpoint: st.Checkpoint}, true, nil
}

func (m *MemoryState) renew(_ context.Context, name string, epoch int64, ttl time.Duration) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.get(name)
	if st.Epoch != epoch {
		return false, nil
	}
	st.LeaseUntil = time.Now().Add(ttl)
	return true, nil
}

func (m *MemoryState) commit(_ context.Context, name string, epoch int64, ttl time.Duration, p progress) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.get(name)
	if st.Epoch != epoch {
		return false, nil
	}
	st.LeaseUntil = time.Now().Add(ttl)
	st.Checkpoint = p.pos
	st.LastError = ""
	if p.published > 0 {
		st.Published += int64(p.published)
		st.LastPublishAt, st.LastLatency = time.Now(), p.latency
	}
	return true, nil
}

func (m *MemoryState) fail(_ context.Context, name string, epoch int64, cause error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if st := m.get(name); st.Epoch == epoch {
		st.LastError = cause.Error()
	}
	return nil
}

func (m *MemoryState) release(_ context.Context, name string, epoch int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if st := m.get(name); st.Epoch == epoch {
		st.LeaseUntil = time.Time{}
	}
	return nil
}

func (m *MemoryState) read(_ context.Context, name string) (Status, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return *m.get(name), nil
}

func (m *MemoryState) names(context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for n := range m.relays {
		out = append(out, n)
	}
	return out, nil
}

// pgState keeps leases and checkpoints in the outbox_relays table. Lease
// times are the database's clock, so relays on different hosts agree.
type pgState struct {
	db    *sqlx.DB
	table string
}

func newPGState(db *sqlx.DB, schema string) (*pgState, error) {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return nil, fmt.Errorf("outbox: Config.Schema: %w", err)
	}
	return &pgState{db: db, table: `"` + schema + `".outbox_relays`}, nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func (s *pgState) acquire(ctx context.Context, name, owner string, ttl time.Duration) (lease, bool, error) {
	if _, err := s.db.ExecContext(ctx, `INSERT INTO `+s.table+` (name) VALUES ($1) ON CONFLICT DO NOTHING`, name); err != nil {
		return lease{}, false, fmt.Errorf("outbox: relay %s: %w", name, err)
	}
	var l lease
	var tx string
	err := s.db.QueryRowContext(ctx, `UPDATE `+s.table+`
		SET epoch = epoch + 1, owner = $2, lease_until = now() + $3 * interval '1 millisecond', updated_at = now()
		WHERE name = $1 AND lease_until < now()
		RETURNING epoch, transaction_id::text, position`, name, owner, ms(ttl)).Scan(&l.epoch, &tx, &l.checkpoint.GlobalPosition)
	if errors.Is(err, sql.ErrNoRows) {
		return lease{}, false, nil
	}
	if err != nil {
		return lease{}, false, fmt.Errorf("outbox: taking the lease of relay %s: %w", name, err)
	}
	if l.checkpoint.TxID, err = strconv.ParseUint(tx, 10, 64); err != nil {
		return lease{}, false, fmt.Errorf("outbox: relay %s: checkpoint transaction id %q: %w", name, tx, err)
	}
	return l, true, nil
}

func (s *pgState) renew(ctx context.Context, name string, epoch int64, ttl time.Duration) (bool, error) {
	res, err := s.db.ExecContext(ctx, `UPDATE `+s.table+` SET lease_until = now() + $3 * interval '1 millisecond'
		WHERE name = $1 AND epoch = $2`, name, epoch, ms(ttl))
	return affected(res, err, "renewing the lease of relay "+name)
}

func (s *pgState) commit(ctx context.Context, name string, epoch int64, ttl time.Duration, p progress) (bool, error) {
	q := `UPDATE ` + s.table + ` SET lease_until = now() + $3 * interval '1 millisecond',
		transaction_id = $4::text::xid8, position = $5, last_error = NULL, updated_at = now()`
	args := []any{name, epoch, ms(ttl), strconv.FormatUint(p.pos.TxID, 10), p.pos.GlobalPosition}
	if p.published > 0 {
		q += `, published = published + $6, last_publish_at = now(), last_latency_ms = $7`
		args = append(args, p.published, ms(p.latency))
	}
	res, err := s.db.ExecContext(ctx, q+` WHERE name = $1 AND epoch = $2`, args...)
	return affected(res, err, "checkpointing relay "+name)
}

func (s *pgState) fail(ctx context.Context, name string, epoch int64, cause error) error {
	_, err := s.db.ExecContext(ctx, `UPDATE `+s.table+` SET last_error = $3, updated_at = now() WHERE name = $1 AND epoch = $2`,
		name, epoch, cause.Error())
	return err
}

func (s *pgState) release(ctx context.Context, name string, epoch int64) error {
	_, err := s.db.ExecContext(ctx, `UPDATE `+s.table+` SET lease_until = '-infinity' WHERE name = $1 AND epoch = $2`, name, epoch)
	return err
}

func (s *pgState) read(ctx context.Context, name string) (Status, error) {
	st := Status{Name: name}
	var tx string
	var lastAt sql.NullTime
	var latency sql.NullFloat64
	var lastErr sql.NullString
	var until time.Time
	err := s.db.QueryRowContext(ctx, `SELECT epoch, owner, GREATEST(lease_until, 'epoch'::timestamptz), transaction_id::text, position,
			published, last_publish_at, last_latency_ms, last_error FROM `+s.table+` WHERE name = $1`, name).
		Scan(&st.Epoch, &st.Owner, &until, &tx, &st.Checkpoint.GlobalPosition, &st.Published, &lastAt, &latency, &lastErr)
	if errors.Is(err, sql.ErrNoRows) {
		return st, ErrNoRelay
	}
	if err != nil {
		return st, fmt.Errorf("outbox: reading relay %s: %w", name, err)
	}
	if until.Unix() > 0 {
		st.LeaseUntil = until
	}
	if st.Checkpoint.TxID, err = strconv.ParseUint(tx, 10, 64); err != nil {
		return st, fmt.Errorf("outbox: relay %s: checkpoint transaction id %q: %w", name, tx, err)
	}
	st.LastPublishAt = lastAt.Time
	st.LastLatency = time.Duration(latency.Float64 * float64(time.Millisecond))
	st.LastError = lastErr.String
	return st, nil
}

func (s *pgState) names(ctx context.Context) ([]string, error) {
	var out []string
	if err := s.db.SelectContext(ctx, &out, `SELECT name FROM `+s.table+` ORDER BY name`); err != nil {
		return nil, fmt.Errorf("outbox: listing relays: %w", err)
	}
	return out, nil
}

func affected(res sql.Result, err error, what string) (bool, error) {
	if err != nil {
		return false, fmt.Errorf("outbox: %s: %w", what, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("outbox: %s: %w", what, err)
	}
	return n == 1, nil
}
