package pgstore

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/internal/testdb"
)

// TestStreamLookupsStayOnTheKey: a stream read (forwards and backwards), the
// version lookup and the append that creates a stream, their plans cached
// while the tables were nearly empty, still go straight to the stream's rows
// after the log has grown a hundredfold with no ANALYZE in between. Since
// every index leads with the tenant, such a plan once settled on another
// index with the tenant as its only condition, and read the tenant's whole
// log on every call (W8 fell from 600 to 250 sagas/s).
func TestStreamLookupsStayOnTheKey(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	q := `"` + schema + `"`
	testdb.Exec(t, db, `ALTER TABLE `+q+`.events SET (autovacuum_enabled = false)`,
		`ALTER TABLE `+q+`.streams SET (autovacuum_enabled = false)`)
	st := &statements{}
	st.init(q)
	conn, err := db.Connx(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// The session goes back to the pool: leave nothing of this test on it.
	defer testdb.Exec(t, conn, `DEALLOCATE ALL`, `RESET plan_cache_mode`, `DISCARD PLANS`)
	testdb.Exec(t, conn, `DEALLOCATE ALL`)
	// A fresh deployment: a few dozen events, which autovacuum has just
	// analyzed (it does after the first 50 rows). Cache every plan now, as
	// the first calls do; generic plans, as a long-lived session ends up with.
	testdb.Exec(t, db, `INSERT INTO `+q+`.streams (stream_id, category, version, last_xid)
		SELECT 'seed-' || g, 'seed', 10, '1'::xid8 FROM generate_series(1, 5) g`,
		`INSERT INTO `+q+`.events (stream_id, version, category, event_id, event_type, content_type, data, metadata)
		SELECT 'seed-' || (g % 5 + 1), g / 5 + 1, 'seed', gen_random_uuid(), 'T', 'application/json', '\x7b7d', '{}'
		  FROM generate_series(0, 49) g`,
		`ANALYZE `+q+`.events`, `ANALYZE `+q+`.streams`)
	testdb.Exec(t, conn, `SET plan_cache_mode = force_generic_plan`)
	appendNew := func(stream string) string {
		return `SELECT * FROM ` + q + `.append_events(ARRAY['` + stream + `'], '{-2}', '{1}', '{1}', '{1}', '{1}',
			ARRAY[gen_random_uuid()], '{placed}', '{application/json}', ARRAY['\x7b7d']::bytea[], ARRAY['{}']::jsonb[], false)`
	}
	testdb.Exec(t, conn, appendNew("order-1"), appendNew("order-2"),
		`PREPARE fwd AS `+st.text[stmtReadFwd], `PREPARE bwd AS `+st.text[stmtReadBwd], `PREPARE ver AS `+st.text[stmtVersion],
		`EXECUTE fwd('order-1', 1, 100, '')`, `EXECUTE bwd('order-1', 9223372036854775807, 100, '')`, `EXECUTE ver('order-1', '')`)

	testdb.Exec(t, db, `INSERT INTO `+q+`.streams (stream_id, category, version, last_xid)
		SELECT 'bulk-' || g, 'bulk', 10, '1'::xid8 FROM generate_series(1, 50000) g`,
		`INSERT INTO `+q+`.events (stream_id, version, category, event_id, event_type, content_type, data, metadata)
		SELECT 'bulk-' || (g / 10 + 1), g % 10 + 1, 'bulk', gen_random_uuid(), 'T', 'application/json', '\x7b7d', '{}'
		  FROM generate_series(0, 99999) g`)

	// A lookup by key reads a few index and heap pages: 3 to 6 here. An
	// append also writes every index of both tables: 23 buffers on an idle
	// server, 408 while other tests ran beside it. The plans this guards
	// against read 1,640 (a stream read) and 10,431 (the append's probe for
	// an existing stream) on this log.
	// The counts include the catalog pages a function's planning reads, and
	// other tests' DDL can make a session reload its catalog caches (600
	// buffers once, under load): take the least of three calls, which a
	// reload does not repeat and a scanning plan always does.
	for _, c := range []struct {
		what string
		stmt func(i int) string
		max  int
	}{
		{"read forwards", func(int) string { return `EXECUTE fwd('bulk-77', 1, 100, '')` }, 60},
		{"read backwards", func(int) string { return `EXECUTE bwd('bulk-77', 9223372036854775807, 100, '')` }, 60},
		{"version", func(int) string { return `EXECUTE ver('bulk-77', '')` }, 60},
		{"append a new stream", func(i int) string { return appendNew(fmt.Sprintf("new-%d", i)) }, 2000},
	} {
		got := buffersOf(t, conn, c.stmt(0))
		for i := 1; i < 3; i++ {
			got = min(got, buffersOf(t, conn, c.stmt(i)))
		}
		t.Logf("%s: %d buffers", c.what, got)
		if got > c.max {
			t.Errorf("%s read %d buffers on a log of 100,000 events in 50,000 streams: not a lookup by key", c.what, got)
		}
	}
}

// buffersOf runs stmt under EXPLAIN (ANALYZE, BUFFERS) on conn and returns
// the shared buffers it touched (hit or read), functions included.
func buffersOf(t *testing.T, conn *sqlx.Conn, stmt string) int {
	t.Helper()
	rows, err := conn.QueryxContext(context.Background(), `EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF, SUMMARY OFF) `+stmt)
	if err != nil {
		t.Fatalf("%s: %v", stmt, err)
	}
	defer rows.Close()
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			t.Fatal(err)
		}
		if i := strings.Index(line, "Buffers: shared"); i >= 0 {
			n := 0
			// Pages touched: found in the cache or read in (dirtied and
			// written count some of those again).
			for _, f := range strings.Fields(line[i+len("Buffers: shared"):]) {
				k, val, _ := strings.Cut(f, "=")
				if v, err := strconv.Atoi(val); err == nil && (k == "hit" || k == "read") {
					n += v
				}
			}
			return n
		}
	}
	t.Fatalf("no buffer count in the plan of %s", stmt)
	return 0
}
