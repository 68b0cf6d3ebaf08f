package main

import (
	"context"
	"testing"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/projection"
)

// TestProjectionsStatusPerTenant: `stele --tenant acme projections status`
// shows acme's checkpoint of a projection name, not every tenant's.
func TestProjectionsStatusPerTenant(t *testing.T) {
	ctx := context.Background()
	c, root := newCLI(t, "postgres")
	db := testdb.Open(t, "postgres")
	for _, tenant := range []string{"acme", "globex"} {
		s, err := root.ForTenant(tenant)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		last := appendEvents(t, s, "order-1", "OrderPlaced").LastPosition
		if tenant == "globex" {
			last = appendEvents(t, s, "order-2", "OrderPlaced", "OrderPaid").LastPosition
		}
		r, err := projection.NewRunner(s, projection.HandlerFunc(func(context.Context, eventstore.Event) error { return nil }),
			projection.Config{Name: "orders", DB: db, Schema: c.schema})
		if err != nil {
			t.Fatal(err)
		}
		r.Start(ctx)
		wait.Until(t, tenant+" caught up", func() bool { st, err := r.Status(ctx); return err == nil && st.Position == last })
		r.Stop(ctx)
	}
	out := c.mustRun("--tenant", "acme", "projections", "status")
	if rows := fields(out); len(rows) != 2 {
		t.Errorf("stele --tenant acme projections status shows %d projection rows, want acme's one:\n%s", len(rows)-1, out)
	}
}
