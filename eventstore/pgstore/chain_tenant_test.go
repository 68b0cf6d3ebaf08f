package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/tenanttest"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestSealPagesUnderALinguisticCollation: Seal pages through streams
// by (tenant, stream id) in the columns' collation and digests spans in
// byte order. With the columns under an ICU collation (as in a database
// created with a linguistic default), mixed-case and non-ASCII ids in
// several tenants, across more than two batches, are each sealed once, and
// verify finds every seal's digest (byte order, COLLATE "C") intact.
func TestSealPagesUnderALinguisticCollation(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	s := newStore(t, db, pgstore.Config{})
	schema := s.Schema()
	q := `"` + schema + `"`
	var stmts []string
	for _, table := range []string{"streams", "events", "archived_events", "retired_streams", "event_hashes", "chain_heads"} {
		for _, col := range []string{"tenant_id", "stream_id"} {
			stmts = append(stmts, `ALTER TABLE `+q+`.`+table+` ALTER COLUMN `+col+` TYPE text COLLATE "en-US-x-icu"`)
		}
	}
	testdb.Exec(t, db, stmts...)

	prefixes := []string{"a", "A", "b", "B", "é", "É", "e", "E", "z", "Z", "ß", "ss", "ä", "Ä", "_", "ǆ", "Ǆ", "ö", "o", "O", "日本"}
	tenants := []string{"", "Acme", "acme", "b"}
	total := 0
	for _, tn := range tenants {
		st := s
		if tn != "" {
			var err error
			if st, err = s.ForTenant(tn); err != nil {
				t.Fatal(err)
			}
			defer st.Close()
		}
		for _, p := range prefixes {
			for i := range 15 {
				if _, err := st.Append(ctx, fmt.Sprintf("%s-%d", p, i), eventstore.Any,
					[]eventstore.EventData{{Type: "x", Data: []byte(`{}`)}}); err != nil {
					t.Fatal(err)
				}
				total++
			}
		}
	}
	res, err := pgstore.Seal(ctx, db, schema)
	if err != nil {
		t.Fatal(err)
	}
	if res.Events != int64(total) || res.Seals != (total+499)/500 || len(res.Skipped) > 0 {
		t.Errorf("sealed %+v, want %d events in %d seals", res, total, (total+499)/500)
	}
	var hashed, dup int
	if err := db.Get(&hashed, `SELECT count(*) FROM `+q+`.event_hashes`); err != nil || hashed != total {
		t.Errorf("%d hashes (%v), want %d", hashed, err, total)
	}
	if err := db.Get(&dup, `SELECT count(*) FROM (SELECT 1 FROM `+q+`.event_hashes GROUP BY tenant_id COLLATE "C", stream_id COLLATE "C" HAVING count(*) > 1) x`); err != nil || dup != 0 {
		t.Errorf("%d streams hashed twice (%v)", dup, err)
	}
	r, err := pgstore.VerifyHistory(ctx, db, schema, pgstore.VerifyOpts{Digest: res.Digest})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Problems) > 0 || r.UnsealedEvents != 0 || r.SealedEvents != int64(total) {
		t.Errorf("verify: %d problems %v, %d sealed, %d unsealed", len(r.Problems), r.Problems, r.SealedEvents, r.UnsealedEvents)
	}
}

// TestSealNeedsEveryTenantOfEveryTable: Seal and Verify read
// streams and retired_streams as well as the events: a role that row-level
// security holds on those (here, FORCE left on streams and retired_streams
// only) would seal nothing without saying so, and verify would call every
// event "out of chain". It gets ErrNeedsEveryTenant instead.
func TestSealNeedsEveryTenantOfEveryTable(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	tn := tenanttest.New(t, db)
	tn.Enable(t)
	acme := tn.Tenant(t, "acme")
	if _, err := acme.Append(ctx, "order-1", eventstore.Any, []eventstore.EventData{{Type: "placed", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	q := `"` + tn.Schema + `"`
	testdb.Exec(t, tn.Owner, `ALTER TABLE `+q+`.events NO FORCE ROW LEVEL SECURITY`,
		`ALTER TABLE `+q+`.archived_events NO FORCE ROW LEVEL SECURITY`)
	if _, err := pgstore.Seal(ctx, tn.Owner, tn.Schema); !errors.Is(err, pgstore.ErrNeedsEveryTenant) {
		t.Errorf("seal as the owner, held to row-level security on streams: %v, want ErrNeedsEveryTenant", err)
	}
	if _, err := pgstore.Verify(ctx, tn.Owner, tn.Schema); !errors.Is(err, pgstore.ErrNeedsEveryTenant) {
		t.Errorf("verify as the owner, held to row-level security on streams: %v, want ErrNeedsEveryTenant", err)
	}
}
