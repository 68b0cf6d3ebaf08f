package pgstore_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/tenanttest"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestHashChainCoversEveryTenant: with row-level security on, two tenants
// write streams of the same ids. One seal, by a role that bypasses
// row-level security, chains both; verify names the tenant of a changed
// event and catches an event moved from one tenant to another; a tenant's
// tombstone completes that tenant's chain only. The owner, held to
// row-level security, cannot seal or verify a chain it cannot wholly see.
func TestHashChainCoversEveryTenant(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres") // a superuser: not held to row-level security
	tn := tenanttest.New(t, db)
	tn.Enable(t)
	acme, globex := tn.Tenant(t, "acme"), tn.Tenant(t, "globex")
	for _, w := range []struct {
		s      *pgstore.Store
		stream string
		n      int
	}{{acme, "order-1", 3}, {acme, "order-2", 2}, {globex, "order-1", 3}} {
		evs := make([]eventstore.EventData, w.n)
		for i := range evs {
			evs[i] = eventstore.EventData{Type: "placed", Data: []byte(`{"tenant":"` + w.s.Tenant() + `"}`)}
		}
		if _, err := w.s.Append(ctx, w.stream, eventstore.Any, evs); err != nil {
			t.Fatal(err)
		}
	}

	for _, op := range []func() error{
		func() error { _, err := pgstore.Seal(ctx, tn.Owner, tn.Schema); return err },
		func() error { _, err := pgstore.Verify(ctx, tn.Owner, tn.Schema); return err },
	} {
		if err := op(); !errors.Is(err, pgstore.ErrNeedsEveryTenant) {
			t.Errorf("as the owner, held to row-level security: %v, want ErrNeedsEveryTenant", err)
		}
	}
	res, err := pgstore.Seal(ctx, db, tn.Schema)
	if err != nil {
		t.Fatal(err)
	}
	if res.Events != 8 {
		t.Errorf("sealed %d events, want both tenants' 8", res.Events)
	}
	noProblems(t, db, tn.Schema)

	for _, c := range []struct {
		name, do string
		want     []string
	}{
		{"globex's event changed",
			`UPDATE {{schema}}.events SET data = '{"n": 999}' WHERE tenant_id = 'globex' AND stream_id = 'order-1' AND version = 2`,
			[]string{"changed globex:order-1 v2"}},
		{"acme's event moved to globex",
			`UPDATE {{schema}}.events SET tenant_id = 'globex' WHERE tenant_id = 'acme' AND stream_id = 'order-2' AND version = 2`,
			[]string{"deleted acme:order-2 v2", "out-of-chain globex:order-2 v2"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			snapshot := snapshotSchema(t, db, tn.Schema)
			tamper(t, db, tn.Schema, "events", "events_immutable", c.do)
			problems, err := pgstore.Verify(ctx, db, tn.Schema)
			if err != nil {
				t.Fatal(err)
			}
			if got := kinds(problems); !slices.Equal(got, c.want) {
				t.Errorf("verify found %q, want %q", got, c.want)
			}
			for _, p := range problems {
				if !strings.Contains(p.String(), "of tenant "+`"`+p.Tenant+`"`) {
					t.Errorf("problem %q does not name its tenant", p)
				}
			}
			restoreSchema(t, db, tn.Schema, snapshot)
			noProblems(t, db, tn.Schema)
		})
	}

	// globex tombstones its order-1 after one more event: its chain is
	// completed first; acme's order-1 keeps its own.
	if _, err := globex.Append(ctx, "order-1", eventstore.Exact(3), []eventstore.EventData{{Type: "late", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := pgstore.TombstoneStream(ctx, tn.OwnerAs(t, "globex"), tn.Schema, "alice", "order-1"); err != nil {
		t.Fatal(err)
	}
	for tenant, want := range map[string]int{"globex": 4, "acme": 3} {
		var hashed int
		if err := db.GetContext(ctx, &hashed, `SELECT count(*) FROM "`+tn.Schema+`".event_hashes WHERE tenant_id = $1 AND stream_id = 'order-1'`, tenant); err != nil || hashed != want {
			t.Errorf("%s's order-1 has %d hashes (%v), want %d", tenant, hashed, err, want)
		}
	}
	noProblems(t, db, tn.Schema)
	if evs, err := acme.ReadStream(ctx, "order-1", eventstore.ReadStreamOpts{}); err != nil || len(evs) != 3 {
		t.Errorf("acme's order-1 reads %d events (%v) after globex's tombstone, want 3", len(evs), err)
	}
}
