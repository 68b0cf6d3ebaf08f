package pgstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/eventstoretest"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/tenanttest"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
)

// TestTenantConformance: a store bound to a tenant, as the application
// role with row-level security on, passes the whole event store suite while
// another tenant writes the same stream ids into the same tables. Any event
// of the other tenant seen by a read, or any stream of it in the way of an
// append, fails the suite's exact counts and versions.
func TestTenantConformance(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			db := testdb.Open(t, driver)
			eventstoretest.Run(t, eventstoretest.Backend{
				NewStore: func(t *testing.T) eventstore.Store {
					tn := tenanttest.New(t, db)
					tn.Enable(t)
					noise := tn.Tenant(t, "noise")
					for _, stream := range []string{"order-1", "order-2", "account-1", "a-1", "s-1", "stream-1", "c-1"} {
						if _, err := noise.Append(context.Background(), stream, eventstore.Any, eventstoretest.Evs("noise", 3)); err != nil {
							t.Fatal(err)
						}
					}
					return tn.Tenant(t, "acme")
				},
				Begin: func(t *testing.T, s eventstore.Store) eventstoretest.Tx {
					ps := s.(*pgstore.Store)
					tx, err := ps.DB().Beginx()
					if err != nil {
						t.Fatal(err)
					}
					return pgTx{tx, ps}
				},
			})
		})
	}
}

// TestTenantsCannotReachEachOther: through every API and through plain SQL
// as the application role, one tenant neither sees nor changes another's
// rows, and a transaction that set no tenant sees and writes nothing.
func TestTenantsCannotReachEachOther(t *testing.T) {
	forEachDriver(t, func(t *testing.T, db *sqlx.DB) {
		ctx := context.Background()
		tn := tenanttest.New(t, db)
		tn.Enable(t)
		acme, globex := tn.Tenant(t, "acme"), tn.Tenant(t, "globex")

		// The same stream id is a different stream in each tenant.
		acmeEvents := eventstoretest.Evs("placed", 2)
		for i := range acmeEvents {
			acmeEvents[i].ID = uuid.New()
		}
		if _, err := acme.Append(ctx, "order-1", eventstore.NoStream, acmeEvents); err != nil {
			t.Fatal(err)
		}
		if _, err := acme.Append(ctx, "order-2", eventstore.NoStream, eventstoretest.Evs("placed", 1)); err != nil {
			t.Fatal(err)
		}
		if _, err := globex.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("shipped", 1)); err != nil {
			t.Fatalf("globex cannot create its own order-1 beside acme's: %v", err)
		}

		// Reads.
		if evs, err := eventstore.LoadStream(ctx, globex, "order-1"); err != nil || len(evs) != 1 || evs[0].Type != "shipped" {
			t.Errorf("globex reads order-1 as %v (%v), want its own single shipped event", evs, err)
		}
		if evs, err := eventstore.LoadStream(ctx, globex, "order-2"); err != nil || len(evs) != 0 {
			t.Errorf("globex reads acme's order-2: %d events (%v)", len(evs), err)
		}
		if v, err := globex.StreamVersion(ctx, "order-2"); err != nil || v != 0 {
			t.Errorf("globex sees acme's order-2 at version %d (%v)", v, err)
		}
		// The feed shows a transaction's events once every older transaction
		// in the cluster has ended; wait for that, then look at all of it.
		var feed []eventstore.Event
		var err error
		wait.Until(t, "globex's event in its feed", func() bool {
			feed, err = globex.ReadAll(ctx, eventstore.ReadAllOpts{Limit: 100})
			return err != nil || len(feed) > 0
		})
		if err != nil || len(feed) != 1 || feed[0].StreamID != "order-1" || feed[0].Type != "shipped" {
			t.Errorf("globex's feed holds %v (%v), want its one event", feed, err)
		}
		if cat, err := globex.ReadAll(ctx, eventstore.ReadAllOpts{Category: "order", Limit: 100}); err != nil || len(cat) != 1 {
			t.Errorf("globex's order category holds %d events (%v), want 1", len(cat), err)
		}
		if streams, err := globex.ListStreams(ctx, eventstore.ListStreamsOpts{Limit: 100}); err != nil || len(streams) != 1 {
			t.Errorf("globex lists %v (%v), want only its order-1", streams, err)
		}
		head, err := globex.Head(ctx)
		if err != nil || head != feed[0].Position {
			t.Errorf("globex's head %v (%v), want its own last event %v", head, err, feed[0].Position)
		}

		// Appends: acme's order-2 is not there for globex to conflict with
		// or extend; re-sending acme's event ids never returns acme's events.
		_, err = globex.Append(ctx, "order-2", eventstore.ExpectedVersion(1), eventstoretest.Evs("paid", 1))
		if !errors.Is(err, eventstore.ErrConcurrencyConflict) {
			t.Errorf("globex appending at acme's order-2 version 1: err = %v, want a conflict (the stream is absent for globex)", err)
		}
		// Event ids are unique across tenants; another tenant's id is
		// refused and nothing of the event that holds it is returned.
		for _, stream := range []string{"order-9", "order-1"} {
			res, err := globex.Append(ctx, stream, eventstore.Any, acmeEvents)
			if !errors.Is(err, eventstore.ErrIdempotencyMismatch) || eventstore.IsRetryable(err) {
				t.Errorf("globex re-sent acme's event ids to %s: got %+v, err = %v; want an idempotency mismatch, not retryable", stream, res, err)
			}
		}
		if evs, _ := eventstore.LoadStream(ctx, acme, "order-1"); len(evs) != 2 || evs[0].Type != "placed" {
			t.Errorf("acme's order-1 changed: %v", evs)
		}

		// A store bound to no tenant sees and writes nothing.
		if evs, err := tn.Root.ReadAll(ctx, eventstore.ReadAllOpts{Limit: 100}); err != nil || len(evs) != 0 {
			t.Errorf("the unbound store reads %d events (%v), want none", len(evs), err)
		}
		if _, err := tn.Root.Append(ctx, "order-3", eventstore.NoStream, eventstoretest.Evs("placed", 1)); err == nil {
			t.Error("the unbound store appended with row-level security on")
		}

		// Plain SQL as the application role.
		q := `"` + tn.Schema + `"`
		var n int
		for _, table := range []string{"events", "streams"} {
			if err := tn.App.QueryRowContext(ctx, `SELECT count(*) FROM `+q+`.`+table).Scan(&n); err != nil || n != 0 {
				t.Errorf("app role, no tenant set: %d rows of %s (%v), want 0", n, table, err)
			}
			if err := tn.Owner.QueryRowContext(ctx, `SELECT count(*) FROM `+q+`.`+table).Scan(&n); err != nil || n != 0 {
				t.Errorf("owner role, no tenant set: %d rows of %s (%v), want 0 (FORCE)", n, table, err)
			}
		}
		inTenant := func(tenant string, fn func(tx *sqlx.Tx) error) error {
			tx, err := tn.App.BeginTxx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			if err := pgstore.SetTenant(ctx, tx, tenant); err != nil {
				t.Fatal(err)
			}
			return fn(tx)
		}
		inTenant("acme", func(tx *sqlx.Tx) error {
			if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM `+q+`.events`).Scan(&n); err != nil || n != 3 {
				t.Errorf("app role as acme: %d events (%v), want acme's 3", n, err)
			}
			if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM `+q+`.events WHERE tenant_id = 'globex'`).Scan(&n); err != nil || n != 0 {
				t.Errorf("app role as acme selects %d of globex's events (%v)", n, err)
			}
			return nil
		})
		for _, stmt := range []string{
			`INSERT INTO ` + q + `.events (tenant_id, stream_id, version, category, event_id, event_type, content_type, data, metadata)
				VALUES ('globex', 'order-1', 2, 'order', gen_random_uuid(), 'forged', 'application/json', '\x7b7d', '{}')`,
			`INSERT INTO ` + q + `.streams (tenant_id, stream_id, category, version, last_xid) VALUES ('globex', 'order-7', 'order', 1, pg_current_xact_id())`,
			`UPDATE ` + q + `.streams SET tenant_id = 'globex' WHERE stream_id = 'order-2'`,
		} {
			err := inTenant("acme", func(tx *sqlx.Tx) error { _, err := tx.ExecContext(ctx, stmt); return err })
			if err == nil || !strings.Contains(err.Error(), "row-level security") {
				t.Errorf("app role as acme ran %q: err = %v, want a row-level security refusal", strings.Fields(stmt)[0]+" "+strings.Fields(stmt)[2], err)
			}
		}
		// An UPDATE of globex's row as acme finds nothing to update.
		inTenant("acme", func(tx *sqlx.Tx) error {
			r, err := tx.ExecContext(ctx, `UPDATE `+q+`.streams SET version = 99 WHERE tenant_id = 'globex'`)
			if err != nil {
				t.Fatal(err)
			}
			if n, _ := r.RowsAffected(); n != 0 {
				t.Errorf("app role as acme updated %d of globex's streams rows", n)
			}
			return nil
		})
		// A tenant setting reset to '' (what a pooled session holds after a
		// SET LOCAL ended) is no tenant either.
		if err := inTenant("acme", func(tx *sqlx.Tx) error {
			_, err := tx.ExecContext(ctx, `SELECT set_config('stele.tenant', '', true)`)
			if err == nil {
				err = tx.QueryRowContext(ctx, `SELECT count(*) FROM `+q+`.events`).Scan(&n)
			}
			return err
		}); err != nil || n != 0 {
			t.Errorf("tenant '' reads %d events (%v), want 0", n, err)
		}
		if evs, _ := eventstore.LoadStream(ctx, globex, "order-1"); len(evs) != 1 {
			t.Errorf("globex's order-1 changed: %d events", len(evs))
		}
	})
}

// TestTenantReadModel: a read-model table given TenantColumnSQL and put
// under EnableTenancy takes the tenant of the transaction AppendTx ran in,
// and each tenant sees only its own rows.
func TestTenantReadModel(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	tn := tenanttest.New(t, db)
	q := `"` + tn.Schema + `"`
	col, err := pgstore.TenantColumnSQL(tn.Schema, "orders")
	if err != nil {
		t.Fatal(err)
	}
	testdb.Exec(t, tn.Owner, `CREATE TABLE `+q+`.orders (id text, total int)`, col,
		`ALTER TABLE `+q+`.orders ADD PRIMARY KEY (tenant_id, id)`,
		`GRANT SELECT, INSERT, UPDATE, DELETE ON `+q+`.orders TO "`+tn.AppRole()+`"`)
	tn.Enable(t, "orders")
	for _, tenant := range []string{"acme", "globex"} {
		s := tn.Tenant(t, tenant)
		tx, err := tn.App.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.AppendTx(ctx, tx, "order-1", eventstore.NoStream, eventstoretest.Evs("placed", 1)); err != nil {
			t.Fatal(err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.orders (id, total) VALUES ('order-1', $1)`, len(tenant)); err != nil {
			t.Fatalf("%s writing its read model: %v", tenant, err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	for _, tenant := range []string{"acme", "globex"} {
		tx, err := tn.App.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := pgstore.SetTenant(ctx, tx, tenant); err != nil {
			t.Fatal(err)
		}
		var got []struct {
			Tenant string `db:"tenant_id"`
			Total  int    `db:"total"`
		}
		if err := tx.SelectContext(ctx, &got, `SELECT tenant_id, total FROM `+q+`.orders`); err != nil {
			t.Fatal(err)
		}
		tx.Rollback()
		if len(got) != 1 || got[0].Tenant != tenant || got[0].Total != len(tenant) {
			t.Errorf("%s reads its read model as %+v, want its one row", tenant, got)
		}
	}
	var n int
	if err := tn.App.GetContext(ctx, &n, `SELECT count(*) FROM `+q+`.orders`); err != nil || n != 0 {
		t.Errorf("no tenant set: %d read-model rows (%v), want 0", n, err)
	}
}

// TestTenantBadInput: an invalid tenant id is a *TenantError before anything
// is written; governance acts on its own tenant's streams only, and the hash
// chain refuses a schema with tenants.
func TestTenantBadInput(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	s := newStore(t, db, pgstore.Config{})
	for _, bad := range []string{"", "a b", "x'; DROP TABLE events; --", `"q"`, "-lead", strings.Repeat("t", 64), "t\x00", "ténant"} {
		_, err := s.ForTenant(bad)
		var te *pgstore.TenantError
		if !errors.As(err, &te) {
			t.Errorf("ForTenant(%q): err = %v, want *pgstore.TenantError", bad, err)
		}
	}
	if _, err := s.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("placed", 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := pgstore.ArchiveStream(ctx, db, s.Schema(), "test", "order-1"); err != nil {
		t.Fatalf("archive without tenants: %v", err)
	}
	acme, err := s.ForTenant("acme")
	if err != nil {
		t.Fatal(err)
	}
	defer acme.Close()
	if _, err := acme.Append(ctx, "order-2", eventstore.NoStream, eventstoretest.Evs("placed", 1)); err != nil {
		t.Fatal(err)
	}
	// Governance as tenant '' does not see acme's order-2.
	if _, err := pgstore.ArchiveStream(ctx, db, s.Schema(), "test", "order-2"); !errors.Is(err, pgstore.ErrStreamNotFound) {
		t.Errorf("archive of acme's stream as tenant '': err = %v, want ErrStreamNotFound", err)
	}
	// The hash chain covers every tenant's streams.
	if _, err := pgstore.Seal(ctx, db, s.Schema()); err != nil {
		t.Fatalf("seal in a schema with tenants: %v", err)
	}
	var hashed int
	if err := db.GetContext(ctx, &hashed, `SELECT count(*) FROM "`+s.Schema()+`".event_hashes WHERE tenant_id = 'acme' AND stream_id = 'order-2'`); err != nil || hashed != 1 {
		t.Errorf("acme's order-2 has %d hashes (%v), want 1", hashed, err)
	}
	noProblems(t, db, s.Schema())
}

// TestFuzzedNamesNeverChangeTheSchema: stream ids, tenant ids and schema
// names built from SQL's special characters either are refused with a
// typed error or are stored as plain values; the database's catalog (every
// schema, table, column, index, function and policy) is the same afterwards.
var (
	plainIdent     = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)
	qualifiedIdent = regexp.MustCompile(`^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$`)
	// otherTestObject finds a name that tests make for themselves: testdb's
	// schemas and roles, testsvc's example schemas, the bench's schemas, and
	// the toast and temporary schemas that come and go with them.
	otherTestObject = regexp.MustCompile(`\b(t_[0-9a-f]{12}\w*|example_\w+|stele_bench_\w+|pg_toast\w*|pg_temp\w*)`)
)

func TestFuzzedNamesNeverChangeTheSchema(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	tn := tenanttest.New(t, db)
	tn.Enable(t)
	catalog := func() string {
		t.Helper()
		var out []string
		err := db.SelectContext(ctx, &out, `
			SELECT 'rel ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text || ' ' || c.relrowsecurity::text || c.relforcerowsecurity::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			UNION ALL SELECT 'col ' || table_schema || '.' || table_name || '.' || column_name || ' ' || data_type FROM information_schema.columns
			UNION ALL SELECT 'fn ' || n.nspname || '.' || p.proname || ' ' || md5(p.prosrc) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
			UNION ALL SELECT 'pol ' || schemaname || '.' || tablename || '.' || policyname || ' ' || coalesce(qual, '') || coalesce(with_check, '') FROM pg_policies
			UNION ALL SELECT 'role ' || rolname FROM pg_roles
			ORDER BY 1`)
		if err != nil {
			t.Fatal(err)
		}
		// Other tests, in this package and in others running at the same
		// time, make and drop their own schemas and roles (named by testdb
		// and testsvc): leave theirs out, keep this test's and the rest.
		kept := out[:0]
		for _, line := range out {
			if m := otherTestObject.FindString(line); m == "" || strings.HasPrefix(m, tn.Schema) {
				kept = append(kept, line)
			}
		}
		return strings.Join(kept, "\n")
	}
	before := catalog()

	seeds := []string{
		`x'; DROP TABLE events; --`, `"; DROP SCHEMA public CASCADE; --`, `acme') OR ('1'='1`, `$1`, `$$ || pg_sleep(1) || $$`,
		`a\'b`, `%s%n`, `tenant"`, `' OR tenant_id <> '`, `acme; RESET ROLE`, "nul\x00byte", "ünï", `a-1`, `public`,
		`pg_catalog`, `stele`, `order-1`, `x` + strings.Repeat("y", 300), ``, ` `, `-`, `a.b`, `a@b`, `A_b.c-d@e`,
	}
	rng := rand.New(rand.NewPCG(20261130, 1))
	alphabet := []rune(`abcXYZ019-_.@'";$\%()*,/:=[]{}|~ ` + "\x00\n\tä€")
	for range 300 {
		b := make([]rune, 1+rng.IntN(40))
		for i := range b {
			b[i] = alphabet[rng.IntN(len(alphabet))]
		}
		seeds = append(seeds, string(b))
	}

	stored := 0
	for i, name := range seeds {
		// As a tenant id.
		s, err := tn.Root.ForTenant(name)
		var te *pgstore.TenantError
		if err != nil && !errors.As(err, &te) {
			t.Fatalf("ForTenant(%q): %v, want a *pgstore.TenantError", name, err)
		}
		if err == nil {
			// As a stream id, in that tenant.
			_, err := s.Append(ctx, name, eventstore.Any, eventstoretest.Evs("fuzzed", 1))
			var ve *eventstore.ValidationError
			switch {
			case err == nil:
				evs, rerr := eventstore.LoadStream(ctx, s, name)
				if rerr != nil || len(evs) == 0 || evs[len(evs)-1].StreamID != name {
					t.Errorf("stream %q in tenant %q reads back as %v (%v)", name, name, evs, rerr)
				}
				stored++
			case !errors.As(err, &ve):
				t.Errorf("Append to stream %q: %v, want success or a *eventstore.ValidationError", name, err)
			}
			s.Close()
		}
		// As a stream id of a fixed tenant.
		acme := tn.Tenant(t, "acme")
		if _, err := acme.Append(ctx, name, eventstore.Any, eventstoretest.Evs("fuzzed", 1)); err != nil {
			var ve *eventstore.ValidationError
			if !errors.As(err, &ve) {
				t.Errorf("Append to stream %q: %v, want success or a *eventstore.ValidationError", name, err)
			}
		}
		// As a schema name and a read-model table name: refused before any
		// statement runs. (A plain identifier is valid, and quoted; the
		// test does not migrate or alter what it would name.)
		if !plainIdent.MatchString(name) {
			if _, err := pgstore.Migrate(ctx, db, name); err == nil {
				t.Errorf("Migrate into schema %q (seed %d) succeeded", name, i)
			}
		}
		if !qualifiedIdent.MatchString(name) {
			if err := pgstore.EnableTenancy(ctx, tn.Owner, tn.Schema, "fuzz", name); err == nil {
				t.Errorf("EnableTenancy with table %q succeeded", name)
			}
			if _, err := pgstore.TenantColumnSQL(tn.Schema, name); err == nil {
				t.Errorf("TenantColumnSQL for table %q succeeded", name)
			}
		}
	}
	if stored == 0 {
		t.Error("no fuzzed name was a valid tenant and stream id: the test exercised only refusals")
	}
	if after := catalog(); after != before {
		t.Errorf("the catalog changed:\n%s", diffLines(before, after))
	}
}

// diffLines lists the lines only in a (-) or only in b (+).
func diffLines(a, b string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	ma, mb := in(a), in(b)
	var out []string
	for l := range ma {
		if !mb[l] {
			out = append(out, "- "+l)
		}
	}
	for l := range mb {
		if !ma[l] {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

// TestTenantGovernance: archive, restore, retention and tombstone as a
// tenant (the owner role, row-level security on, the tenant set on each
// connection) act on that tenant's streams only. Another tenant's streams
// of the same ids stay byte for byte and keep taking appends; each action is
// audited with its tenant.
func TestTenantGovernance(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	tn := tenanttest.New(t, db)
	tn.Enable(t)
	acme, globex := tn.Tenant(t, "acme"), tn.Tenant(t, "globex")
	streams := []string{"order-1", "order-2", "log-0", "log-1", "log-2"}
	for _, s := range []*pgstore.Store{acme, globex} {
		for _, id := range streams {
			n := 2
			if strings.HasPrefix(id, "log-") {
				n = 4
			}
			if _, err := s.Append(ctx, id, eventstore.NoStream, eventstoretest.Evs(s.Tenant(), n)); err != nil {
				t.Fatal(err)
			}
		}
	}
	globexBefore := map[string][]eventstore.Event{}
	for _, id := range streams {
		globexBefore[id] = must(eventstore.LoadStream(ctx, globex, id))
	}
	gov := tn.OwnerAs(t, "acme")

	arch, err := pgstore.ArchiveStream(ctx, gov, tn.Schema, "alice", "order-1")
	if err != nil || arch.Events != 2 {
		t.Fatalf("archive acme's order-1: %+v, %v", arch, err)
	}
	ret, err := pgstore.ApplyRetention(ctx, gov, tn.Schema, "bob", pgstore.RetentionPolicy{Category: "log", MaxCount: 1})
	if err != nil || ret.Streams != 3 || ret.Events != 9 {
		t.Fatalf("retention on acme's log: %+v, %v", ret, err)
	}
	tomb, err := pgstore.TombstoneStream(ctx, gov, tn.Schema, "carol", "order-2")
	if err != nil || tomb.Events != 2 {
		t.Fatalf("tombstone acme's order-2: %+v, %v", tomb, err)
	}

	// acme sees the effects.
	if evs := must(eventstore.LoadStream(ctx, acme, "order-1")); len(evs) != 0 {
		t.Errorf("acme's archived order-1 still reads %d events", len(evs))
	}
	if _, err := acme.Append(ctx, "order-1", eventstore.Any, eventstoretest.Evs("late", 1)); err == nil {
		t.Error("acme appended to its archived order-1")
	}
	for i := range 3 {
		if evs := must(eventstore.LoadStream(ctx, acme, fmt.Sprintf("log-%d", i))); len(evs) != 1 {
			t.Errorf("acme's log-%d keeps %d events after MaxCount 1", i, len(evs))
		}
	}
	// Retired streams, and streams with archived events (retention).
	retired := map[string]pgstore.StreamStatus{}
	for _, st := range must(pgstore.ListRetired(ctx, gov, tn.Schema, "", 0)) {
		retired[st.StreamID] = st
	}
	if len(retired) != 5 || retired["order-1"].State != pgstore.StreamArchived || retired["order-1"].ArchivedEvents != 2 ||
		retired["order-2"].State != pgstore.StreamTombstoned || retired["log-1"].ArchivedEvents != 3 || retired["log-1"].Events != 1 {
		t.Errorf("acme's retired streams: %+v", retired)
	}
	// globex's streams of the same ids are untouched and still take appends.
	for _, id := range streams {
		sameEvents(t, "globex's "+id, must(eventstore.LoadStream(ctx, globex, id)), globexBefore[id])
	}
	for _, id := range []string{"order-1", "order-2"} {
		if _, err := globex.Append(ctx, id, eventstore.Exact(2), eventstoretest.Evs("globex", 1)); err != nil {
			t.Errorf("globex appending to its own %s after acme retired its %s: %v", id, id, err)
		}
	}
	if got := must(pgstore.ListRetired(ctx, tn.OwnerAs(t, "globex"), tn.Schema, "", 0)); len(got) != 0 {
		t.Errorf("globex's retired streams: %+v, want none", got)
	}
	// As globex, acme's archived order-1 is not there to restore.
	if _, err := pgstore.RestoreArchivedStream(ctx, tn.OwnerAs(t, "globex"), tn.Schema, "mallory", "order-1"); err == nil {
		t.Error("globex restored acme's archived order-1")
	}
	res, err := pgstore.RestoreArchivedStream(ctx, gov, tn.Schema, "alice", "order-1")
	if err != nil || res.Events != 2 {
		t.Fatalf("restore acme's order-1: %+v, %v", res, err)
	}
	if evs := must(eventstore.LoadStream(ctx, acme, "order-1")); len(evs) != 2 {
		t.Errorf("acme's restored order-1 reads %d events, want 2", len(evs))
	}

	// The audit trail names the tenant of each action.
	trail := must(pgstore.Audit(ctx, tn.Owner, tn.Schema, 10))
	tenants := map[string]string{}
	for _, e := range trail {
		var d struct{ Tenant string }
		_ = json.Unmarshal(e.Detail, &d)
		tenants[e.Action] = d.Tenant
	}
	for _, action := range []string{"archive", "retention", "tombstone", "unarchive"} {
		if tenants[action] != "acme" {
			t.Errorf("audit row of %s names tenant %q, want acme (%v)", action, tenants[action], tenants)
		}
	}
	// The owner is held to row-level security: the chain, which covers
	// every tenant, is sealed and verified by a role that bypasses it.
	if _, err := pgstore.Seal(ctx, tn.Owner, tn.Schema); !errors.Is(err, pgstore.ErrNeedsEveryTenant) {
		t.Errorf("seal as the owner, held to row-level security: %v, want ErrNeedsEveryTenant", err)
	}
	if _, err := pgstore.Verify(ctx, tn.Owner, tn.Schema); !errors.Is(err, pgstore.ErrNeedsEveryTenant) {
		t.Errorf("verify as the owner, held to row-level security: %v, want ErrNeedsEveryTenant", err)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestTenantLeavesNothingOnThePool: a bound store's appends and reads set the
// tenant for their own statement only; the pooled connection they ran on
// holds no tenant afterwards, so the next user of it (another tenant's
// store, or the store bound to none) is not acting as that tenant.
func TestTenantLeavesNothingOnThePool(t *testing.T) {
	ctx := context.Background()
	shared := testdb.Open(t, "postgres")
	one, err := sqlx.Open("postgres", testdb.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	one.SetMaxOpenConns(1) // every statement below runs on this one session
	schema := testdb.Schema(t, shared)
	if _, err := pgstore.Migrate(ctx, one, schema); err != nil {
		t.Fatal(err)
	}
	root, err := pgstore.New(one, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	acme, err := root.ForTenant("acme")
	if err != nil {
		t.Fatal(err)
	}
	defer acme.Close()
	sessionTenant := func(after string) {
		t.Helper()
		var got string
		if err := one.GetContext(ctx, &got, `SELECT coalesce(current_setting('stele.tenant', true), '')`); err != nil {
			t.Fatal(err)
		}
		if got != "" {
			t.Errorf("after %s the pooled session acts as tenant %q", after, got)
		}
	}
	if _, err := acme.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("placed", 2)); err != nil {
		t.Fatal(err)
	}
	sessionTenant("an append")
	for name, read := range map[string]func() error{
		"ReadStream": func() error { _, err := eventstore.LoadStream(ctx, acme, "order-1"); return err },
		"ReadAll":    func() error { _, err := acme.ReadAll(ctx, eventstore.ReadAllOpts{}); return err },
		"Head":       func() error { _, err := acme.Head(ctx); return err },
		"Version":    func() error { _, err := acme.StreamVersion(ctx, "order-1"); return err },
		"List":       func() error { _, err := acme.ListStreams(ctx, eventstore.ListStreamsOpts{}); return err },
	} {
		if err := read(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		sessionTenant(name)
	}
	// The store bound to none, on the same session, still writes tenant ''
	// (and its append statement is prepared before the one connection is
	// taken by the transaction below).
	if _, err := root.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("placed", 1)); err != nil {
		t.Fatalf("tenant '' appending its own order-1 after acme used the session: %v", err)
	}
	tx, err := one.BeginTxx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := acme.AppendTx(ctx, tx, "order-2", eventstore.NoStream, eventstoretest.Evs("placed", 1)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	sessionTenant("a committed AppendTx")
}
