package pgstore

import (
	"context"
	"strings"
	"testing"

	"github.com/stele-dev/stele/internal/testdb"
)

// TestFeedQueriesUseTheirIndexes: the feed, category and head queries must
// walk their (transaction_id, global_position) indexes in order, with no
// sort. A sort here once meant the feed was ordered by the transaction id as
// text ("10" before "9") as well as a full scan per page.
func TestFeedQueriesUseTheirIndexes(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	testdb.Exec(t, db, `INSERT INTO "`+schema+`".events (tenant_id, stream_id, version, category, event_id, event_type, content_type, data, metadata)
		SELECT CASE WHEN g % 4 = 0 THEN 'acme' ELSE '' END, 'c' || (g % 10) || '-' || (g % 100), g, 'c' || (g % 10), gen_random_uuid(), 'T', 'application/json', '\x7b7d', '{}'
		  FROM generate_series(1, 80000) g`, `ANALYZE "`+schema+`".events`)
	s, err := New(db, &Config{Schema: schema, DisableGroupCommit: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cases := []struct {
		stmt, index string
		args        string
	}{
		{stmtReadAll, "events_feed", `('0', 0, 500, '')`},
		{stmtReadAllCategory, "events_category_feed", `('0', 0, 500, 'c3', '')`},
		{stmtReadAllSince, "events_feed", `('0', 0, 500, now() - interval '1 hour', '')`},
		{stmtHead, "events_feed", `('')`},
		// A tenant's reads seek to its rows as well.
		{stmtReadAll, "events_feed", `('0', 0, 500, 'acme')`},
		{stmtReadAllCategory, "events_category_feed", `('0', 0, 500, 'c3', 'acme')`},
		{stmtHead, "events_feed", `('acme')`},
	}
	conn, err := db.Connx(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, mode := range []string{"force_custom_plan", "force_generic_plan"} {
		testdb.Exec(t, conn, `SET plan_cache_mode = `+mode)
		for _, c := range cases {
			testdb.Exec(t, conn, `DEALLOCATE ALL`, `PREPARE q AS `+s.stmts.text[c.stmt])
			rows, err := conn.QueryxContext(ctx, `EXPLAIN EXECUTE q`+c.args)
			if err != nil {
				t.Fatal(err)
			}
			var plan []string
			for rows.Next() {
				var line string
				if err := rows.Scan(&line); err != nil {
					t.Fatal(err)
				}
				plan = append(plan, line)
			}
			rows.Close()
			text := strings.Join(plan, "\n")
			if !strings.Contains(text, c.index) || strings.Contains(text, "Sort") || strings.Contains(text, "Seq Scan") {
				t.Errorf("%s (%s): want an ordered scan of %s, got:\n%s", c.stmt, mode, c.index, text)
			}
		}
	}
}
