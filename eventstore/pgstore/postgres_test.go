package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/eventstoretest"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
)

// forEachDriver runs fn once through lib/pq and once through pgx.
func forEachDriver(t *testing.T, fn func(t *testing.T, db *sqlx.DB)) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) { fn(t, testdb.Open(t, driver)) })
	}
}

func TestAppendTxCommitsWithBusinessRows(t *testing.T) {
	forEachDriver(t, func(t *testing.T, db *sqlx.DB) {
		ctx := context.Background()
		s := newStore(t, db, pgstore.Config{})
		orders := `"` + s.Schema() + `".orders`
		testdb.Exec(t, db, `CREATE TABLE `+orders+` (id text PRIMARY KEY, total int)`)

		place := func(id string, commit bool) {
			tx, err := db.BeginTxx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			if _, err := tx.ExecContext(ctx, `INSERT INTO `+orders+` VALUES ($1, 10)`, id); err != nil {
				t.Fatal(err)
			}
			if _, err := s.AppendTx(ctx, tx, "order-"+id, eventstore.NoStream, eventstoretest.Evs("placed", 1)); err != nil {
				t.Fatal(err)
			}
			if commit {
				if err := tx.Commit(); err != nil {
					t.Fatal(err)
				}
			}
		}
		place("1", true)
		place("2", false) // rolled back: neither the row nor the event survives

		var rows int
		if err := db.Get(&rows, `SELECT count(*) FROM `+orders); err != nil || rows != 1 {
			t.Fatalf("orders rows = %d (%v), want 1", rows, err)
		}
		for id, want := range map[string]eventstore.Version{"order-1": 1, "order-2": 0} {
			if v, err := s.StreamVersion(ctx, id); err != nil || v != want {
				t.Errorf("%s at version %d (%v), want %d", id, v, err, want)
			}
		}

		// A conflict inside the caller's transaction leaves it usable.
		tx, err := db.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		_, err = s.AppendTx(ctx, tx, "order-1", eventstore.NoStream, eventstoretest.Evs("placed", 1))
		if !errors.Is(err, eventstore.ErrConcurrencyConflict) {
			t.Fatalf("AppendTx on an existing stream with NoStream: %v", err)
		}
		if _, err := s.AppendTx(ctx, tx, "order-1", eventstore.Exact(1), eventstoretest.Evs("paid", 1)); err != nil {
			t.Fatalf("the transaction is unusable after a conflict: %v", err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		if v, _ := s.StreamVersion(ctx, "order-1"); v != 2 {
			t.Fatalf("order-1 at version %d, want 2", v)
		}
	})
}

// TestHistoryIsImmutable: triggers refuse UPDATE, DELETE and TRUNCATE of
// events for every role, and the documented application role (INSERT and
// SELECT on events) can append and read but cannot change history.
func TestHistoryIsImmutable(t *testing.T) {
	forEachDriver(t, func(t *testing.T, db *sqlx.DB) {
		ctx := context.Background()
		s := newStore(t, db, pgstore.Config{})
		if _, err := s.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("placed", 2)); err != nil {
			t.Fatal(err)
		}
		events := `"` + s.Schema() + `".events`
		for _, stmt := range []string{
			`UPDATE ` + events + ` SET data = '\x00'`,
			`DELETE FROM ` + events,
			`TRUNCATE ` + events,
		} {
			if _, err := db.ExecContext(ctx, stmt); err == nil || !strings.Contains(err.Error(), "immutable") {
				t.Errorf("%s as the owner: err = %v, want it refused as immutable", stmt, err)
			}
		}

		role := s.Schema() + "_app"
		grants, err := pgstore.AppRoleGrants(s.Schema(), role)
		if err != nil {
			t.Fatal(err)
		}
		testdb.Exec(t, db, `CREATE ROLE `+role+` LOGIN`)
		t.Cleanup(func() {
			testdb.Exec(t, db, `DROP OWNED BY `+role, `DROP ROLE `+role)
		})
		testdb.Exec(t, db, grants...)

		conn, err := db.Connx(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		testdb.Exec(t, conn, `SET ROLE `+role)
		defer conn.ExecContext(ctx, `RESET ROLE`)
		// The app role appends and reads through the function and tables.
		if _, err := conn.ExecContext(ctx, `SELECT * FROM "`+s.Schema()+`".append_events(ARRAY['order-1'], ARRAY[2::bigint], ARRAY[1], ARRAY[1], ARRAY[1], ARRAY[1],
			ARRAY[gen_random_uuid()], ARRAY['paid'], ARRAY['application/json'], ARRAY['\x7b7d'::bytea], ARRAY['{}'::jsonb], true)`); err != nil {
			t.Fatalf("app role cannot append: %v", err)
		}
		var n int
		if err := conn.QueryRowContext(ctx, `SELECT count(*) FROM `+events).Scan(&n); err != nil || n != 3 {
			t.Fatalf("app role reads %d events (%v), want 3", n, err)
		}
		for _, stmt := range []string{
			`UPDATE ` + events + ` SET data = '\x00'`,
			`DELETE FROM ` + events,
			`TRUNCATE ` + events,
			`DROP TABLE ` + events,
			`ALTER TABLE ` + events + ` DISABLE TRIGGER events_immutable`,
		} {
			if _, err := conn.ExecContext(ctx, stmt); err == nil {
				t.Errorf("app role ran %q", stmt)
			}
		}
		if _, err := conn.ExecContext(ctx, `RESET ROLE`); err != nil {
			t.Fatal(err)
		}
		evs, err := eventstore.LoadStream(ctx, s, "order-1")
		if err != nil || len(evs) != 3 || string(evs[0].Data) != `{"n":0}` {
			t.Fatalf("history changed: %d events (%v)", len(evs), err)
		}
	})
}

func TestMigrateIsIdempotentAndSerialized(t *testing.T) {
	forEachDriver(t, func(t *testing.T, db *sqlx.DB) {
		ctx := context.Background()
		schema := testdb.Schema(t, db)
		var wg sync.WaitGroup
		results := make([]pgstore.MigrateResult, 4)
		errs := make([]error, 4)
		for i := range results {
			wg.Go(func() { results[i], errs[i] = pgstore.Migrate(ctx, db, schema) })
		}
		wg.Wait()
		applied := 0
		for i := range results {
			if errs[i] != nil {
				t.Fatalf("migrator %d: %v", i, errs[i])
			}
			applied += len(results[i].Applied)
			if want := pgstore.Migrations()[len(pgstore.Migrations())-1].Version; results[i].Version != want {
				t.Errorf("migrator %d left version %d, want %d", i, results[i].Version, want)
			}
		}
		if applied != len(pgstore.Migrations()) {
			t.Fatalf("4 concurrent migrators applied %d migrations in all, want each once (%d)", applied, len(pgstore.Migrations()))
		}
		again, err := pgstore.Migrate(ctx, db, schema)
		if err != nil || len(again.Applied) != 0 {
			t.Fatalf("second migrate applied %d (%v), want none", len(again.Applied), err)
		}
	})
}

func TestConfigIsValidated(t *testing.T) {
	db := testdb.Open(t, "postgres")
	for _, schema := range []string{"Bad", "1abc", "a-b", "x\"; DROP TABLE y; --", "pg_catalog", strings.Repeat("a", 64)} {
		if _, err := pgstore.New(db, &pgstore.Config{Schema: schema}); err == nil {
			t.Errorf("New accepted schema %q", schema)
		}
		if _, err := pgstore.Migrate(context.Background(), db, schema); err == nil {
			t.Errorf("Migrate accepted schema %q", schema)
		}
	}
	_, err := pgstore.New(db, &pgstore.Config{GroupCommitFlushers: -1, PollInterval: -1})
	if err == nil || !strings.Contains(err.Error(), "GroupCommitFlushers") || !strings.Contains(err.Error(), "PollInterval") {
		t.Errorf("New with two bad fields: %v, want both named", err)
	}
}

// TestUnmigratedSchemaSaysSo: using a store before migrating gives an error
// that points at the fix.
func TestUnmigratedSchemaSaysSo(t *testing.T) {
	db := testdb.Open(t, "postgres")
	s, err := pgstore.New(db, &pgstore.Config{Schema: testdb.Schema(t, db)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = s.Append(context.Background(), "order-1", eventstore.Any, eventstoretest.Evs("placed", 1))
	if err == nil || !strings.Contains(err.Error(), "migrated") {
		t.Fatalf("append to an unmigrated schema: %v", err)
	}
}

// TestGroupCommitKeepsOutcomesApart: appends that share a commit keep their
// own results; one conflicting append fails alone.
func TestGroupCommitKeepsOutcomesApart(t *testing.T) {
	forEachDriver(t, func(t *testing.T, db *sqlx.DB) {
		ctx := context.Background()
		s := newStore(t, db, pgstore.Config{GroupCommitFlushers: 1})
		const n = 64
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := range n {
			wg.Go(func() {
				exp := eventstore.NoStream
				if i%8 == 7 {
					exp = eventstore.StreamExists // bound to conflict: the stream is new
				}
				_, errs[i] = s.Append(ctx, fmt.Sprintf("gc-%d", i), exp, eventstoretest.Evs("e", 2))
			})
		}
		wg.Wait()
		for i, err := range errs {
			if i%8 == 7 {
				if !errors.Is(err, eventstore.ErrConcurrencyConflict) {
					t.Errorf("append %d: %v, want a conflict", i, err)
				}
				continue
			}
			if err != nil {
				t.Errorf("append %d: %v", i, err)
			}
			if v, _ := s.StreamVersion(ctx, fmt.Sprintf("gc-%d", i)); v != 2 {
				t.Errorf("gc-%d at version %d, want 2", i, v)
			}
		}
	})
}

// TestLosingAStreamCreationRaceStillAppends: a transaction that waits for
// another to create the same new stream appends behind it once it commits,
// instead of being refused.
func TestLosingAStreamCreationRaceStillAppends(t *testing.T) {
	forEachDriver(t, func(t *testing.T, db *sqlx.DB) {
		ctx := context.Background()
		s := newStore(t, db, pgstore.Config{})
		first, err := db.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer first.Rollback()
		if _, err := s.AppendTx(ctx, first, "new-1", eventstore.NoStream, eventstoretest.Evs("created", 1)); err != nil {
			t.Fatal(err)
		}
		second, err := db.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer second.Rollback()
		var pid int
		if err := second.GetContext(ctx, &pid, `SELECT pg_backend_pid()`); err != nil {
			t.Fatal(err)
		}
		type outcome struct {
			res eventstore.AppendResult
			err error
		}
		done := make(chan outcome, 1)
		go func() {
			res, err := s.AppendTx(ctx, second, "new-1", eventstore.Any, eventstoretest.Evs("joined", 1))
			done <- outcome{res, err}
		}()
		waitUntilBlocked(t, db, pid)
		if err := first.Commit(); err != nil {
			t.Fatal(err)
		}
		o := <-done
		if o.err != nil || o.res.FirstVersion != 2 {
			t.Fatalf("the waiting append got %+v, %v; want version 2", o.res, o.err)
		}
		if err := second.Commit(); err != nil {
			t.Fatal(err)
		}
		if v, _ := s.StreamVersion(ctx, "new-1"); v != 2 {
			t.Fatalf("new-1 at version %d, want 2", v)
		}
	})
}

// waitUntilBlocked waits until backend pid waits for a lock.
func waitUntilBlocked(t *testing.T, db *sqlx.DB, pid int) {
	t.Helper()
	wait.Until(t, fmt.Sprintf("backend %d to wait for a lock", pid), func() bool {
		var waiting bool
		if err := db.Get(&waiting, `SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1`, pid); err != nil {
			t.Fatal(err)
		}
		return waiting
	})
}

// TestAppendOutcomesAroundCancelAndClose: an append whose context is already
// done writes nothing; Close lets queued appends finish, and every append
// that reported success is stored.
func TestAppendOutcomesAroundCancelAndClose(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	s := newStore(t, db, pgstore.Config{})
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Append(cancelled, "cancel-1", eventstore.Any, eventstoretest.Evs("e", 1)); !errors.Is(err, context.Canceled) {
		t.Fatalf("append with a done context: %v", err)
	}
	if v, _ := s.StreamVersion(ctx, "cancel-1"); v != 0 {
		t.Fatalf("an append with a done context was stored (version %d)", v)
	}

	const n = 64
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			_, errs[i] = s.Append(ctx, fmt.Sprintf("close-%d", i), eventstore.NoStream, eventstoretest.Evs("e", 1))
		})
	}
	// Close while the appends are arriving: some are queued or in flight,
	// some are refused; each outcome must match what was stored.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	reader, err := pgstore.New(db, &pgstore.Config{Schema: s.Schema(), DisableGroupCommit: true})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	stored := 0
	for i, err := range errs {
		v, verr := reader.StreamVersion(ctx, fmt.Sprintf("close-%d", i))
		if verr != nil {
			t.Fatal(verr)
		}
		switch {
		case err == nil && v != 1:
			t.Errorf("append %d reported success but is not stored", i)
		case errors.Is(err, pgstore.ErrClosed) && v != 0:
			t.Errorf("append %d was refused as closed but is stored", i)
		case err != nil && !errors.Is(err, pgstore.ErrClosed):
			t.Errorf("append %d: %v", i, err)
		}
		if v == 1 {
			stored++
		}
	}
	t.Logf("%d of %d appends landed before Close", stored, n)
}
