package outbox_test

import (
	"context"
	"testing"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/tenanttest"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/outbox"
)

// TestRelayPerTenant: a relay over a tenant's store, as the application
// role with row-level security on, publishes that tenant's events and no
// other's, and its checkpoint ends at that tenant's last event.
func TestRelayPerTenant(t *testing.T) {
	ctx := context.Background()
	tn := tenanttest.New(t, testdb.Open(t, "postgres"))
	tn.Enable(t)
	want := map[string]map[string]bool{}
	for _, tenant := range []string{"acme", "globex"} {
		s := tn.Tenant(t, tenant)
		want[tenant] = map[string]bool{}
		for range 5 + len(tenant) {
			res, err := s.Append(ctx, "order-1", eventstore.Any, []eventstore.EventData{{Type: "placed", Data: []byte(`{}`)}})
			if err != nil {
				t.Fatal(err)
			}
			evs, _ := s.ReadStream(ctx, "order-1", eventstore.ReadStreamOpts{From: res.LastVersion, Limit: 1})
			want[tenant][evs[0].ID.String()] = true
		}
	}
	for _, tenant := range []string{"acme", "globex"} {
		pubsub := newGoChannel(t)
		c := collect(t, pubsub, outbox.DefaultTopic)
		r, err := outbox.NewRelay(tn.Tenant(t, tenant), outbox.Config{Name: "public." + tenant, Publisher: pubsub, DB: tn.App, Schema: tn.Schema})
		if err != nil {
			t.Fatal(err)
		}
		runRelay(t, r)
		wait.Until(t, tenant+"'s events published", func() bool { return c.unique() >= len(want[tenant]) })
		wait.Until(t, tenant+"'s relay checkpoint at its last event", func() bool {
			st, err := r.Status(ctx)
			return err == nil && st.Backlog == 0 && st.Published == int64(len(want[tenant]))
		})
		for _, d := range c.deliveries() {
			if !want[tenant][d.UUID] {
				t.Errorf("%s's relay published %s, which is not one of %s's events", tenant, d.UUID, tenant)
			}
		}
	}
}
