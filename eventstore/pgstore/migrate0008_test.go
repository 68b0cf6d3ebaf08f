package pgstore_test

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestMigration0008OnPopulatedSchema: 0008 applies to a schema populated at
// version 7, and the store, snapshots and checkpoints work on as before.
func TestMigration0008OnPopulatedSchema(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	q := `"` + schema + `"`
	files, _ := filepath.Glob("migrations/*.sql")
	sort.Strings(files)
	testdb.Exec(t, db, `CREATE SCHEMA IF NOT EXISTS `+q,
		`CREATE TABLE IF NOT EXISTS `+q+`.schema_migrations (version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`)
	for i, f := range files[:7] {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		testdb.Exec(t, db, strings.ReplaceAll(string(b), "{{schema}}", q))
		if _, err := db.Exec(`INSERT INTO `+q+`.schema_migrations VALUES ($1, 'x')`, i+1); err != nil {
			t.Fatal(err)
		}
	}
	id1, id2 := uuid.New(), uuid.New()
	testdb.Exec(t, db,
		`SELECT * FROM `+q+`.append_events('{order-1,order-2}', '{-2,-2}', '{1,1}', '{1,1}', '{1,2}', '{1,1}',
			ARRAY['`+id1.String()+`','`+id2.String()+`']::uuid[], '{placed,placed}', '{application/json,application/json}',
			ARRAY['\x7b7d','\x7b7d']::bytea[], ARRAY['{}','{}']::jsonb[], false)`,
		`INSERT INTO `+q+`.snapshots (stream_id, version, schema_version, data) VALUES ('order-1', 1, 1, '\x00')`,
		`INSERT INTO `+q+`.projection_checkpoints (name, transaction_id, position) VALUES ('p', '5', 1)`,
		`INSERT INTO `+q+`.projection_dead_letters (projection, stream_id, version, transaction_id, position, event_id, event_type, error, attempts)
			VALUES ('p', 'order-1', 1, '5', 1, '`+id1.String()+`', 'placed', 'x', 1)`)
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		t.Fatalf("0008 on a populated schema: %v", err)
	}
	s, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v, err := s.StreamVersion(ctx, "order-1"); err != nil || v != 1 {
		t.Errorf("order-1 at %d (%v)", v, err)
	}
	// The same batch again is an idempotent retry.
	res, err := s.Append(ctx, "order-1", eventstore.NoStream, []eventstore.EventData{{ID: id1, Type: "placed", Data: []byte(`{}`)}})
	if err != nil || res.FirstVersion != 1 {
		t.Errorf("retry of a pre-0008 append: %+v, %v", res, err)
	}
	// What a binary of the previous release still runs during a rolling deploy.
	if _, err := db.Exec(`INSERT INTO ` + q + `.projection_checkpoints (name, transaction_id, position, updated_at) VALUES ('p', '6', 2, now())
		ON CONFLICT (name) DO UPDATE SET transaction_id = excluded.transaction_id, position = excluded.position`); err != nil {
		t.Logf("previous release's checkpoint save after 0008: %v", err)
	}
	if _, err := s.Append(ctx, "order-1", 1, []eventstore.EventData{{Type: "paid", Data: []byte(`{}`)}}); err != nil {
		t.Errorf("append after 0008: %v", err)
	}
}
