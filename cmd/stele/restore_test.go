package main

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestRestoreCommands: restore-check says nothing to do on a schema that
// never left its cluster, and restore-repair refuses; after a faked restore
// from another cluster (every stored id far beyond this one's counter),
// restore-check exits with an error and explains, restore-repair (which
// needs --actor) renumbers and prints what it moved, restore-map maps an
// old position, and restore-check is satisfied again.
func TestRestoreCommands(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			c, store := newCLI(t, driver)
			db := testdb.Open(t, driver)
			for i := range 6 {
				appendEvents(t, store, "order-"+string(rune('a'+i%3)), "OrderPlaced", "OrderPaid")
			}
			var before []eventstore.Event
			deadline := time.Now().Add(30 * time.Second)
			for len(before) != 12 && time.Now().Before(deadline) { // another session may hold the feed back a moment
				var err error
				if before, err = store.ReadAll(ctx, eventstore.ReadAllOpts{}); err != nil {
					t.Fatal(err)
				}
			}
			if len(before) != 12 {
				t.Fatalf("the feed shows %d of 12 events", len(before))
			}
			cp := before[3].Position
			q := `"` + c.schema + `"`
			testdb.Exec(t, db, `INSERT INTO `+q+`.projection_checkpoints (name, transaction_id, position) VALUES ('orders', '`+
				uintText(cp.TxID)+`', `+intText(cp.GlobalPosition)+`)`)

			var out bytes.Buffer
			if err := c.run(ctx, &out, "restore-check"); err != nil {
				t.Fatalf("restore-check on an untouched schema: %v\n%s", err, out.String())
			}
			if !strings.Contains(out.String(), "ok: the stored transaction ids belong to this cluster") {
				t.Fatalf("restore-check printed\n%s", out.String())
			}
			out.Reset()
			if err := c.run(ctx, &out, "restore-repair", "--actor", "ops"); !errors.Is(err, pgstore.ErrNothingToRepair) {
				t.Fatalf("restore-repair on an untouched schema: %v, want it refused", err)
			}

			const shift = 1 << 40
			fakeRestore(t, db, c.schema, shift)
			out.Reset()
			err := c.run(ctx, &out, "restore-check")
			if !errors.Is(err, errRepairNeeded) {
				t.Fatalf("restore-check after a restore: %v, want errRepairNeeded (exit status 1)\n%s", err, out.String())
			}
			for _, want := range []string{"REPAIR NEEDED", "the data was recorded in cluster 1234", "12 of 12 events carry a transaction id at or beyond",
				"1 checkpoints are beyond", "stele restore-repair --schema " + c.schema + " --actor NAME"} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("restore-check output lacks %q:\n%s", want, out.String())
				}
			}
			t.Logf("stele restore-check (%v):\n%s", err, out.String())
			out.Reset()
			if err := c.run(ctx, &out, "restore-repair"); err == nil || !strings.Contains(err.Error(), "actor") {
				t.Fatalf("restore-repair without --actor: %v", err)
			}
			got := c.mustRun("restore-repair", "--actor", "ops")
			t.Logf("stele restore-repair --actor ops:\n%s", got)
			for _, want := range []string{"repaired schema " + c.schema + " (audit #", "was 1234", "renumbered 12 events:",
				"feed order and global positions unchanged", "mapped the last writer of 3 streams", "moved 1 stored positions:", "projection_checkpoints"} {
				if !strings.Contains(got, want) {
					t.Errorf("restore-repair output lacks %q:\n%s", want, got)
				}
			}
			after, err := store.ReadAll(ctx, eventstore.ReadAllOpts{})
			if err != nil || len(after) != 12 {
				t.Fatalf("after the repair the feed shows %d events (%v)", len(after), err)
			}
			for i := range after {
				if after[i].ID != before[i].ID {
					t.Fatalf("event %d changed place", i)
				}
			}
			old := eventstore.Position{TxID: cp.TxID + shift, GlobalPosition: cp.GlobalPosition}
			if got, want := c.mustRun("restore-map", old.String()), old.String()+" -> "+after[3].Position.String()+"\n"; got != want {
				t.Errorf("restore-map printed %q, want %q", got, want)
			}
			if got := c.mustRun("restore-check"); !strings.Contains(got, "ok: ") {
				t.Errorf("restore-check after the repair:\n%s", got)
			}
		})
	}
}

// fakeRestore makes the schema look restored from another cluster: another
// recorded identity, every stored id moved by shift, through the audited path.
func fakeRestore(t *testing.T, db *sqlx.DB, schema string, shift uint64) {
	t.Helper()
	q := `"` + schema + `"`
	s := uintText(shift)
	_, err := pgstore.Admin(context.Background(), db, schema, pgstore.AdminAction{Actor: "test", Action: "fake-restore"}, func(tx *sqlx.Tx) error {
		for _, stmt := range []string{
			`UPDATE ` + q + `.cluster_identity SET system_identifier = '1234'`,
			`UPDATE ` + q + `.events SET transaction_id = (transaction_id::text::numeric + ` + s + `)::text::xid8`,
			`UPDATE ` + q + `.streams SET last_xid = (last_xid::text::numeric + ` + s + `)::text::xid8`,
			`UPDATE ` + q + `.projection_checkpoints SET transaction_id = (transaction_id::text::numeric + ` + s + `)::text::xid8`,
		} {
			if _, err := tx.Exec(stmt); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func uintText(v uint64) string { return strconv.FormatUint(v, 10) }

func intText(v int64) string { return strconv.FormatInt(v, 10) }
