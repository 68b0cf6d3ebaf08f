package projection_test

import (
	"context"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/projection"
)

// TestConfigTenantMustMatchTheStore: the feed comes from the store, so a
// runner's Config.Tenant must be the store's tenant.
func TestConfigTenantMustMatchTheStore(t *testing.T) {
	db := testdb.Open(t, "postgres")
	root, schema := pgSetup(t, db)
	acme, err := root.ForTenant("acme")
	if err != nil {
		t.Fatal(err)
	}
	defer acme.Close()
	h := projection.HandlerFunc(func(context.Context, eventstore.Event) error { return nil })
	if _, err := projection.NewRunner(root, h, projection.Config{Name: "p", DB: db, Schema: schema, Tenant: "acme"}); err == nil {
		t.Error("a runner with Config.Tenant acme over a store bound to no tenant was accepted: it would file tenant ''s feed under acme")
	}
	if _, err := projection.NewRunner(acme, h, projection.Config{Name: "p", DB: db, Schema: schema, Tenant: "acme"}); err != nil {
		t.Errorf("Config.Tenant matching the store's: %v", err)
	}
}

// TestRebuildRefusesATenantsUsedSlot: Rebuild refuses a slot used before,
// looking for the slot's checkpoint in the runner's tenant.
func TestRebuildRefusesATenantsUsedSlot(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	root, schema := pgSetup(t, db)
	testdb.Exec(t, db, `CREATE TABLE "`+schema+`".totals_a (stream_id text PRIMARY KEY, events int NOT NULL, sum bigint NOT NULL)`)
	acme, err := root.ForTenant("acme")
	if err != nil {
		t.Fatal(err)
	}
	defer acme.Close()
	head := appendN(t, acme, "s", 3)
	// Slot a of totals was built for acme before: it has a checkpoint.
	h, _ := slotted(schema)("a")
	r, err := projection.NewRunner(acme, h, projection.Config{Name: projection.SlotName("totals", "a"), DB: db, Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	r.Start(ctx)
	wait.Until(t, "slot a at head", func() bool { st, err := r.Status(ctx); return err == nil && st.Position == head })
	r.Stop(ctx)

	cfg := projection.RebuildConfig{
		Config:  projection.Config{Name: "totals", DB: db, Schema: schema},
		Handler: slotted(schema),
		Switch:  func(ctx context.Context, tx *sqlx.Tx, slot string) error { return nil },
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rr, err := projection.Rebuild(rctx, acme, cfg, "a")
	if err == nil {
		rr.Stop(ctx)
		t.Error("Rebuild into acme's used slot a was accepted (the used-slot check read tenant '' instead of acme)")
	}
}
