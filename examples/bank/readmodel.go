package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/projection"
	"github.com/stele-dev/stele/telemetry"
)

// BalancesProjection names the read model's projection: its checkpoint,
// dead letters and lease.
const BalancesProjection = "balances"

// Balance is one account's row in the read model.
type Balance struct {
	Account string
	Balance int
	Version eventstore.Version // of the last event applied
}

// Entry is one line of an account's history: one per stored event.
type Entry struct {
	Account string
	Version eventstore.Version
	Kind    string // opened, credited or debited
	Amount  int    // 0 for opened
	Ref     string // "" for opened
}

// entry decodes an account event into its line of history.
func entry(reg *codec.Registry, e eventstore.Event) (Entry, error) {
	id, ok := strings.CutPrefix(e.StreamID, "account-")
	if !ok {
		return Entry{}, fmt.Errorf("%s is not an account stream", e.StreamID)
	}
	v, err := reg.Decode(e)
	if err != nil {
		return Entry{}, err
	}
	out := Entry{Account: id, Version: e.Version}
	switch v := v.(type) {
	case AccountOpened:
		out.Kind = "opened"
	case Credited:
		out.Kind, out.Amount, out.Ref = "credited", v.Amount, v.Ref
	case Debited:
		out.Kind, out.Amount, out.Ref = "debited", v.Amount, v.Ref
	default:
		return Entry{}, fmt.Errorf("%s v%d: no read model for %T", e.StreamID, e.Version, v)
	}
	return out, nil
}

// delta is what the entry does to the balance.
func (en Entry) delta() int {
	if en.Kind == "debited" {
		return -en.Amount
	}
	return en.Amount
}

// BalancesTx is the read model in PostgreSQL: tables bank_balances and
// bank_history, written in the projection runner's transaction. The
// checkpoint commits with them, so each event is applied exactly once; the
// primary key of bank_history would refuse a second time anyway.
type BalancesTx struct {
	db     *sqlx.DB
	schema string // quoted
	codec  *codec.Registry
}

// NewBalancesTx creates the read model's tables in schema if they are missing.
func NewBalancesTx(ctx context.Context, db *sqlx.DB, schema string) (*BalancesTx, error) {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return nil, err
	}
	b := &BalancesTx{db: db, schema: `"` + schema + `"`, codec: eventCodec()}
	_, err := db.ExecContext(ctx, `
		CREATE TABLE IF NOT EXISTS `+b.schema+`.bank_balances (
			account         text   PRIMARY KEY,
			balance         bigint NOT NULL,
			updated_version bigint NOT NULL
		);
		CREATE TABLE IF NOT EXISTS `+b.schema+`.bank_history (
			account text   NOT NULL,
			version bigint NOT NULL,
			kind    text   NOT NULL,
			amount  bigint NOT NULL,
			ref     text   NOT NULL,
			PRIMARY KEY (account, version)
		)`)
	if err != nil {
		return nil, fmt.Errorf("creating the bank read model: %w", err)
	}
	return b, nil
}

// HandleTx applies one account event. A dead letter retried later arrives
// after newer events, hence greatest().
func (b *BalancesTx) HandleTx(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
	en, err := entry(b.codec, e)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO `+b.schema+`.bank_history VALUES ($1, $2, $3, $4, $5)`,
		en.Account, int64(en.Version), en.Kind, en.Amount, en.Ref); err != nil {
		return err
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO `+b.schema+`.bank_balances AS b VALUES ($1, $2, $3)
		ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance,
			updated_version = greatest(b.updated_version, excluded.updated_version)`,
		en.Account, en.delta(), int64(en.Version))
	return err
}

// Balances reads every account's balance, by account id.
func (b *BalancesTx) Balances(ctx context.Context) ([]Balance, error) {
	rows, err := b.db.QueryContext(ctx, `SELECT account, balance, updated_version FROM `+b.schema+`.bank_balances ORDER BY account`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Balance
	for rows.Next() {
		var bal Balance
		var v int64
		if err := rows.Scan(&bal.Account, &bal.Balance, &v); err != nil {
			return nil, err
		}
		bal.Version = eventstore.Version(v)
		out = append(out, bal)
	}
	return out, rows.Err()
}

// MemoryBalances is the same read model in memory, fed by a Handler for the
// in-memory store. Handlers get events at least once; it skips any event at
// or before the last position it applied.
type MemoryBalances struct {
	codec   *codec.Registry
	mu      sync.Mutex
	last    eventstore.Position
	bal     map[string]Balance
	history []Entry
}

// NewMemoryBalances returns an empty read model.
func NewMemoryBalances() *MemoryBalances {
	return &MemoryBalances{codec: eventCodec(), bal: map[string]Balance{}}
}

// Handle applies one account event, once.
func (m *MemoryBalances) Handle(_ context.Context, e eventstore.Event) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.last.Less(e.Position) {
		return nil // seen already: delivered again after a restart
	}
	en, err := entry(m.codec, e)
	if err != nil {
		return err
	}
	b := m.bal[en.Account]
	m.bal[en.Account] = Balance{Account: en.Account, Balance: b.Balance + en.delta(), Version: en.Version}
	m.history = append(m.history, en)
	m.last = e.Position
	return nil
}

// Balances returns every account's balance, by account id.
func (m *MemoryBalances) Balances(context.Context) ([]Balance, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Balance, 0, len(m.bal))
	for _, b := range m.bal {
		out = append(out, b)
	}
	slices.SortFunc(out, func(a, b Balance) int { return strings.Compare(a.Account, b.Account) })
	return out, nil
}

// History returns the entries applied, in the order they were.
func (m *MemoryBalances) History() []Entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.history)
}

// ReadModel is the balances read model, in PostgreSQL or in memory.
type ReadModel interface {
	Balances(ctx context.Context) ([]Balance, error)
}

// StartReadModel starts the balances projection over store: into PostgreSQL
// tables in the store's schema for a pgstore.Store, in memory otherwise.
// Stop the runner when done. With tel, each event's handling is traced.
func StartReadModel(ctx context.Context, store eventstore.Store, tel *telemetry.Telemetry) (*projection.Runner, ReadModel, error) {
	cfg := projection.Config{Name: BalancesProjection, Category: "account"}
	var handler any
	var rm ReadModel
	if pg, ok := store.(*pgstore.Store); ok {
		b, err := NewBalancesTx(ctx, pg.DB(), pg.Schema())
		if err != nil {
			return nil, nil, err
		}
		cfg.DB, cfg.Schema = pg.DB(), pg.Schema()
		handler, rm = b, b
		if tel != nil {
			handler = tel.ProjectionTxHandler(BalancesProjection, b)
		}
	} else {
		m := NewMemoryBalances()
		handler, rm = m, m
		if tel != nil {
			handler = tel.ProjectionHandler(BalancesProjection, m)
		}
	}
	r, err := projection.NewRunner(store, handler, cfg)
	if err != nil {
		return nil, nil, err
	}
	if err := r.Start(ctx); err != nil {
		return nil, nil, err
	}
	return r, rm, nil
}

// WaitCaughtUp waits until the runner has handled every account event
// committed before it was called.
func WaitCaughtUp(ctx context.Context, store eventstore.Store, r *projection.Runner) error {
	// Aim at the last committed account event. Stream reads show a commit at
	// once; the feed (and Head) may hold it back a moment while older
	// transactions anywhere on the server finish, so Head is no target.
	var target eventstore.Position
	for after := ""; ; {
		page, err := store.ListStreams(ctx, eventstore.ListStreamsOpts{Category: "account", After: after})
		if err != nil {
			return err
		}
		for _, si := range page {
			last, err := store.ReadStream(ctx, si.StreamID, eventstore.ReadStreamOpts{Direction: eventstore.Backward, Limit: 1})
			if err != nil {
				return err
			}
			if len(last) == 1 && target.Less(last[0].Position) {
				target = last[0].Position
			}
		}
		if len(page) < eventstore.DefaultPageSize {
			break
		}
		after = page[len(page)-1].StreamID
	}
	for {
		st, err := r.Status(ctx)
		if err != nil {
			return err
		}
		switch {
		case st.State == projection.StateFailed:
			return fmt.Errorf("read model: %w", st.Err)
		case st.State == projection.StateRunning && !st.Position.Less(target):
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the read model to reach %s (at %s): %w", target, st.Position, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}
