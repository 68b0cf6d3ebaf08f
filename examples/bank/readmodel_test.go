package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// openAccounts opens n accounts with 1000 each.
func openAccounts(t *testing.T, bank *Bank, n int) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("acc%d", i)
		if err := bank.Open(context.Background(), ids[i], "owner "+ids[i], 100, 1000); err != nil {
			t.Fatal(err)
		}
	}
	return ids
}

// transferBurst moves money at random between the accounts from several
// goroutines at once.
func transferBurst(t *testing.T, bank *Bank, ids []string, seed uint64) {
	t.Helper()
	const workers, perWorker = 8, 15
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			for i := range perWorker {
				from := rng.IntN(len(ids))
				to := (from + 1 + rng.IntN(len(ids)-1)) % len(ids)
				id := fmt.Sprintf("t-%d-%d-%d", seed, w, i)
				err := bank.Transfer(ctx, id, ids[from], ids[to], 1+rng.IntN(400))
				if err != nil && !errors.Is(err, ErrOverdraft) {
					t.Errorf("transfer %s: %v", id, err)
				}
			}
		})
	}
	wg.Wait()
}

// checkReadModel compares the read model with the accounts loaded through
// the repository (balances) and with the stored events (history: one entry
// per event, in version order).
func checkReadModel(t *testing.T, store eventstore.Store, rm ReadModel, history []Entry, ids []string) {
	t.Helper()
	ctx := context.Background()
	bank, err := NewBank(store, nil)
	if err != nil {
		t.Fatal(err)
	}
	var want []Balance
	var wantHistory []Entry
	reg := eventCodec()
	for _, id := range ids {
		a, err := bank.Account(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, Balance{Account: id, Balance: a.Balance, Version: a.Version()})
		events, err := eventstore.LoadStream(ctx, store, "account-"+id)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range events {
			en, err := entry(reg, e)
			if err != nil {
				t.Fatal(err)
			}
			wantHistory = append(wantHistory, en)
		}
	}
	got, err := rm.Balances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read model balances\n%v\nloaded through the repository\n%v", got, want)
	}
	if len(history) != len(wantHistory) {
		t.Errorf("%d history entries for %d stored events", len(history), len(wantHistory))
	}
	for i := range min(len(history), len(wantHistory)) {
		if history[i] != wantHistory[i] {
			t.Fatalf("history entry %d is %+v; the stored event says %+v", i, history[i], wantHistory[i])
		}
	}
}

// pgHistory reads bank_history in account and version order.
func pgHistory(t *testing.T, db *sqlx.DB, schema string) []Entry {
	t.Helper()
	rows, err := db.Query(`SELECT account, version, kind, amount, ref FROM "` + schema + `".bank_history ORDER BY account, version`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []Entry
	for rows.Next() {
		var en Entry
		var v int64
		if err := rows.Scan(&en.Account, &v, &en.Kind, &en.Amount, &en.Ref); err != nil {
			t.Fatal(err)
		}
		en.Version = eventstore.Version(v)
		out = append(out, en)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestReadModelPostgres: a burst of transfers while the projection follows
// live; then its process goes away, a second burst happens with no
// projection running, and a projection in another process resumes from the
// checkpoint. bank_balances ends equal to the accounts loaded through the
// repository, and bank_history holds exactly one row per stored event.
func TestReadModelPostgres(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			store, snaps := pgBackend(t, driver)
			pg := store.(*pgstore.Store)

			// The first process: a pool and store of its own, closed when it
			// ends (which also gives up the projection's lease).
			db1, err := sqlx.Open(driver, testdb.DSN())
			if err != nil {
				t.Fatal(err)
			}
			store1, err := pgstore.New(db1, &pgstore.Config{Schema: pg.Schema()})
			if err != nil {
				t.Fatal(err)
			}
			first, _, err := StartReadModel(ctx, store1, nil)
			if err != nil {
				t.Fatal(err)
			}
			bank, err := NewBank(store, snaps)
			if err != nil {
				t.Fatal(err)
			}
			ids := openAccounts(t, bank, 5)
			transferBurst(t, bank, ids, 1)
			err = WaitCaughtUp(ctx, store, first)
			first.Stop(ctx)
			store1.Close()
			db1.Close()
			if err != nil {
				t.Fatal(err)
			}
			if h := pgHistory(t, pg.DB(), pg.Schema()); len(h) == 0 {
				t.Fatal("the first projection wrote no history")
			}

			transferBurst(t, bank, ids, 2)
			second, rm, err := StartReadModel(ctx, store, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer second.Stop(ctx)
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if err := WaitCaughtUp(wctx, store, second); err != nil {
				t.Fatal(err)
			}
			checkReadModel(t, store, rm, pgHistory(t, pg.DB(), pg.Schema()), ids)
		})
	}
}

// TestReadModelMemory: the Handler variant on the in-memory store.
func TestReadModelMemory(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	r, rm, err := StartReadModel(ctx, store, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Stop(ctx)
	bank, err := NewBank(store, aggregate.NewMemorySnapshots())
	if err != nil {
		t.Fatal(err)
	}
	ids := openAccounts(t, bank, 5)
	transferBurst(t, bank, ids, 3)
	if err := WaitCaughtUp(ctx, store, r); err != nil {
		t.Fatal(err)
	}
	m := rm.(*MemoryBalances)
	checkReadModel(t, store, m, byAccount(m.History(), ids), ids)
}

// TestMemoryBalancesAtLeastOnce: events delivered again (as a Handler may
// get them after a restart) change nothing.
func TestMemoryBalancesAtLeastOnce(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	bank, err := NewBank(store, nil)
	if err != nil {
		t.Fatal(err)
	}
	ids := openAccounts(t, bank, 3)
	transferBurst(t, bank, ids, 4)
	var events []eventstore.Event
	for e, err := range eventstore.IterAll(ctx, store, eventstore.ReadAllOpts{}) {
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, e)
	}
	m := NewMemoryBalances()
	half := len(events) / 2
	for _, e := range append(append(events[:half:half], events[:half]...), events...) {
		if err := m.Handle(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	checkReadModel(t, store, m, byAccount(m.History(), ids), ids)
}

// byAccount orders feed-ordered history like bank_history: by account, then
// version.
func byAccount(h []Entry, ids []string) []Entry {
	var out []Entry
	for _, id := range ids {
		for _, en := range h {
			if en.Account == id {
				out = append(out, en)
			}
		}
	}
	return out
}
