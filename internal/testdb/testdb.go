// Package testdb gives tests a real PostgreSQL database: a connection through
// lib/pq or pgx's database/sql driver, and a schema of their own that is
// dropped when the test ends.
//
// The server is STELE_TEST_DSN (default postgres://postgres@127.0.0.1:5432/test).
// When it cannot be reached the test is skipped, unless STELE_REQUIRE_SERVICES
// is set (CI sets it): then the test fails and says what is missing.
package testdb

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // driver "pgx"
	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // driver "postgres"
	"go.uber.org/goleak"

	"github.com/stele-dev/stele/internal/testsvc"
)

// Drivers are the database/sql driver names every PostgreSQL test runs with.
var Drivers = []string{"postgres", "pgx"}

// DSN returns the server tests use.
func DSN() string {
	if dsn := os.Getenv("STELE_TEST_DSN"); dsn != "" {
		return dsn
	}
	return "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
}

// Required reports whether a missing PostgreSQL fails tests instead of
// skipping them (testsvc.Required).
func Required() bool { return testsvc.Required() }

var (
	pools   = map[string]*sqlx.DB{}
	poolsMu sync.Mutex
)

// Open returns a shared connection pool for driver ("postgres" or "pgx"),
// skipping or failing the test when the server is not reachable.
func Open(t testing.TB, driver string) *sqlx.DB {
	t.Helper()
	poolsMu.Lock()
	defer poolsMu.Unlock()
	if db := pools[driver]; db != nil {
		return db
	}
	db, err := sqlx.Open(driver, DSN())
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = db.PingContext(ctx)
		cancel()
	}
	if err != nil {
		testsvc.Missing(t, "PostgreSQL is not reachable at "+DSN()+" ("+err.Error()+"); start it with `make services`")
	}
	db.SetMaxOpenConns(20) // two packages at once, two drivers each, stay under max_connections (100)
	db.SetMaxIdleConns(20)
	pools[driver] = db
	return db
}

// Schema returns a new, empty schema name for the test, dropped (with
// everything in it) when the test ends.
func Schema(t testing.TB, db *sqlx.DB) string {
	t.Helper()
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "t_" + strings.ToLower(hex.EncodeToString(b))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// A consumer of the test (a bus subscriber, say) may still be
		// finishing a transaction on the schema's tables as the test ends;
		// PostgreSQL then picks the DROP as a deadlock's victim. Try again.
		var err error
		for attempt := 0; attempt < 5; attempt++ {
			if _, err = db.ExecContext(ctx, `DROP SCHEMA IF EXISTS "`+name+`" CASCADE`); err == nil ||
				!strings.Contains(err.Error(), "deadlock detected") {
				break
			}
			time.Sleep(time.Duration(attempt+1) * 100 * time.Millisecond)
		}
		if err != nil {
			t.Errorf("dropping test schema %s: %v", name, err)
		}
	})
	return name
}

// Exec runs statements, failing the test on error.
func Exec(t testing.TB, db interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}, stmts ...string) {
	t.Helper()
	for _, s := range stmts {
		if _, err := db.ExecContext(context.Background(), s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
}

// sharedCatalogLock is the advisory lock ExecShared holds.
const sharedCatalogLock = 0x5e1e_0001

// ExecShared runs stmts in one transaction while holding an advisory lock
// that every test process takes for the same purpose: for statements that
// change a catalog row all tests share, such as the database's privileges
// (GRANT ... ON DATABASE). PostgreSQL refuses two concurrent updates of one
// such row ("tuple concurrently updated") instead of waiting.
func ExecShared(t testing.TB, db *sqlx.DB, stmts ...string) {
	t.Helper()
	if err := execShared(db, stmts...); err != nil {
		t.Fatal(err)
	}
}

func execShared(db *sqlx.DB, stmts ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, sharedCatalogLock); err != nil {
		return err
	}
	for _, s := range stmts {
		if _, err := tx.ExecContext(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return tx.Commit()
}

// VerifyMain runs the package's tests, closes the shared pools and then
// fails the run if any goroutine leaked. Use it as TestMain's body.
func VerifyMain(m *testing.M) {
	code := m.Run()
	poolsMu.Lock()
	for name, db := range pools {
		_ = db.Close()
		delete(pools, name)
	}
	poolsMu.Unlock()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// Role creates a login role named name, runs setup (grants, as the caller
// of db), and returns a pool of db's driver logged in as that role. The
// pool is closed and the role dropped, with everything it owns, when the
// test ends. Tests of row-level security need it: superusers, like the
// postgres user tests otherwise connect as, are never held to it.
func Role(t testing.TB, db *sqlx.DB, name string, setup ...string) *sqlx.DB {
	t.Helper()
	Exec(t, db, `CREATE ROLE "`+name+`" LOGIN`)
	t.Cleanup(func() {
		// DROP OWNED revokes the role's privileges on the database too.
		if err := execShared(db, `DROP OWNED BY "`+name+`" CASCADE`, `DROP ROLE "`+name+`"`); err != nil {
			t.Error(err)
		}
	})
	ExecShared(t, db, setup...)
	rdb, err := sqlx.Open(db.DriverName(), DSNAs(t, name))
	if err != nil {
		t.Fatal(err)
	}
	rdb.SetMaxOpenConns(8)
	t.Cleanup(func() { _ = rdb.Close() }) // runs before the role is dropped
	return rdb
}

// DSNAs is DSN logged in as role.
func DSNAs(t testing.TB, role string) string {
	t.Helper()
	u, err := url.Parse(DSN())
	if err != nil {
		t.Fatalf("STELE_TEST_DSN %q: want a postgres:// URL to log in as another role: %v", DSN(), err)
	}
	u.User = url.User(role)
	return u.String()
}
