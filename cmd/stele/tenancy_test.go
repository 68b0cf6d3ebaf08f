package main

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/projection"
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
	for _, table := range []string{"events", "streams", "snapshots", "projection_checkpoints", "projection_dead_letters", "archived_events", "retired_streams", "orders"} {
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
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) { tenantFlag(t, driver) })
	}
}

func tenantFlag(t *testing.T, driver string) {
	c, store := newCLI(t, driver)
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

// TestDLQPerTenant: with --tenant, stele dlq lists, discards and retries that
// tenant's dead letters only; without it, tenant ”s.
func TestDLQPerTenant(t *testing.T) {
	c, store := newCLI(t, "postgres")
	db := store.DB()
	ids := map[string]int64{}
	for _, tenant := range []string{"", "acme", "globex"} {
		var id int64
		if err := db.QueryRowContext(context.Background(), `INSERT INTO "`+c.schema+`".projection_dead_letters
			(tenant_id, projection, stream_id, version, transaction_id, position, event_id, event_type, error, attempts)
			VALUES ($1, 'orders', 'order-'||$1, 1, '5', 1, gen_random_uuid(), 'placed', 'boom', 3) RETURNING id`, tenant).Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids[tenant] = id
	}
	for tenant := range ids {
		args := []string{"dlq", "ls"}
		if tenant != "" {
			args = append([]string{"--tenant", tenant}, args...)
		}
		out := c.mustRun(args...)
		if rows := fields(out); len(rows) != 2 || rows[1][2] != "order-"+tenant {
			t.Errorf("stele %s:\n%s\nwant only tenant %q's dead letter", strings.Join(args, " "), out, tenant)
		}
	}
	acmeID := strconv.FormatInt(ids["acme"], 10)
	for _, args := range [][]string{{"--tenant", "globex", "dlq", "discard", acmeID}, {"--tenant", "globex", "dlq", "retry", acmeID}, {"dlq", "discard", acmeID}} {
		if _, err := c.runErr(args...); !errors.Is(err, projection.ErrNoDeadLetter) {
			t.Errorf("stele %s: %v, want no such dead letter (it is acme's)", strings.Join(args, " "), err)
		}
	}
	c.mustRun("--tenant", "acme", "dlq", "discard", acmeID)
	var n int
	if err := db.GetContext(context.Background(), &n, `SELECT count(*) FROM "`+c.schema+`".projection_dead_letters`); err != nil || n != 2 {
		t.Errorf("%d dead letters left (%v), want the other two tenants'", n, err)
	}
}

// TestGovernanceCLIPerTenant: stele --tenant acme archive acts on acme's
// stream and leaves globex's stream of the same id as it was.
func TestGovernanceCLIPerTenant(t *testing.T) {
	c, store := newCLI(t, "postgres")
	for _, tenant := range []string{"acme", "globex"} {
		s, err := store.ForTenant(tenant)
		if err != nil {
			t.Fatal(err)
		}
		appendEvents(t, s, "order-1", "OrderPlaced", "OrderPaid")
		s.Close()
	}
	if out := c.mustRun("--tenant", "acme", "archive", "stream", "order-1", "--actor", "alice"); !strings.HasPrefix(out, "archived order-1: 2 events") {
		t.Errorf("archive printed %q", out)
	}
	assertRows(t, c.mustRun("--tenant", "acme", "archive", "ls"), [][]string{
		{"STREAM", "STATE", "VERSION", "EVENTS", "ARCHIVED_EVENTS", "RETIRED_AT"},
		{"order-1", "archived", "2", "0", "2"},
	})
	assertRows(t, c.mustRun("--tenant", "globex", "archive", "ls"), [][]string{
		{"STREAM", "STATE", "VERSION", "EVENTS", "ARCHIVED_EVENTS", "RETIRED_AT"},
	})
	assertRows(t, c.mustRun("--tenant", "globex", "streams", "ls"), [][]string{
		{"STREAM", "CATEGORY", "VERSION", "UPDATED_AT"},
		{"order-1", "order", "2"},
	})
	assertRows(t, c.mustRun("--tenant", "acme", "streams", "ls"), [][]string{
		{"STREAM", "CATEGORY", "VERSION", "UPDATED_AT"},
	})
}
