package pgstore_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestAdminIsTheOnlyWayToChangeHistory: outside Admin, even the owner
// cannot change an event; inside Admin the change is made and audited; a
// failed admin action leaves neither the change nor its audit row; the
// audit trail itself cannot be changed.
func TestAdminIsTheOnlyWayToChangeHistory(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	for _, s := range []string{"keep-1", "drop-1"} {
		if _, err := store.Append(ctx, s, eventstore.NoStream, []eventstore.EventData{{Type: "x", Data: []byte(`{}`)}}); err != nil {
			t.Fatal(err)
		}
	}
	q := `"` + schema + `"`
	if _, err := db.ExecContext(ctx, `DELETE FROM `+q+`.events WHERE stream_id = 'drop-1'`); err == nil || !strings.Contains(err.Error(), "immutable") {
		t.Fatalf("a plain DELETE: %v, want refused", err)
	}
	_, err = pgstore.Admin(ctx, db, schema, pgstore.AdminAction{Actor: "ops", Action: "test-fail", Target: "drop-1"},
		func(tx *sqlx.Tx) error {
			if _, err := tx.ExecContext(ctx, `DELETE FROM `+q+`.events WHERE stream_id = 'drop-1'`); err != nil {
				return err
			}
			return errors.New("changed my mind")
		})
	if err == nil {
		t.Fatal("a failing admin action reported success")
	}
	id, err := pgstore.Admin(ctx, db, schema, pgstore.AdminAction{Actor: "ops", Action: "tombstone", Target: "drop-1", Detail: map[string]int{"events": 1}},
		func(tx *sqlx.Tx) error {
			_, err := tx.ExecContext(ctx, `DELETE FROM `+q+`.events WHERE stream_id = 'drop-1'`)
			return err
		})
	if err != nil {
		t.Fatal(err)
	}
	var left int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM `+q+`.events`).Scan(&left); err != nil || left != 1 {
		t.Fatalf("%d events left (%v), want keep-1 only", left, err)
	}
	trail, err := pgstore.Audit(ctx, db, schema, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(trail) != 1 || trail[0].ID != id || trail[0].Actor != "ops" || trail[0].Action != "tombstone" ||
		trail[0].Target != "drop-1" || trail[0].Role != "postgres" || string(trail[0].Detail) != `{"events": 1}` {
		t.Fatalf("audit trail %+v", trail)
	}
	// A made-up audit id does not open the path.
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = tx.ExecContext(ctx, `SELECT set_config('stele.admin_action', '999999', true)`)
	_, err = tx.ExecContext(ctx, `DELETE FROM `+q+`.events`)
	_ = tx.Rollback()
	if err == nil {
		t.Fatal("a forged stele.admin_action let a DELETE through")
	}
	if _, err := db.ExecContext(ctx, `DELETE FROM `+q+`.admin_audit`); err == nil {
		t.Fatal("the audit trail could be deleted")
	}
	if _, err := pgstore.Admin(ctx, db, schema, pgstore.AdminAction{Action: "x"}, nil); !errors.Is(err, pgstore.ErrAdminAction) {
		t.Fatalf("an action without actor: %v", err)
	}
}
