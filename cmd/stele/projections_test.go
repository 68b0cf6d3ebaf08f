package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/projection"
)

var errPoison = errors.New("cannot handle a Poison event")

// TestProjectionsAndDLQ runs a projection that parks its poison events and
// looks at it through the CLI, as an operator would: status, the dead
// letters, a discard, and a retry that the running projection carries out.
func TestProjectionsAndDLQ(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			c, store := newCLI(t, driver)
			db := testdb.Open(t, driver)
			testdb.Exec(t, db, `CREATE TABLE "`+c.schema+`".seen (event_id uuid PRIMARY KEY, stream_id text NOT NULL)`)

			// The read model: one row per event handled. Poison events fail
			// until their stream is marked fixed.
			var fixed sync.Map
			h := projection.TxHandlerFunc(func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
				if _, ok := fixed.Load(e.StreamID); e.Type == "Poison" && !ok {
					return errPoison
				}
				_, err := tx.ExecContext(ctx, `INSERT INTO "`+c.schema+`".seen VALUES ($1, $2)`, e.ID, e.StreamID)
				return err
			})
			r, err := projection.NewRunner(store, h, projection.Config{
				Name: "orders", DB: db, Schema: c.schema, Policy: projection.PolicyPark, Retries: 1, Backoff: time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Start(ctx); err != nil {
				t.Fatal(err)
			}
			defer r.Stop(ctx)
			handled := func(id string) bool {
				var n int
				if err := db.Get(&n, `SELECT count(*) FROM "`+c.schema+`".seen WHERE event_id = $1`, id); err != nil {
					t.Fatal(err)
				}
				return n == 1
			}
			caughtUp := func(last eventstore.Position) func() bool {
				return func() bool { st, err := r.Status(ctx); return err == nil && st.Position == last }
			}

			appendEvents(t, store, "order-1", "OrderPlaced", "OrderPaid")
			appendEvents(t, store, "order-2", "OrderPlaced", "Poison")
			last := appendEvents(t, store, "order-3", "OrderPlaced").LastPosition
			wait.Until(t, "the projection to pass the poison event", caughtUp(last))

			t.Run("status", func(t *testing.T) {
				assertRows(t, c.mustRun("projections", "status"), [][]string{
					{"NAME", "STATE", "CHECKPOINT", "LAG_EVENTS", "LAG_SECONDS", "DEAD_LETTERS", "LAST_CHECKPOINT_AT"},
					{"orders", "running", last.String(), "0", "0.0", "1"},
				})
				var st struct {
					Name        string     `json:"name"`
					Checkpoint  string     `json:"checkpoint"`
					LagEvents   int        `json:"lag_events"`
					DeadLetters int        `json:"dead_letters"`
					UpdatedAt   *time.Time `json:"last_checkpoint_at"`
				}
				out := c.mustRun("projections", "status", "--json")
				if err := json.Unmarshal([]byte(out), &st); err != nil {
					t.Fatalf("%v in %q", err, out)
				}
				if st.Name != "orders" || st.Checkpoint != last.String() || st.LagEvents != 0 || st.DeadLetters != 1 ||
					st.UpdatedAt == nil || time.Since(*st.UpdatedAt) > time.Minute {
					t.Errorf("status --json: %s", out)
				}
			})

			var parked deadLetterJSON
			t.Run("dlq ls", func(t *testing.T) {
				out := c.mustRun("dlq", "ls")
				rows := fields(out)
				if len(rows) != 2 {
					t.Fatalf("dlq ls printed\n%s\nwant a header and one dead letter", out)
				}
				assertRows(t, out, [][]string{
					{"ID", "PROJECTION", "STREAM", "VERSION", "TYPE", "ATTEMPTS", "FAILED_AT", "ERROR"},
					{rows[1][0], "orders", "order-2", "2", "Poison", "2"},
				})
				if msg := strings.Join(rows[1][7:], " "); !strings.Contains(msg, errPoison.Error()) {
					t.Errorf("error column %q does not give the handler's error", msg)
				}
				out = c.mustRun("dlq", "ls", "--projection", "orders", "--json")
				if err := json.Unmarshal([]byte(out), &parked); err != nil {
					t.Fatalf("%v in %q", err, out)
				}
				if strconv.FormatInt(parked.ID, 10) != rows[1][0] || parked.StreamID != "order-2" || parked.Version != 2 ||
					parked.Type != "Poison" || parked.Attempts != 2 || !strings.Contains(parked.Error, errPoison.Error()) {
					t.Errorf("dlq ls --json: %s", out)
				}
				assertRows(t, c.mustRun("dlq", "ls", "--projection", "invoices"), [][]string{
					{"ID", "PROJECTION", "STREAM", "VERSION", "TYPE", "ATTEMPTS", "FAILED_AT", "ERROR"},
				})
			})
			if parked.ID == 0 {
				t.FailNow()
			}

			t.Run("dlq discard", func(t *testing.T) {
				id := strconv.FormatInt(parked.ID, 10)
				out := c.mustRun("dlq", "discard", id)
				if want := "discarded dead letter " + id + " of projection orders: order-2 v2 (Poison), which failed with: "; !strings.HasPrefix(out, want) {
					t.Errorf("dlq discard printed %q, want it to start with %q", out, want)
				}
				if rows := fields(c.mustRun("dlq", "ls")); len(rows) != 1 {
					t.Errorf("dlq ls after the discard: %q", rows)
				}
				assertRows(t, c.mustRun("projections", "status"), [][]string{
					{"NAME", "STATE", "CHECKPOINT", "LAG_EVENTS", "LAG_SECONDS", "DEAD_LETTERS", "LAST_CHECKPOINT_AT"},
					{"orders", "running", last.String(), "0", "0.0", "0"},
				})
				if handled(parked.EventID) {
					t.Error("the discarded event is in the read model")
				}
				err := c.run(ctx, io.Discard, "dlq", "discard", id)
				if !errors.Is(err, projection.ErrNoDeadLetter) || !strings.Contains(err.Error(), "dead letter "+id+" not found") {
					t.Errorf("discarding twice: %v", err)
				}
			})

			t.Run("dlq retry of a missing id", func(t *testing.T) {
				err := c.run(ctx, io.Discard, "dlq", "retry", "987654321")
				if !errors.Is(err, projection.ErrNoDeadLetter) || !strings.Contains(err.Error(), "dead letter 987654321 not found in schema "+c.schema) {
					t.Errorf("got %v", err)
				}
			})

			t.Run("dlq retry", func(t *testing.T) {
				poison := appendEvents(t, store, "order-4", "Poison")
				wait.Until(t, "the second poison event to be parked", caughtUp(poison.LastPosition))
				var dl deadLetterJSON
				if out := c.mustRun("dlq", "ls", "--json"); json.Unmarshal([]byte(out), &dl) != nil || dl.StreamID != "order-4" {
					t.Fatalf("dlq ls --json: %q", out)
				}
				fixed.Store("order-4", true) // the application is fixed (here: in place)
				id := strconv.FormatInt(dl.ID, 10)
				if out := c.mustRun("dlq", "retry", id); !strings.HasPrefix(out, "requested a retry of dead letter "+id+";") {
					t.Errorf("dlq retry printed %q", out)
				}
				wait.Until(t, "the running projection to retry the dead letter", func() bool {
					return len(fields(c.mustRun("dlq", "ls"))) == 1
				})
				if !handled(dl.EventID) {
					t.Error("the retried event is not in the read model")
				}
			})

			t.Run("lag of a stopped projection", func(t *testing.T) {
				if err := r.Stop(ctx); err != nil {
					t.Fatal(err)
				}
				st0, err := r.Status(ctx)
				if err != nil {
					t.Fatal(err)
				}
				res := appendEvents(t, store, "order-5", "OrderPlaced", "OrderPaid", "OrderShipped")
				if err := eventstore.WaitForPosition(ctx, store, res.LastPosition); err != nil {
					t.Fatal(err)
				}
				var st struct {
					Checkpoint string  `json:"checkpoint"`
					LagEvents  int     `json:"lag_events"`
					LagSeconds float64 `json:"lag_seconds"`
				}
				out := c.mustRun("projections", "status", "--json")
				if err := json.Unmarshal([]byte(out), &st); err != nil {
					t.Fatalf("%v in %q", err, out)
				}
				if st.Checkpoint != st0.Position.String() || st.LagEvents != 3 || st.LagSeconds <= 0 {
					t.Errorf("status of the stopped projection: %s, want checkpoint %s, 3 events and some seconds of lag", out, st0.Position)
				}
			})
		})
	}
}

func TestProjectionsBadInput(t *testing.T) {
	db := testdb.Open(t, "postgres")
	c := cli{t: t, driver: "postgres", schema: testdb.Schema(t, db)} // never migrated
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"projections", "status"}, "has no projection tables; run stele migrate --schema " + c.schema},
		{[]string{"dlq", "ls"}, "has no projection tables"},
		{[]string{"dlq", "retry"}, "accepts 1 arg"},
		{[]string{"dlq", "retry", "x7"}, `dead letter id "x7": want the number stele dlq ls shows`},
		{[]string{"dlq", "discard", "0"}, `dead letter id "0"`},
		{[]string{"dlq", "discard", "1", "2"}, "accepts 1 arg"},
	} {
		err := c.run(context.Background(), io.Discard, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("stele %s: %v, want an error containing %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}
