package pgstore_test

import (
	"context"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/eventstoretest"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

func TestMain(m *testing.M) {
	testdb.VerifyMain(m)
}

// newStore migrates a schema of the test's own and returns a store on it.
func newStore(t *testing.T, db *sqlx.DB, cfg pgstore.Config) *pgstore.Store {
	t.Helper()
	cfg.Schema = testdb.Schema(t, db)
	if _, err := pgstore.Migrate(context.Background(), db, cfg.Schema); err != nil {
		t.Fatal(err)
	}
	s, err := pgstore.New(db, &cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// TestConformance runs the suite through lib/pq and pgx, with group commit
// on and off.
func TestConformance(t *testing.T) {
	for _, driver := range testdb.Drivers {
		for _, gc := range []struct {
			name string
			off  bool
		}{{"GroupCommit", false}, {"NoGroupCommit", true}} {
			t.Run(driver+"/"+gc.name, func(t *testing.T) {
				db := testdb.Open(t, driver)
				eventstoretest.Run(t, eventstoretest.Backend{
					NewStore: func(t *testing.T) eventstore.Store {
						return newStore(t, db, pgstore.Config{DisableGroupCommit: gc.off})
					},
					Begin: func(t *testing.T, s eventstore.Store) eventstoretest.Tx {
						tx, err := db.Beginx()
						if err != nil {
							t.Fatal(err)
						}
						return pgTx{tx, s.(*pgstore.Store)}
					},
				})
			})
		}
	}
}

type pgTx struct {
	*sqlx.Tx
	s *pgstore.Store
}

func (tx pgTx) Append(ctx context.Context, stream string, exp eventstore.ExpectedVersion, evs []eventstore.EventData) (eventstore.AppendResult, error) {
	return tx.s.AppendTx(ctx, tx.Tx, stream, exp, evs)
}

func BenchmarkStore(b *testing.B) {
	for _, driver := range testdb.Drivers {
		b.Run(driver, func(b *testing.B) {
			db := testdb.Open(b, driver)
			eventstoretest.Bench(b, func(b *testing.B) eventstore.Store {
				schema := testdb.Schema(b, db)
				if _, err := pgstore.Migrate(context.Background(), db, schema); err != nil {
					b.Fatal(err)
				}
				s, err := pgstore.New(db, &pgstore.Config{Schema: schema})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = s.Close() })
				return s
			})
		})
	}
}
