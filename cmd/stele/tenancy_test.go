package main

import (
	"context"
	"strings"
	"testing"

	"github.com/stele-dev/stele/internal/testdb"
)

// TestTenancyEnableCLI: stele tenancy enable turns on FORCEd row-level
// security on the stele tables and the read models named, records who did it,
// and refuses a table name that is not a plain identifier.
func TestTenancyEnableCLI(t *testing.T) {
	c, store := newCLI(t, "postgres")
	db := store.DB()
	testdb.Exec(t, db, `CREATE TABLE "`+c.schema+`".orders (id text, tenant_id text NOT NULL DEFAULT '')`)
	if _, err := c.runErr("tenancy", "enable", "--actor", "alice", "--table", `orders"; DROP TABLE x; --`); err == nil {
		t.Error("a table name with SQL in it was accepted")
	}
	out := c.mustRun("tenancy", "enable", "--actor", "alice", "--table", "orders")
	if !strings.HasPrefix(out, "row-level security is on in "+c.schema) {
		t.Errorf("printed %q", out)
	}
	c.mustRun("tenancy", "enable", "--actor", "alice", "--table", "orders") // again: no change, no error
	for _, table := range []string{"events", "streams", "snapshots", "projection_checkpoints", "projection_dead_letters", "orders"} {
		var on, forced bool
		if err := db.QueryRowContext(context.Background(), `SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = $1::regclass`,
			`"`+c.schema+`".`+table).Scan(&on, &forced); err != nil {
			t.Fatal(err)
		}
		if !on || !forced {
			t.Errorf("%s: row-level security on=%v forced=%v, want both", table, on, forced)
		}
	}
	if out := c.mustRun("audit"); strings.Count(out, "enable-tenancy") != 2 || !strings.Contains(out, "alice") {
		t.Errorf("the audit trail does not show alice enabling tenancy twice:\n%s", out)
	}
}

// TestTenantFlag: --tenant makes the read commands show that tenant's streams.
func TestTenantFlag(t *testing.T) {
	c, store := newCLI(t, "postgres")
	for _, tenant := range []string{"acme", "globex"} {
		s, err := store.ForTenant(tenant)
		if err != nil {
			t.Fatal(err)
		}
		appendEvents(t, s, "order-"+tenant, "OrderPlaced")
		s.Close()
	}
	appendEvents(t, store, "order-none", "OrderPlaced")
	for tenant, want := range map[string]string{"acme": "order-acme", "globex": "order-globex", "": "order-none"} {
		args := []string{"streams", "ls"}
		if tenant != "" {
			args = append([]string{"--tenant", tenant}, args...)
		}
		assertRows(t, c.mustRun(args...), [][]string{
			{"STREAM", "CATEGORY", "VERSION", "UPDATED_AT"},
			{want, "order", "1"},
		})
	}
	if _, err := c.runErr("--tenant", "bad tenant", "streams", "ls"); err == nil {
		t.Error("--tenant 'bad tenant' was accepted")
	}
}
