package pgstore

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/internal/testdb"
)

// TestFeedPagesSeek: a page of the feed, the category feed or the head costs
// about what the rows it returns occupy, wherever the cursor is, for the
// store bound to no tenant and for a tenant, on a table analyzed and on one
// never analyzed (a bulk load read at once, before autovacuum looked at it:
// the planner has only default estimates). A plan that sorts, or that filters
// the cursor instead of seeking to it, reads every row before or after the
// cursor. Such plans once cost 250 ms a page instead of 2; before that, a
// sort ordered the feed by the transaction id as text ("10" before "9").
func TestFeedPagesSeek(t *testing.T) {
	for _, analyze := range []bool{true, false} {
		t.Run(fmt.Sprintf("analyzed=%v", analyze), func(t *testing.T) { feedPagesSeek(t, analyze) })
	}
}

func feedPagesSeek(t *testing.T, analyze bool) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	q := `"` + schema + `".events`
	testdb.Exec(t, db, `ALTER TABLE `+q+` SET (autovacuum_enabled = false)`,
		`INSERT INTO `+q+` (tenant_id, stream_id, version, category, event_id, event_type, content_type, data, metadata)
		SELECT CASE WHEN g % 4 = 0 THEN 'acme' ELSE '' END, 'c' || (g % 10) || '-' || (g % 100), g, 'c' || (g % 10), gen_random_uuid(), 'T', 'application/json', '\x7b7d', '{}'
		  FROM generate_series(1, 120000) g`)
	if analyze {
		testdb.Exec(t, db, `ANALYZE `+q)
	}
	s, err := New(db, &Config{Schema: schema, DisableGroupCommit: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var midXID string
	var midPos int64
	if err := db.QueryRowContext(ctx, `SELECT transaction_id::text, global_position FROM `+q+`
		ORDER BY global_position OFFSET 100000 LIMIT 1`).Scan(&midXID, &midPos); err != nil {
		t.Fatal(err)
	}
	conn, err := db.Connx(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	const limit = 1000
	type cursor struct {
		name string
		xid  string
		pos  int64
	}
	for _, cur := range []cursor{{"start", "0", 0}, {"middle", midXID, midPos}} {
		for _, tenant := range []string{"", "acme"} {
			for _, category := range []string{"", "c3"} {
				stmt, args := stmtReadAll, []any{cur.xid, cur.pos, limit, tenant}
				where := `tenant_id = $1`
				if category != "" {
					stmt, args = stmtReadAllCategory, []any{cur.xid, cur.pos, limit, category, tenant}
					where += ` AND category = '` + category + `'`
				}
				// The heap pages the page's rows occupy: what a seek reads,
				// give or take the index.
				var pages int
				if err := conn.QueryRowContext(ctx, `SELECT count(DISTINCT (ctid::text::point)[0]) FROM (SELECT ctid FROM `+q+`
					WHERE `+where+` AND (transaction_id, global_position) > ($2::text::xid8, $3) ORDER BY transaction_id, global_position LIMIT $4) x`,
					tenant, cur.xid, cur.pos, limit).Scan(&pages); err != nil {
					t.Fatal(err)
				}
				got := readBuffers(t, conn, s.stmts.text[stmt], args...)
				if got > 2*pages+30 {
					t.Errorf("%s from the %s, tenant %q: read %d buffers for rows on %d pages: not a seek", stmt, cur.name, tenant, got, pages)
				}
			}
		}
	}
	for _, tenant := range []string{"", "acme"} {
		if got := readBuffers(t, conn, s.stmts.text[stmtHead], tenant); got > 30 {
			t.Errorf("head of tenant %q: read %d buffers, want a backward seek to the last row", tenant, got)
		}
	}
}

// readBuffers runs query as a prepared statement, as the store does, and
// returns the shared buffers it touched, functions included.
func readBuffers(t *testing.T, conn *sqlx.Conn, query string, args ...any) int {
	t.Helper()
	lits := make([]string, len(args))
	for i, a := range args {
		lits[i] = fmt.Sprintf("'%v'", a)
	}
	testdb.Exec(t, conn, `DEALLOCATE ALL`, `PREPARE q AS `+query)
	// Warm the cache and the function's plan first: count a steady page.
	testdb.Exec(t, conn, `EXECUTE q(`+strings.Join(lits, ", ")+`)`)
	return buffersOf(t, conn, `EXECUTE q(`+strings.Join(lits, ", ")+`)`)
}
