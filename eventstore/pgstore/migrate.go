package pgstore

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// Migration is one embedded schema change.
type Migration struct {
	Version int
	Name    string
	sql     string
}

// String is the migration's file name without extension: "0001_event_log".
func (m Migration) String() string { return fmt.Sprintf("%04d_%s", m.Version, m.Name) }

// Migrations lists the embedded migrations in the order they apply.
func Migrations() []Migration {
	entries, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		panic(err)
	}
	var out []Migration
	for _, path := range entries {
		base := strings.TrimSuffix(strings.TrimPrefix(path, "migrations/"), ".sql")
		num, name, _ := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if err != nil {
			panic(fmt.Sprintf("pgstore: migration %s: name must start with a number", path))
		}
		body, err := migrationFiles.ReadFile(path)
		if err != nil {
			panic(err)
		}
		out = append(out, Migration{Version: v, Name: name, sql: string(body)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out
}

var identRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// ValidateSchema checks a schema name: lowercase letters, digits and '_',
// not starting with a digit, at most 63 bytes. Names are never built from
// unchecked input.
func ValidateSchema(schema string) error {
	if !identRE.MatchString(schema) || strings.HasPrefix(schema, "pg_") {
		return fmt.Errorf("pgstore: schema %q: want [a-z_][a-z0-9_]*, at most 63 bytes, not starting with pg_", schema)
	}
	return nil
}

// quoteIdent quotes a name that ValidateSchema accepted.
func quoteIdent(s string) string { return `"` + s + `"` }

// Execer is what Migrate needs: *sql.DB and *sqlx.DB both are one.
type Execer interface {
	BeginTx(ctx context.Context, opts *sql.TxOptions) (*sql.Tx, error)
}

// MigrateResult says what Migrate applied.
type MigrateResult struct {
	Applied []Migration // newly applied, in order
	Version int         // schema version now
}

// Migrate creates the schema if needed and applies every embedded migration
// not yet applied, in one transaction, under an advisory lock so concurrent
// migrators (several instances starting at once) apply each migration once.
func Migrate(ctx context.Context, db Execer, schema string) (MigrateResult, error) {
	var res MigrateResult
	if err := ValidateSchema(schema); err != nil {
		return res, err
	}
	q := quoteIdent(schema)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return res, fmt.Errorf("pgstore: migrating %s: %w", schema, err)
	}
	defer tx.Rollback() //nolint:errcheck // a no-op after Commit
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, "stele.migrate:"+schema); err != nil {
		return res, fmt.Errorf("pgstore: locking migrations of %s: %w", schema, err)
	}
	for _, stmt := range []string{
		`SET LOCAL client_min_messages = warning`,
		`CREATE SCHEMA IF NOT EXISTS ` + q,
		`CREATE TABLE IF NOT EXISTS ` + q + `.schema_migrations (version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`,
	} {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return res, fmt.Errorf("pgstore: preparing schema %s: %w", schema, err)
		}
	}
	if err := tx.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM `+q+`.schema_migrations`).Scan(&res.Version); err != nil {
		return res, fmt.Errorf("pgstore: reading schema version of %s: %w", schema, err)
	}
	for _, m := range Migrations() {
		if m.Version <= res.Version {
			continue
		}
		body := strings.ReplaceAll(m.sql, "{{schema}}", q)
		if _, err := tx.ExecContext(ctx, body); err != nil {
			return MigrateResult{}, fmt.Errorf("pgstore: applying migration %04d_%s to %s: %w", m.Version, m.Name, schema, err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.schema_migrations (version, name) VALUES ($1, $2)`, m.Version, m.Name); err != nil {
			return MigrateResult{}, fmt.Errorf("pgstore: recording migration %04d in %s: %w", m.Version, schema, err)
		}
		res.Applied = append(res.Applied, m)
		res.Version = m.Version
	}
	if err := tx.Commit(); err != nil {
		return MigrateResult{}, fmt.Errorf("pgstore: committing migrations of %s: %w", schema, err)
	}
	return res, nil
}

// AppRoleGrants returns the statements that let role use the store in schema
// and nothing more: append and read events, never UPDATE, DELETE or TRUNCATE
// them. Run migrations as the schema owner and the application as role.
func AppRoleGrants(schema, role string) ([]string, error) {
	if err := ValidateSchema(schema); err != nil {
		return nil, err
	}
	if !identRE.MatchString(role) {
		return nil, fmt.Errorf("pgstore: role %q: want [a-z_][a-z0-9_]*", role)
	}
	s, r := quoteIdent(schema), quoteIdent(role)
	return []string{
		`GRANT USAGE ON SCHEMA ` + s + ` TO ` + r,
		`GRANT SELECT, INSERT ON ` + s + `.events TO ` + r,
		`GRANT SELECT, INSERT, UPDATE ON ` + s + `.streams TO ` + r,
		`GRANT SELECT ON ` + s + `.schema_migrations TO ` + r,
		`GRANT SELECT, INSERT, UPDATE, DELETE ON ` + s + `.snapshots TO ` + r, // a cache, not history
		`GRANT SELECT, INSERT, UPDATE, DELETE ON ` + s + `.projection_checkpoints, ` + s + `.projection_dead_letters, ` + s + `.projection_slots, ` + s + `.projection_rebuilds TO ` + r,
		`GRANT SELECT, INSERT, UPDATE, DELETE ON ` + s + `.outbox_relays, ` + s + `.inbox, ` + s + `.bus_poison TO ` + r,
		`GRANT SELECT, INSERT ON ` + s + `.admin_audit TO ` + r, // the trail of what operators did; its trigger refuses changes
		`GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA ` + s + ` TO ` + r,
	}, nil
}
