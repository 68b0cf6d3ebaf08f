package aggregate_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/aggregate/aggregatetest"
	"github.com/stele-dev/stele/aggregate/pgsnapshot"
	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/tenanttest"
	"github.com/stele-dev/stele/internal/testdb"
)

func TestMain(m *testing.M) { testdb.VerifyMain(m) }

// A small account aggregate for the tests.

type Opened struct{ Owner string }
type Credited struct{ Amount int }
type Debited struct{ Amount int }

var ErrInsufficientFunds = errors.New("insufficient funds")

type Account struct {
	aggregate.Root
	Owner   string
	Balance int
	Moves   int
}

func (a *Account) Apply(e any) {
	switch e := e.(type) {
	case Opened:
		a.Owner = e.Owner
	case Credited:
		a.Balance += e.Amount
		a.Moves++
	case Debited:
		a.Balance -= e.Amount
		a.Moves++
	}
}

func (a *Account) Open(owner string) error {
	if a.Version() > 0 || len(a.Pending()) > 0 {
		return errors.New("already open")
	}
	aggregate.Record(a, Opened{Owner: owner})
	return nil
}

func (a *Account) Credit(n int) error {
	aggregate.Record(a, Credited{Amount: n})
	return nil
}

func (a *Account) Debit(n int) error {
	if a.Balance < n {
		return ErrInsufficientFunds
	}
	aggregate.Record(a, Debited{Amount: n})
	return nil
}

func registry() *codec.Registry {
	reg := codec.NewRegistry(nil)
	codec.MustRegister[Opened](reg, "account.opened", 1)
	codec.MustRegister[Credited](reg, "account.credited", 1)
	codec.MustRegister[Debited](reg, "account.debited", 1)
	return reg
}

// backends runs fn on memstore and on pgstore through both drivers.
func backends(t *testing.T, fn func(t *testing.T, store eventstore.Store, snaps func() aggregate.SnapshotStore)) {
	t.Run("memory", func(t *testing.T) {
		fn(t, memstore.New(nil), func() aggregate.SnapshotStore { return aggregate.NewMemorySnapshots() })
	})
	// A tenant's store and snapshots, as the application role with
	// row-level security on, beside another tenant that holds the same
	// account ids, with snapshots far ahead of anything the tests write.
	t.Run("tenant", func(t *testing.T) {
		db := testdb.Open(t, "postgres")
		tn := tenanttest.New(t, db)
		tn.Enable(t)
		noise := tn.Tenant(t, "noise")
		noiseSnaps := must(must(pgsnapshot.New(tn.App, tn.Schema)).ForTenant("noise"))
		for _, id := range []string{"account-1", "account-7", "account-big", "account-x"} {
			if _, err := noise.Append(context.Background(), id, eventstore.Any, []eventstore.EventData{{Type: "noise", Data: []byte(`{}`)}}); err != nil {
				t.Fatal(err)
			}
			if err := noiseSnaps.SaveSnapshot(context.Background(), aggregate.Snapshot{StreamID: id, Version: 1_000_000, SchemaVersion: 1, Data: []byte("{not json")}); err != nil {
				t.Fatal(err)
			}
		}
		fn(t, tn.Tenant(t, "acme"), func() aggregate.SnapshotStore {
			return must(must(pgsnapshot.New(tn.App, tn.Schema)).ForTenant("acme"))
		})
	})
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			db := testdb.Open(t, driver)
			store, schema := pgStore(t, db)
			fn(t, store, func() aggregate.SnapshotStore {
				s, err := pgsnapshot.New(db, schema)
				if err != nil {
					t.Fatal(err)
				}
				return s
			})
		})
	}
}

func pgStore(t *testing.T, db *sqlx.DB) (*pgstore.Store, string) {
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(context.Background(), db, schema); err != nil {
		t.Fatal(err)
	}
	s, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, schema
}

func TestRepositoryLoadSaveAndConflicts(t *testing.T) {
	backends(t, func(t *testing.T, store eventstore.Store, _ func() aggregate.SnapshotStore) {
		ctx := context.Background()
		repo, err := aggregate.NewRepository[Account](store, aggregate.Config{Category: "account", Codec: registry()})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := repo.Load(ctx, "1"); !errors.Is(err, aggregate.ErrNotFound) {
			t.Fatalf("Load of a new account: %v, want ErrNotFound", err)
		}
		a := repo.New("1")
		a.Open("ada")
		a.Credit(10)
		ctx = aggregate.WithMetadata(ctx, eventstore.Metadata{CorrelationID: "req-1"})
		if err := repo.Save(ctx, a); err != nil {
			t.Fatal(err)
		}
		if a.Version() != 2 || len(a.Pending()) != 0 {
			t.Fatalf("after save: version %d, %d pending", a.Version(), len(a.Pending()))
		}
		evs, _ := eventstore.LoadStream(ctx, store, "account-1")
		if len(evs) != 2 || evs[0].Type != "account.opened" || evs[1].Metadata.CorrelationID != "req-1" {
			t.Fatalf("stored %+v", evs)
		}

		// Two copies loaded at the same version: the second save conflicts and
		// stores nothing.
		x, _ := repo.Load(ctx, "1")
		y, _ := repo.Load(ctx, "1")
		x.Debit(3)
		y.Debit(4)
		if err := repo.Save(ctx, x); err != nil {
			t.Fatal(err)
		}
		if err := repo.Save(ctx, y); !errors.Is(err, eventstore.ErrConcurrencyConflict) {
			t.Fatalf("stale save: %v, want a conflict", err)
		}
		got, err := repo.Load(ctx, "1")
		if err != nil || got.Balance != 7 || got.Owner != "ada" || got.Version() != 3 {
			t.Fatalf("loaded %+v (%v), want balance 7 at version 3", got, err)
		}
	})
}

// TestUpdateLosesNoUpdate: concurrent Updates of one account all land, each
// retried after a conflict with a fresh load.
func TestUpdateLosesNoUpdate(t *testing.T) {
	backends(t, func(t *testing.T, store eventstore.Store, _ func() aggregate.SnapshotStore) {
		ctx := context.Background()
		repo, _ := aggregate.NewRepository[Account](store, aggregate.Config{Category: "account", Codec: registry(), MaxRetries: 100})
		if err := repo.Update(ctx, "1", func(a *Account) error { return a.Open("ada") }); err != nil {
			t.Fatal(err)
		}
		const writers = 16
		var wg sync.WaitGroup
		for i := range writers {
			wg.Go(func() {
				if err := repo.Update(ctx, "1", func(a *Account) error { return a.Credit(i + 1) }); err != nil {
					t.Errorf("writer %d: %v", i, err)
				}
			})
		}
		wg.Wait()
		a, err := repo.Load(ctx, "1")
		if err != nil || a.Balance != writers*(writers+1)/2 || a.Moves != writers {
			t.Fatalf("balance %d in %d moves (%v), want %d in %d", a.Balance, a.Moves, err, writers*(writers+1)/2, writers)
		}
		// A rule broken inside Update saves nothing.
		err = repo.Update(ctx, "1", func(a *Account) error { return a.Debit(1 << 20) })
		if !errors.Is(err, ErrInsufficientFunds) {
			t.Fatalf("overdraw: %v", err)
		}
		if b, _ := repo.Load(ctx, "1"); b.Version() != a.Version() {
			t.Fatalf("a refused command moved the version to %d", b.Version())
		}
	})
}

// countingStore counts the events reads return.
type countingStore struct {
	eventstore.Store
	read atomic.Int64
}

func (c *countingStore) ReadStream(ctx context.Context, id string, opts eventstore.ReadStreamOpts) ([]eventstore.Event, error) {
	evs, err := c.Store.ReadStream(ctx, id, opts)
	c.read.Add(int64(len(evs)))
	return evs, err
}

// TestSnapshotsBoundTheLoad: 10,050 events with a snapshot every 100: a load
// reads at most 100 events and gets the same state as a full fold; a snapshot
// of another shape version is ignored rather than mis-decoded.
func TestSnapshotsBoundTheLoad(t *testing.T) {
	backends(t, func(t *testing.T, store eventstore.Store, snaps func() aggregate.SnapshotStore) {
		ctx := context.Background()
		counting := &countingStore{Store: store}
		snapshots := snaps()
		repo, _ := aggregate.NewRepository[Account](counting, aggregate.Config{
			Category: "account", Codec: registry(), Snapshots: snapshots, SnapshotEvery: 100,
		})
		a := repo.New("big")
		a.Open("ada")
		for i := 1; i < 10_050; i++ {
			a.Credit(1)
			if len(a.Pending()) == 250 || i == 10_049 { // saves of 250 cross a multiple of 100 each time
				if err := repo.Save(ctx, a); err != nil {
					t.Fatal(err)
				}
			}
		}
		if a.Version() != 10_050 {
			t.Fatalf("version %d", a.Version())
		}
		counting.read.Store(0)
		got, err := repo.Load(ctx, "big")
		if err != nil {
			t.Fatal(err)
		}
		if n := counting.read.Load(); n > 100 {
			t.Fatalf("load read %d events, want at most 100", n)
		}
		if got.Balance != 10_049 || got.Version() != 10_050 || got.Owner != "ada" {
			t.Fatalf("from snapshot: %+v at v%d", got, got.Version())
		}

		// The aggregate's shape changed: version-2 snapshots only. The stored
		// version-1 snapshot is ignored and the state is folded from events.
		repo2, _ := aggregate.NewRepository[Account](counting, aggregate.Config{
			Category: "account", Codec: registry(), Snapshots: snapshots, SnapshotVersion: 2,
		})
		counting.read.Store(0)
		full, err := repo2.Load(ctx, "big")
		if err != nil || full.Balance != got.Balance || full.Version() != 10_050 {
			t.Fatalf("full fold: %+v (%v)", full, err)
		}
		if n := counting.read.Load(); n != 10_050 {
			t.Fatalf("a load ignoring the old snapshot read %d events, want all 10,050", n)
		}

		// A snapshot that no longer decodes is ignored too.
		if err := snapshots.SaveSnapshot(ctx, aggregate.Snapshot{StreamID: "account-big", Version: 10_050, SchemaVersion: 1, Data: []byte("{not json")}); err != nil {
			t.Fatal(err)
		}
		if bad, err := repo.Load(ctx, "big"); err != nil || bad.Balance != 10_049 {
			t.Fatalf("with a corrupt snapshot: %+v (%v)", bad, err)
		}
	})
}

// CreditedV2 is Credited after a schema change: amounts in cents, with a
// currency. Version 1 events ({"Amount": 3} in whole units) are upcast.
type CreditedV2 struct {
	Cents    int
	Currency string
}

type AccountV2 struct {
	aggregate.Root
	Cents int
}

func (a *AccountV2) Apply(e any) {
	if e, ok := e.(CreditedV2); ok {
		a.Cents += e.Cents
	}
}

// TestOldEventsUpcastOnLoad: events stored by the old struct decode into the
// new one through the upcaster, against every backend.
func TestOldEventsUpcastOnLoad(t *testing.T) {
	backends(t, func(t *testing.T, store eventstore.Store, _ func() aggregate.SnapshotStore) {
		ctx := context.Background()
		// Written by the old code.
		old := registry()
		for i := range 3 {
			data, err := old.Encode(Credited{Amount: i + 1})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := store.Append(ctx, "account-7", eventstore.Exact(eventstore.Version(i)), []eventstore.EventData{data}); err != nil {
				t.Fatal(err)
			}
		}
		// Read by the new code.
		reg := codec.NewRegistry(nil)
		codec.MustRegister[CreditedV2](reg, "account.credited", 2)
		if err := reg.Upcast("account.credited", 1, func(b []byte) ([]byte, error) {
			var v1 struct{ Amount int }
			if err := codec.JSON.Unmarshal(b, &v1); err != nil {
				return nil, err
			}
			return codec.JSON.Marshal(CreditedV2{Cents: v1.Amount * 100, Currency: "EUR"})
		}); err != nil {
			t.Fatal(err)
		}
		repo, _ := aggregate.NewRepository[AccountV2](store, aggregate.Config{Category: "account", Codec: reg})
		a, err := repo.Load(ctx, "7")
		if err != nil || a.Cents != 600 {
			t.Fatalf("loaded %+v (%v), want 600 cents", a, err)
		}
	})
}

func TestGivenWhenThen(t *testing.T) {
	aggregatetest.Given(t, new(Account), Opened{Owner: "ada"}, Credited{Amount: 10}).
		When(func(a *Account) error { return a.Debit(4) }).
		Then(Debited{Amount: 4})
	aggregatetest.Given(t, new(Account), Opened{Owner: "ada"}).
		When(func(a *Account) error { return a.Debit(1) }).
		ThenError(ErrInsufficientFunds)
}

func TestGoldenHistoryStillDecodes(t *testing.T) {
	a := aggregatetest.ReplayGolden(t, registry(), "testdata/account-history-v1.json", new(Account))
	if a.Owner != "ada" || a.Balance != 75 || a.Version() != 4 {
		t.Fatalf("golden history folds to %+v at v%d", a, a.Version())
	}
}

func TestConfigIsValidated(t *testing.T) {
	_, err := aggregate.NewRepository[Account](nil, aggregate.Config{Category: "a-b", SnapshotEvery: -1})
	for _, want := range []string{"store", "Category", "Codec", "SnapshotEvery"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config error %v does not name %s", err, want)
		}
	}
}

// TestSaveIsSafeToRetry: the client lost the answer to a save that committed
// and saves the same aggregate again: nothing is stored twice.
func TestSaveIsSafeToRetry(t *testing.T) {
	backends(t, func(t *testing.T, store eventstore.Store, _ func() aggregate.SnapshotStore) {
		ctx := context.Background()
		repo, _ := aggregate.NewRepository[Account](store, aggregate.Config{Category: "account", Codec: registry()})
		a := repo.New("9")
		a.Open("ada")
		a.Credit(5)
		retry := *a // the same aggregate, as the caller still holds it after an unclear error
		if err := repo.Save(ctx, a); err != nil {
			t.Fatal(err)
		}
		if err := repo.Save(ctx, &retry); err != nil {
			t.Fatalf("retried save: %v", err)
		}
		if retry.Version() != 2 {
			t.Fatalf("retried save left version %d, want 2", retry.Version())
		}
		if evs, _ := eventstore.LoadStream(ctx, store, "account-9"); len(evs) != 2 {
			t.Fatalf("stream holds %d events after a retried save, want 2", len(evs))
		}
	})
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestSnapshotsOfAnotherTenantRefused: a repository over one tenant's events
// with another tenant's (or no tenant's) snapshots is a configuration error.
func TestSnapshotsOfAnotherTenantRefused(t *testing.T) {
	db := testdb.Open(t, "postgres")
	store, schema := pgStore(t, db)
	acme := must(store.ForTenant("acme"))
	defer acme.Close()
	snaps := must(pgsnapshot.New(db, schema))
	for _, s := range []*pgsnapshot.Store{snaps, must(snaps.ForTenant("globex"))} {
		if _, err := aggregate.NewRepository[Account](acme, aggregate.Config{Category: "account", Codec: registry(), Snapshots: s}); err == nil {
			t.Errorf("acme's events with tenant %q's snapshots were accepted", s.Tenant())
		}
	}
	if _, err := aggregate.NewRepository[Account](acme, aggregate.Config{Category: "account", Codec: registry(), Snapshots: must(snaps.ForTenant("acme"))}); err != nil {
		t.Errorf("acme's events with acme's snapshots: %v", err)
	}
}
