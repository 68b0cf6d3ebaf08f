package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/outbox"
)

var outboxHeader = []string{"NAME", "OWNER", "EPOCH", "LEASE", "CHECKPOINT", "BACKLOG", "BACKLOG_SECONDS",
	"PUBLISHED", "LAST_LATENCY_MS", "LAST_PUBLISH_AT"}

// startRelay runs r until the returned stop is called (or the test ends);
// stop returns once Run did, having released its lease.
func startRelay(t *testing.T, r *outbox.Relay) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	stop = sync.OnceFunc(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("relay ended with %v, want context.Canceled", err)
		}
	})
	t.Cleanup(stop)
	return stop
}

// ackAll consumes topic from pubsub, acking every message, and counts them.
func ackAll(t *testing.T, pubsub message.Subscriber, topic string) func() int {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	msgs, err := pubsub.Subscribe(ctx, topic)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	var mu sync.Mutex
	n := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m := range msgs {
			mu.Lock()
			n++
			mu.Unlock()
			m.Ack()
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return func() int { mu.Lock(); defer mu.Unlock(); return n }
}

type failingPublisher struct{}

var errBrokerDown = errors.New("broker down")

func (failingPublisher) Publish(string, ...*message.Message) error { return errBrokerDown }
func (failingPublisher) Close() error                              { return nil }

// relayStatus runs outbox status --json and decodes its lines by name.
func (c cli) relayStatus(args ...string) map[string]relayJSON {
	c.t.Helper()
	out := c.mustRun(append([]string{"outbox", "status", "--json"}, args...)...)
	got := map[string]relayJSON{}
	for line := range strings.Lines(out) {
		var r relayJSON
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			c.t.Fatalf("%v in %q", err, out)
		}
		got[r.Name] = r
	}
	return got
}

// TestOutboxStatus runs real relays against the schema and looks at them
// through the CLI: one that publishes, one whose broker refuses everything.
func TestOutboxStatus(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			c, store := newCLI(t, driver)
			db := testdb.Open(t, driver)
			quiet := slog.New(slog.DiscardHandler)

			t.Run("no relays", func(t *testing.T) {
				assertRows(t, c.mustRun("outbox", "status"), [][]string{outboxHeader})
				if out := c.mustRun("outbox", "status", "--json"); out != "" {
					t.Errorf("status --json without relays printed %q", out)
				}
			})

			pubsub := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, watermill.NopLogger{})
			t.Cleanup(func() { _ = pubsub.Close() }) // after the subscriber and the relay stopped
			received := ackAll(t, pubsub, outbox.DefaultTopic)
			relay, err := outbox.NewRelay(store, outbox.Config{
				Name: "public", Publisher: pubsub, DB: db, Schema: c.schema, Owner: "relay-a", Logger: quiet,
			})
			if err != nil {
				t.Fatal(err)
			}
			stopRelay := startRelay(t, relay)
			appendEvents(t, store, "order-1", "OrderPlaced", "OrderPaid")
			last := appendEvents(t, store, "order-2", "OrderPlaced").LastPosition
			wait.Until(t, "the relay to publish three events", func() bool {
				st, err := relay.Status(ctx)
				return err == nil && st.Checkpoint == last && received() == 3
			})

			t.Run("running", func(t *testing.T) {
				out := c.mustRun("outbox", "status")
				assertRows(t, out, [][]string{outboxHeader, {"public", "relay-a", "1"}})
				row := fields(out)[1]
				if len(row) != len(outboxHeader) {
					t.Fatalf("row %q, want %d columns", row, len(outboxHeader))
				}
				if until, err := time.Parse(time.RFC3339, row[3]); err != nil || !until.After(time.Now().Add(-time.Second)) {
					t.Errorf("LEASE %q, want the time the held lease runs until", row[3])
				}
				if got, want := row[4:8], []string{last.String(), "0", "0.0", "3"}; strings.Join(got, " ") != strings.Join(want, " ") {
					t.Errorf("CHECKPOINT..PUBLISHED = %q, want %q", got, want)
				}
				if ms, err := strconv.ParseFloat(row[8], 64); err != nil || ms < 0 || ms > 60_000 {
					t.Errorf("LAST_LATENCY_MS %q", row[8])
				}
				if at, err := time.Parse(time.RFC3339, row[9]); err != nil || time.Since(at) > time.Minute {
					t.Errorf("LAST_PUBLISH_AT %q", row[9])
				}

				r := c.relayStatus("public")["public"]
				if r.Lease != leaseHeld || r.LeaseUntil == nil || r.Checkpoint != last.String() || r.Backlog != 0 ||
					r.Published != 3 || r.Epoch != 1 || r.Owner != "relay-a" || r.LastPublishAt == nil ||
					r.LastLatencyMS == nil || *r.LastLatencyMS < 0 || r.LastError != "" {
					t.Errorf("status --json public: %+v", r)
				}
			})

			t.Run("stopped with a backlog", func(t *testing.T) {
				stopRelay()
				res := appendEvents(t, store, "order-3", "OrderPlaced", "OrderPaid")
				if err := eventstore.WaitForPosition(ctx, store, res.LastPosition); err != nil {
					t.Fatal(err)
				}
				out := c.mustRun("outbox", "status", "public")
				assertRows(t, out, [][]string{outboxHeader, {"public", "relay-a", "1", "released", last.String(), "2"}})
				if s, err := strconv.ParseFloat(fields(out)[1][6], 64); err != nil || s < 0 {
					t.Errorf("BACKLOG_SECONDS %q", fields(out)[1][6])
				}
				r := c.relayStatus()["public"]
				if r.Lease != leaseReleased || r.LeaseUntil != nil || r.Checkpoint != last.String() || r.Backlog != 2 ||
					r.BacklogSeconds <= 0 || r.Published != 3 {
					t.Errorf("status --json of the stopped relay: %+v", r)
				}
			})

			t.Run("failing", func(t *testing.T) {
				broken, err := outbox.NewRelay(store, outbox.Config{
					Name: "broken", Publisher: failingPublisher{}, DB: db, Schema: c.schema, Owner: "relay-b", Logger: quiet,
					Backoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
				})
				if err != nil {
					t.Fatal(err)
				}
				stop := startRelay(t, broken)
				wait.Until(t, "the broken relay to record its error", func() bool {
					// Until the relay's first loop the row may not exist yet.
					out, err := c.runErr("outbox", "status", "--json", "broken")
					var r relayJSON
					return err == nil && json.Unmarshal([]byte(out), &r) == nil && strings.Contains(r.LastError, errBrokerDown.Error())
				})
				stop()
				// As if its process had died: the lease runs out unreleased.
				testdb.Exec(t, db, `UPDATE "`+c.schema+`".outbox_relays SET lease_until = now() - interval '1 second' WHERE name = 'broken'`)

				all := c.relayStatus()
				r := all["broken"]
				if len(all) != 2 || r.Lease != leaseExpired || r.LeaseUntil == nil || r.Checkpoint != eventstore.Start.String() ||
					r.Backlog != 5 || r.Published != 0 || r.LastPublishAt != nil || r.LastLatencyMS != nil {
					t.Errorf("status --json of the broken relay: %+v (of %d relays)", r, len(all))
				}
				assertRows(t, c.mustRun("outbox", "status"), [][]string{
					outboxHeader,
					{"broken", "relay-b", "1", "expired", "0/0", "5"},
					{"public", "relay-a", "1", "released", last.String(), "2"},
				})
				if row := fields(c.mustRun("outbox", "status", "broken"))[1]; row[8] != "-" || row[9] != "-" {
					t.Errorf("latency and last publish of a relay that never published: %q", row[8:])
				}
			})

			t.Run("unknown relay", func(t *testing.T) {
				err := c.run(ctx, io.Discard, "outbox", "status", "nosuch")
				if !errors.Is(err, outbox.ErrNoRelay) || !strings.Contains(err.Error(), `no outbox relay "nosuch" in schema `+c.schema) {
					t.Errorf("got %v", err)
				}
			})
		})
	}
}

func TestOutboxBadInput(t *testing.T) {
	db := testdb.Open(t, "postgres")
	c := cli{t: t, driver: "postgres", schema: testdb.Schema(t, db)} // never migrated
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"outbox", "status"}, "has no outbox tables; run stele migrate --schema " + c.schema},
		{[]string{"outbox", "status", "a", "b"}, "accepts at most 1 arg"},
	} {
		err := c.run(context.Background(), io.Discard, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("stele %s: %v, want an error containing %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}

func TestLeaseState(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		until time.Time
		want  string
	}{
		{time.Time{}, leaseReleased},
		{now.Add(-time.Millisecond), leaseExpired},
		{now, leaseExpired},
		{now.Add(time.Second), leaseHeld},
	} {
		if got := relayJSONOf(outbox.Status{LeaseUntil: tc.until}, now).Lease; got != tc.want {
			t.Errorf("lease until %v at %v: %s, want %s", tc.until, now, got, tc.want)
		}
	}
	if got := lagText(maxLag); got != "100000+" {
		t.Errorf("lagText(maxLag) = %q", got)
	}
}
