package projection_test

import (
	"context"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/tenanttest"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/projection"
)

// TestTenantProjections: one projection name run for two tenants, as the
// application role with row-level security on. Each runner reads only its
// tenant's feed, writes read-model rows and a checkpoint that carry its
// tenant, and a restarted runner resumes from its own tenant's checkpoint.
func TestTenantProjections(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	tn := tenanttest.New(t, db)
	q := `"` + tn.Schema + `"`
	col, err := pgstore.TenantColumnSQL(tn.Schema, "totals")
	if err != nil {
		t.Fatal(err)
	}
	testdb.Exec(t, tn.Owner, `CREATE TABLE `+q+`.totals (stream_id text NOT NULL, events int NOT NULL)`, col,
		`ALTER TABLE `+q+`.totals ADD PRIMARY KEY (tenant_id, stream_id)`,
		`GRANT SELECT, INSERT, UPDATE ON `+q+`.totals TO "`+tn.AppRole()+`"`)
	tn.Enable(t, "totals")

	count := projection.TxHandlerFunc(func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.totals (stream_id, events) VALUES ($1, 1)
			ON CONFLICT (tenant_id, stream_id) DO UPDATE SET events = totals.events + 1`, e.StreamID)
		return err
	})
	last := map[string]eventstore.Position{} // per tenant, its last appended event
	run := func(store *pgstore.Store) {
		t.Helper()
		r, err := projection.NewRunner(store, count, projection.Config{Name: "totals", DB: tn.App, Schema: tn.Schema, BatchSize: 7})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Start(ctx); err != nil {
			t.Fatal(err)
		}
		defer r.Stop(ctx)
		head := last[store.Tenant()]
		wait.Until(t, store.Tenant()+"'s projection at its last event", func() bool {
			st, err := r.Status(ctx)
			return err == nil && st.State == projection.StateRunning && st.Position == head
		})
		st, err := r.Status(ctx)
		if err != nil || st.LagEvents != 0 {
			t.Fatalf("%s: status %+v (%v)", store.Tenant(), st, err)
		}
	}
	acme, globex := tn.Tenant(t, "acme"), tn.Tenant(t, "globex")
	appendTo := func(s *pgstore.Store, n int) {
		for i := range n {
			res, err := s.Append(ctx, "order-"+string(rune('a'+i%3)), eventstore.Any, []eventstore.EventData{{Type: "counted", Data: []byte(`{}`)}})
			if err != nil {
				t.Fatal(err)
			}
			last[s.Tenant()] = res.LastPosition
		}
	}
	appendTo(acme, 20)
	appendTo(globex, 9)
	run(acme)
	run(globex)
	// More for acme only; a restarted acme runner handles just those.
	appendTo(acme, 10)
	run(acme)
	run(globex)

	read := func(tenant string) (events int, checkpoints int) {
		tx, err := tn.App.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		if err := pgstore.SetTenant(ctx, tx, tenant); err != nil {
			t.Fatal(err)
		}
		if err := tx.GetContext(ctx, &events, `SELECT coalesce(sum(events), 0) FROM `+q+`.totals`); err != nil {
			t.Fatal(err)
		}
		if err := tx.GetContext(ctx, &checkpoints, `SELECT count(*) FROM `+q+`.projection_checkpoints WHERE name = 'totals'`); err != nil {
			t.Fatal(err)
		}
		return
	}
	for tenant, want := range map[string]int{"acme": 30, "globex": 9} {
		events, cps := read(tenant)
		if events != want || cps != 1 {
			t.Errorf("%s: read model counts %d events and %d checkpoints of totals, want %d and 1 (each event once, only its own)", tenant, events, cps, want)
		}
	}
	var n int
	if err := tn.App.GetContext(ctx, &n, `SELECT count(*) FROM `+q+`.projection_checkpoints`); err != nil || n != 0 {
		t.Errorf("no tenant set: %d checkpoints visible (%v), want 0", n, err)
	}
	if _, err := projection.NewRunner(acme, count, projection.Config{Name: "totals", DB: tn.App, Schema: tn.Schema, Tenant: "globex"}); err == nil {
		t.Error("a runner over acme's store with Config.Tenant globex was accepted")
	}
}
