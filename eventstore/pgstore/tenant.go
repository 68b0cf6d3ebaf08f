package pgstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"regexp"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
)

// Tenancy. Every stream, event, snapshot, projection checkpoint and
// projection dead letter carries a tenant id; the store New returns is
// bound to none (tenant ""), and ForTenant returns one bound to a tenant.
// Every statement a bound store runs sets stele.tenant first, for its own
// transaction (set_config(..., true), SET LOCAL semantics), and names the
// tenant in its WHERE clause. EnableTenancy turns on row-level security,
// so PostgreSQL itself, not only this package, keeps tenants apart.

// TenantSetting is the PostgreSQL setting that holds the tenant of the
// current transaction. Row-level security policies compare each row's
// tenant_id with it; inserts take their tenant_id from it.
const TenantSetting = "stele.tenant"

// tenantRE: tenant ids are short, printable and free of anything SQL or a
// log line would treat specially. They are always passed as parameters.
var tenantRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$`)

// TenantError reports a tenant id that is not valid. Nothing was written.
type TenantError struct {
	Tenant string
}

func (e *TenantError) Error() string {
	return fmt.Sprintf("pgstore: tenant %q: want 1-63 of [A-Za-z0-9_.@-], starting with a letter or digit", e.Tenant)
}

// ValidateTenant checks a tenant id.
func ValidateTenant(tenant string) error {
	if !tenantRE.MatchString(tenant) {
		return &TenantError{Tenant: tenant}
	}
	return nil
}

// ForTenant returns a store bound to tenant: it reads and appends only that
// tenant's streams, and its appends are group-committed apart from other
// tenants' (one transaction, one SET LOCAL, per group). It shares the
// database and prepared statements with s; close it when done (it does not
// close s). With row-level security on (EnableTenancy), PostgreSQL refuses
// it any other tenant's rows.
func (s *Store) ForTenant(tenant string) (*Store, error) {
	if err := ValidateTenant(tenant); err != nil {
		return nil, err
	}
	t := &Store{db: s.db, cfg: s.cfg, schema: s.schema, wake: s.wake, stmts: s.stmts, tenant: tenant, child: true}
	if !s.cfg.DisableGroupCommit {
		t.commit = newCommitter(t)
	}
	return t, nil
}

// Tenant returns the tenant the store is bound to, "" for none.
func (s *Store) Tenant() string { return s.tenant }

// SetTenant sets the tenant of tx (SET LOCAL semantics: until tx ends). Use
// it in a transaction that writes a read model, or that calls AppendTx on a
// bound store's behalf, so its rows take the tenant and row-level security
// lets it see that tenant's rows.
func SetTenant(ctx context.Context, tx interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}, tenant string) error {
	if err := ValidateTenant(tenant); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `SELECT set_config('`+TenantSetting+`', $1, true)`, tenant); err != nil {
		return fmt.Errorf("pgstore: setting tenant %q: %w", tenant, err)
	}
	return nil
}

// pool runs statements on the database directly, where a Tx is expected.
type pool struct{ *sqlx.DB }

func (pool) StmtContext(_ context.Context, st *sql.Stmt) *sql.Stmt { return st }

// tenantTables are the stele tables that carry a tenant_id column.
var tenantTables = []string{"streams", "events", "snapshots", "projection_checkpoints", "projection_dead_letters",
	"archived_events", "retired_streams"}

// ErrNeedsEveryTenant is returned by Seal and VerifyHistory when row-level
// security (EnableTenancy) hides some tenants' rows from the role: the hash
// chain covers every tenant, so they run as a superuser or a role with
// BYPASSRLS, like a backup does.
var ErrNeedsEveryTenant = errors.New("pgstore: seal and verify read every tenant's events, and row-level security hides some of them from this role: run them as a superuser or a role with BYPASSRLS")

// EnableTenancy turns on row-level security, FORCEd so that the tables'
// owner is held to it as well, on every stele table that carries a tenant
// and on the extra tables given (read models: each needs a tenant_id text
// column; see TenantColumnSQL). A row is then visible and writable only in a
// transaction whose stele.tenant equals its tenant_id; a transaction that
// set no tenant sees and writes nothing. Superusers and roles with
// BYPASSRLS are not held to it: run the application as a plain role
// (AppRoleGrants). It is an audited admin action, and idempotent.
func EnableTenancy(ctx context.Context, db *sqlx.DB, schema, actor string, extraTables ...string) error {
	if err := ValidateSchema(schema); err != nil {
		return err
	}
	tables := make([]string, 0, len(tenantTables)+len(extraTables))
	for _, t := range tenantTables {
		tables = append(tables, quoteIdent(schema)+"."+quoteIdent(t))
	}
	for _, t := range extraTables {
		q, err := qualifiedTable(schema, t)
		if err != nil {
			return err
		}
		tables = append(tables, q)
	}
	_, err := Admin(ctx, db, schema, AdminAction{Actor: actor, Action: "enable-tenancy", Detail: map[string]any{"tables": tables}},
		func(tx *sqlx.Tx) error {
			for _, t := range tables {
				for _, stmt := range tenancySQL(t) {
					if _, err := tx.ExecContext(ctx, stmt); err != nil {
						return fmt.Errorf("%s: %w", t, err)
					}
				}
			}
			return nil
		})
	return err
}

// tenancySQL turns row-level security on for table (quoted, qualified).
// The setting is read in a sub-select, so PostgreSQL evaluates it once per
// statement rather than once per row. An empty tenant matches nothing: a
// session whose SET LOCAL ended reads the setting as "" rather than NULL.
func tenancySQL(table string) []string {
	cond := `tenant_id = (SELECT current_setting('` + TenantSetting + `', true)) AND tenant_id <> ''`
	return []string{
		`ALTER TABLE ` + table + ` ENABLE ROW LEVEL SECURITY`,
		`ALTER TABLE ` + table + ` FORCE ROW LEVEL SECURITY`,
		`DROP POLICY IF EXISTS stele_tenant ON ` + table,
		`CREATE POLICY stele_tenant ON ` + table + ` USING (` + cond + `) WITH CHECK (` + cond + `)`,
	}
}

// TenantColumnSQL returns the statement that gives a read-model table the
// tenant_id column EnableTenancy expects: filled from the transaction's
// tenant, so a projection's TxHandler writes it without naming it.
func TenantColumnSQL(schema, table string) (string, error) {
	q, err := qualifiedTable(schema, table)
	if err != nil {
		return "", err
	}
	return `ALTER TABLE ` + q + ` ADD COLUMN IF NOT EXISTS tenant_id text NOT NULL DEFAULT coalesce(current_setting('` +
		TenantSetting + `', true), '')`, nil
}

// qualifiedTable quotes "table" or "schema2.table" (checked like schema
// names), defaulting to schema.
func qualifiedTable(schema, table string) (string, error) {
	sch, name := schema, table
	for i := 0; i < len(table); i++ {
		if table[i] == '.' {
			sch, name = table[:i], table[i+1:]
			break
		}
	}
	if err := ValidateSchema(sch); err != nil {
		return "", err
	}
	if !identRE.MatchString(name) {
		return "", fmt.Errorf("pgstore: table %q: want [a-z_][a-z0-9_]*, at most 63 bytes", table)
	}
	return quoteIdent(sch) + "." + quoteIdent(name), nil
}

// requireEveryTenant returns ErrNeedsEveryTenant if row-level security
// applies to this role on any table the hash chain reads with a tenant:
// the streams, the log, the archive and the retired streams. Run it in the
// transaction (the session) that then reads them.
func requireEveryTenant(ctx context.Context, q sqlx.QueryerContext, schema string) error {
	var held bool
	s := quoteIdent(schema)
	err := q.QueryRowxContext(ctx, `SELECT row_security_active($1::regclass) OR row_security_active($2::regclass)
		OR row_security_active($3::regclass) OR row_security_active($4::regclass)`,
		s+".streams", s+".events", s+".archived_events", s+".retired_streams").Scan(&held)
	if err != nil {
		return fmt.Errorf("pgstore: checking row-level security in %s: %w", schema, err)
	}
	if held {
		return ErrNeedsEveryTenant
	}
	return nil
}

// OpenForTenant opens a database (driver "postgres", lib/pq, or "pgx")
// whose every connection sets stele.tenant for its whole session. Use it
// for administration as a tenant: the governance operations (ArchiveStream,
// RestoreArchivedStream, TombstoneStream, PlanRetention, ApplyRetention,
// LookupStream, ListRetired) act on the tenant their transaction has set.
// Never use it for a pool shared by several tenants' work; bind stores with
// ForTenant instead.
func OpenForTenant(driverName, dsn, tenant string) (*sqlx.DB, error) {
	if err := ValidateTenant(tenant); err != nil {
		return nil, err
	}
	var c driver.Connector
	switch driverName {
	case "postgres":
		pc, err := pq.NewConnector(dsn)
		if err != nil {
			return nil, err
		}
		c = pc
	default:
		db, err := sql.Open(driverName, dsn)
		if err != nil {
			return nil, err
		}
		defer db.Close()
		dc, ok := db.Driver().(driver.DriverContext)
		if !ok {
			return nil, fmt.Errorf("pgstore: driver %s cannot open a connector", driverName)
		}
		if c, err = dc.OpenConnector(dsn); err != nil {
			return nil, err
		}
	}
	return sqlx.NewDb(sql.OpenDB(tenantConnector{Connector: c, tenant: tenant}), driverName), nil
}

// tenantConnector sets stele.tenant on each new connection.
type tenantConnector struct {
	driver.Connector
	tenant string
}

func (c tenantConnector) Connect(ctx context.Context) (driver.Conn, error) {
	conn, err := c.Connector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	ex, ok := conn.(driver.ExecerContext)
	if !ok {
		conn.Close()
		return nil, errors.New("pgstore: the driver's connection cannot run a statement")
	}
	if _, err := ex.ExecContext(ctx, `SELECT set_config('`+TenantSetting+`', $1, false)`,
		[]driver.NamedValue{{Ordinal: 1, Value: c.tenant}}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("pgstore: setting tenant %q: %w", c.tenant, err)
	}
	return conn, nil
}
