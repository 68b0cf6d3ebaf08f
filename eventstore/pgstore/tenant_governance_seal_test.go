package pgstore_test

import (
	"context"
	"testing"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/eventstoretest"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestTombstoneOnSealedSchemaStaysInItsTenant: a schema sealed while it had
// one tenant, then shared with tenant acme (no row-level security). acme and
// the empty tenant each have a stream order-1; acme's is archived, the empty
// tenant's has one event past its seal. Tombstoning either tenant's order-1
// completes that tenant's own chain only (never with the other's events),
// and the whole history still verifies.
func TestTombstoneOnSealedSchemaStaysInItsTenant(t *testing.T) {
	for _, who := range []string{"acme", ""} {
		t.Run("as tenant "+who, func(t *testing.T) {
			ctx := context.Background()
			db := testdb.Open(t, "postgres")
			s := newStore(t, db, pgstore.Config{})
			if _, err := s.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("base", 2)); err != nil {
				t.Fatal(err)
			}
			if _, err := pgstore.Seal(ctx, db, s.Schema()); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Append(ctx, "order-1", eventstore.Exact(2), eventstoretest.Evs("late", 1)); err != nil {
				t.Fatal(err)
			}
			acme, err := s.ForTenant("acme")
			if err != nil {
				t.Fatal(err)
			}
			defer acme.Close()
			if _, err := acme.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("acme", 3)); err != nil {
				t.Fatal(err)
			}
			acmeGov, err := pgstore.OpenForTenant("postgres", testdb.DSN(), "acme")
			if err != nil {
				t.Fatal(err)
			}
			defer acmeGov.Close()
			if _, err := pgstore.ArchiveStream(ctx, acmeGov, s.Schema(), "alice", "order-1"); err != nil {
				t.Fatal(err)
			}
			gov := db
			if who == "acme" {
				gov = acmeGov
			}
			res, err := pgstore.TombstoneStream(ctx, gov, s.Schema(), "alice", "order-1")
			if err != nil {
				t.Fatalf("tombstone tenant %q's order-1: %v", who, err)
			}
			if who == "acme" && res.ArchivedEvents != 3 || who == "" && res.Events != 3 {
				t.Errorf("tombstone tenant %q's order-1: %+v", who, res)
			}
			// Each tenant's order-1 has its own chain; the tombstone
			// completed the one of the tenant that tombstoned.
			for tenant, want := range map[string]map[string]int{"acme": {"acme": 3, "": 2}, "": {"acme": 0, "": 3}}[who] {
				var hashed int
				if err := db.GetContext(ctx, &hashed, `SELECT count(*) FROM "`+s.Schema()+`".event_hashes WHERE tenant_id = $1 AND stream_id = 'order-1'`, tenant); err != nil {
					t.Fatal(err)
				}
				if hashed != want {
					t.Errorf("tombstone as tenant %q: tenant %q's order-1 has %d hashes, want %d", who, tenant, hashed, want)
				}
			}
			noProblems(t, db, s.Schema())
		})
	}
}
