// Package tenanttest sets up a schema with tenants for tests: row-level
// security on, an owner that is a plain role (so FORCE is what holds it to
// the policies), and an application role granted with AppRoleGrants.
// Superusers, which tests otherwise connect as, are never held to
// row-level security.
package tenanttest

import (
	"context"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// Tenancy is a migrated schema with its roles.
type Tenancy struct {
	Schema string
	Owner  *sqlx.DB       // the schema's owner, a plain role
	App    *sqlx.DB       // the application role
	Root   *pgstore.Store // a store of the application role, bound to no tenant
}

// New migrates a new schema as a new owner role and grants a new
// application role; row-level security is still off (see Enable). Extra
// statements run as the owner after the migration.
func New(t *testing.T, db *sqlx.DB, extra ...string) Tenancy {
	t.Helper()
	ctx := context.Background()
	schema := testdb.Schema(t, db)
	var dbname string
	if err := db.GetContext(ctx, &dbname, `SELECT current_database()`); err != nil {
		t.Fatal(err)
	}
	ownerRole := schema + "_owner"
	owner := testdb.Role(t, db, ownerRole, `GRANT CREATE ON DATABASE "`+dbname+`" TO "`+ownerRole+`"`)
	t.Cleanup(func() { testdb.ExecShared(t, db, `REVOKE CREATE ON DATABASE "`+dbname+`" FROM "`+ownerRole+`"`) })
	if _, err := pgstore.Migrate(ctx, owner, schema); err != nil {
		t.Fatal(err)
	}
	testdb.Exec(t, owner, extra...)
	role := schema + "_app"
	grants, err := pgstore.AppRoleGrants(schema, role)
	if err != nil {
		t.Fatal(err)
	}
	app := testdb.Role(t, db, role)
	testdb.Exec(t, owner, grants...)
	root, err := pgstore.New(app, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = root.Close() })
	return Tenancy{Schema: schema, Owner: owner, App: app, Root: root}
}

// AppRole is the application role's name.
func (tn Tenancy) AppRole() string { return tn.Schema + "_app" }

// Enable turns row-level security on (pgstore.EnableTenancy), on the stele
// tables and the extra tables given.
func (tn Tenancy) Enable(t *testing.T, extra ...string) {
	t.Helper()
	if err := pgstore.EnableTenancy(context.Background(), tn.Owner, tn.Schema, "test", extra...); err != nil {
		t.Fatalf("EnableTenancy: %v", err)
	}
}

// Tenant returns Root bound to id, closed when the test ends.
func (tn Tenancy) Tenant(t *testing.T, id string) *pgstore.Store {
	t.Helper()
	s, err := tn.Root.ForTenant(id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// OwnerAs returns a pool of the owner role whose connections act as tenant
// (pgstore.OpenForTenant): for governance as that tenant.
func (tn Tenancy) OwnerAs(t *testing.T, tenant string) *sqlx.DB {
	t.Helper()
	db, err := pgstore.OpenForTenant(tn.Owner.DriverName(), testdb.DSNAs(t, tn.Schema+"_owner"), tenant)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}
