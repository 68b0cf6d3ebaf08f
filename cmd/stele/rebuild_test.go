package main

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/projection"
)

// TestProjectionsRebuild: `stele projections rebuild` asks the application
// (here a ServeRebuilds in the test) to rebuild a read model into a new slot;
// the CLI shows progress, and readers are switched to the rebuilt rows.
func TestProjectionsRebuild(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, store := newCLI(t, "postgres")
	db := testdb.Open(t, "postgres")
	s := `"` + c.schema + `"`
	for _, slot := range []string{"a", "b"} {
		testdb.Exec(t, db, `CREATE TABLE `+s+`.seen_`+slot+` (event_id uuid PRIMARY KEY, stream_id text NOT NULL)`)
	}
	testdb.Exec(t, db, `CREATE VIEW `+s+`.seen AS SELECT * FROM `+s+`.seen_a`)
	var last eventstore.Position
	for i := range 20 {
		last = appendEvents(t, store, "order-"+string(rune('a'+i%5)), "OrderPlaced").LastPosition
	}
	// The rebuild's total is the feed's head when it starts, and the feed
	// shows the appends once every older transaction on the server (other
	// tests' too) has ended: wait for that, so the progress bar has a total.
	if err := eventstore.WaitForPosition(ctx, store, last); err != nil {
		t.Fatal(err)
	}
	rc := projection.RebuildConfig{
		Config: projection.Config{Name: "orders", DB: db, Schema: c.schema},
		Handler: func(slot string) (any, error) {
			return projection.TxHandlerFunc(func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
				_, err := tx.ExecContext(ctx, `INSERT INTO `+s+`.seen_`+slot+` VALUES ($1, $2)`, e.ID, e.StreamID)
				return err
			}), nil
		},
		Switch: func(ctx context.Context, tx *sqlx.Tx, slot string) error {
			_, err := tx.ExecContext(ctx, `CREATE OR REPLACE VIEW `+s+`.seen AS SELECT * FROM `+s+`.seen_`+slot)
			return err
		},
	}
	var mu sync.Mutex
	var switched []*projection.Runner
	var serving sync.WaitGroup
	serving.Go(func() {
		projection.ServeRebuilds(ctx, store, projection.ServeConfig{
			DB: db, Schema: c.schema, Rebuilds: map[string]projection.RebuildConfig{"orders": rc}, Poll: 20 * time.Millisecond,
			Switched: func(name, slot string, r *projection.Runner) {
				mu.Lock()
				switched = append(switched, r)
				mu.Unlock()
			},
		})
	})
	defer func() {
		cancel()
		serving.Wait()
		for _, r := range switched {
			r.Stop(context.Background())
		}
	}()

	var out, progress bytes.Buffer
	cmd := newRootCmd()
	cmd.SetArgs([]string{"--dsn", testdb.DSN(), "--schema", c.schema, "projections", "rebuild", "orders", "--slot", "b"})
	cmd.SetOut(&out)
	cmd.SetErr(&progress)
	if err := cmd.ExecuteContext(ctx); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "rebuilt orders into slot b and switched readers to it (") {
		t.Fatalf("rebuild printed %q", out.String())
	}
	if !strings.Contains(progress.String(), "orders@b") {
		t.Errorf("no progress bar on stderr: %q", progress.String())
	}
	var n int
	if err := db.Get(&n, `SELECT count(*) FROM `+s+`.seen`); err != nil || n != 20 {
		t.Fatalf("the view shows %d rows (%v), want the 20 rebuilt ones", n, err)
	}
	if slot, _ := projection.CurrentSlot(ctx, db, c.schema, "orders"); slot != "b" {
		t.Fatalf("current slot %q, want b", slot)
	}
	// A request for a name nobody serves is filed and waits; --no-wait returns.
	if got := c.mustRun("projections", "rebuild", "nobody", "--no-wait", "--slot", "x"); got != "requested a rebuild of nobody into slot x\n" {
		t.Fatalf("--no-wait printed %q", got)
	}
	if err := c.run(ctx, &out, "projections", "rebuild", "nobody", "--no-wait"); err == nil || !strings.Contains(err.Error(), "already under way") {
		t.Fatalf("a second request while one is pending: %v", err)
	}
}
