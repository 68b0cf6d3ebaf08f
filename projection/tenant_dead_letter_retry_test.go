package projection_test

import (
	"context"
	"testing"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/eventstoretest"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/projection"
)

// TestRetryDeadLetterOfATenantStore: RetryDeadLetter with a store bound to
// tenant acme retries acme's dead letter (the dead letter by id is the
// tenant's), writes the handler's rows as acme, and removes it; it never
// reaches the empty tenant's dead letter of the same projection.
func TestRetryDeadLetterOfATenantStore(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	root, schema := pgSetup(t, db)
	acme, err := root.ForTenant("acme")
	if err != nil {
		t.Fatal(err)
	}
	defer acme.Close()
	ids := map[string]int64{}
	for tenant, s := range map[string]eventstore.Store{"": root, "acme": acme} {
		if _, err := s.Append(ctx, "acct-1", eventstore.NoStream, eventstoretest.Evs("deposited", 1)); err != nil {
			t.Fatal(err)
		}
		evs, err := s.ReadStream(ctx, "acct-1", eventstore.ReadStreamOpts{From: 1, Limit: 1})
		if err != nil || len(evs) != 1 {
			t.Fatal(evs, err)
		}
		var id int64
		if err := db.GetContext(ctx, &id, `INSERT INTO "`+schema+`".projection_dead_letters
			(tenant_id, projection, stream_id, version, transaction_id, position, event_id, event_type, error, attempts)
			VALUES ($1, 'totals', 'acct-1', 1, '5', 1, $2, 'deposited', 'boom', 3) RETURNING id`, tenant, evs[0].ID.String()); err != nil {
			t.Fatal(err)
		}
		ids[tenant] = id
	}
	h := totals(schema, func(eventstore.Event) error { return nil })
	if err := projection.RetryDeadLetter(ctx, acme, db, schema, ids[""], h); err == nil {
		t.Error("retrying tenant ''s dead letter through acme's store succeeded")
	}
	if err := projection.RetryDeadLetter(ctx, acme, db, schema, ids["acme"], h); err != nil {
		t.Fatalf("retrying acme's dead letter through acme's store: %v", err)
	}
	var left []string
	if err := db.SelectContext(ctx, &left, `SELECT tenant_id FROM "`+schema+`".projection_dead_letters ORDER BY id`); err != nil {
		t.Fatal(err)
	}
	if len(left) != 1 || left[0] != "" {
		t.Errorf("dead letters left of tenants %q, want tenant ''s only", left)
	}
}
