package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

func TestMain(m *testing.M) {
	// testdb keeps one pool per driver for the whole run and offers no way to
	// close them, so their connection openers outlive the tests.
	testdb.VerifyMain(m)
}

// cli runs stele against a test schema.
type cli struct {
	t      *testing.T
	driver string
	schema string
}

func newCLI(t *testing.T, driver string) (cli, *pgstore.Store) {
	db := testdb.Open(t, driver)
	c := cli{t: t, driver: driver, schema: testdb.Schema(t, db)}
	c.mustRun("migrate")
	store, err := pgstore.New(db, &pgstore.Config{Schema: c.schema})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	return c, store
}

func (c cli) run(ctx context.Context, w io.Writer, args ...string) error {
	cmd := newRootCmd()
	cmd.SetArgs(append([]string{"--dsn", testdb.DSN(), "--driver", c.driver, "--schema", c.schema}, args...))
	cmd.SetOut(w)
	cmd.SetErr(w)
	return cmd.ExecuteContext(ctx)
}

func (c cli) mustRun(args ...string) string {
	c.t.Helper()
	var out bytes.Buffer
	if err := c.run(context.Background(), &out, args...); err != nil {
		c.t.Fatalf("stele %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

// fields splits output into lines of whitespace-separated fields, so tests
// need not depend on column widths.
func fields(out string) [][]string {
	var rows [][]string
	for line := range strings.Lines(out) {
		rows = append(rows, strings.Fields(line))
	}
	return rows
}

func appendEvents(t *testing.T, s eventstore.Store, stream string, types ...string) eventstore.AppendResult {
	t.Helper()
	var events []eventstore.EventData
	for _, typ := range types {
		events = append(events, eventstore.EventData{
			Type:     typ,
			Data:     fmt.Appendf(nil, `{"type": %q}`, typ),
			Metadata: eventstore.Metadata{CorrelationID: "req-1"},
		})
	}
	res, err := s.Append(context.Background(), stream, eventstore.Any, events)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestMigrateTwice(t *testing.T) {
	db := testdb.Open(t, "postgres")
	c := cli{t: t, driver: "postgres", schema: testdb.Schema(t, db)}
	all := pgstore.Migrations()
	names := make([]string, len(all))
	for i, m := range all {
		names[i] = m.String()
	}
	latest := strconv.Itoa(all[len(all)-1].Version)
	if got, want := c.mustRun("migrate"), "applied "+strings.Join(names, ", ")+"; schema "+c.schema+" at version "+latest+"\n"; got != want {
		t.Errorf("first migrate printed %q, want %q", got, want)
	}
	if got, want := c.mustRun("migrate"), "schema "+c.schema+" is up to date at version "+latest+"\n"; got != want {
		t.Errorf("second migrate printed %q, want %q", got, want)
	}
}

func TestBadArguments(t *testing.T) {
	for _, args := range [][]string{
		{"--driver", "mysql", "migrate"},
		{"streams", "show"},
		{"streams", "tail", "--after", "1/2x"},
		{"streams", "tail", "--from-start", "--after", "1/2"},
	} {
		cmd := newRootCmd()
		cmd.SetArgs(args)
		cmd.SetOut(io.Discard)
		cmd.SetErr(io.Discard)
		if err := cmd.Execute(); err == nil {
			t.Errorf("stele %s: no error", strings.Join(args, " "))
		}
	}
}

func TestStreams(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			c, store := newCLI(t, driver)
			first := appendEvents(t, store, "order-1", "OrderPlaced", "OrderPaid")
			appendEvents(t, store, "order-2", "OrderPlaced")
			appendEvents(t, store, "customer-1", "CustomerRegistered")
			if _, err := store.Append(context.Background(), "blob-1", eventstore.Any,
				[]eventstore.EventData{{Type: "Blob", Data: []byte{0xff, 0x00, 0x01}, ContentType: "application/octet-stream"}}); err != nil {
				t.Fatal(err)
			}

			t.Run("ls", func(t *testing.T) {
				assertRows(t, c.mustRun("streams", "ls"), [][]string{
					{"STREAM", "CATEGORY", "VERSION", "UPDATED_AT"},
					{"blob-1", "blob", "1"},
					{"customer-1", "customer", "1"},
					{"order-1", "order", "2"},
					{"order-2", "order", "1"},
				})
				assertRows(t, c.mustRun("streams", "ls", "--category", "order", "--limit", "1"), [][]string{
					{"STREAM", "CATEGORY", "VERSION", "UPDATED_AT"},
					{"order-1", "order", "2"},
				})
			})

			t.Run("show", func(t *testing.T) {
				out := c.mustRun("streams", "show", "order-1")
				assertRows(t, out, [][]string{
					{"VERSION", "POSITION", "TYPE", "RECORDED_AT", "METADATA", "DATA"},
					{"1", first.FirstPosition.String(), "OrderPlaced"},
					{"2", first.LastPosition.String(), "OrderPaid"},
				})
				if got := strings.Join(fields(out)[1][4:], " "); got != `correlation=req-1 {"type":"OrderPlaced"}` {
					t.Errorf("metadata and data of v1: %q", got)
				}
				assertRows(t, c.mustRun("streams", "show", "order-1", "--backward", "--limit", "1"), [][]string{
					{"VERSION", "POSITION", "TYPE", "RECORDED_AT", "METADATA", "DATA"},
					{"2", first.LastPosition.String(), "OrderPaid"},
				})
				blob := fields(c.mustRun("streams", "show", "blob-1"))
				if got := strings.Join(blob[1][4:], " "); got != "- <3 bytes: ff0001>" {
					t.Errorf("binary data shown as %q", got)
				}
			})

			t.Run("show --json", func(t *testing.T) {
				out := c.mustRun("streams", "show", "order-1", "--from", "2", "--json")
				var e struct {
					StreamID string          `json:"stream_id"`
					Version  int             `json:"version"`
					Position string          `json:"position"`
					Type     string          `json:"type"`
					Data     json.RawMessage `json:"data"`
					Metadata struct {
						CorrelationID string `json:"correlation_id"`
					} `json:"metadata"`
				}
				if err := json.Unmarshal([]byte(out), &e); err != nil {
					t.Fatalf("%v in %q", err, out)
				}
				if e.StreamID != "order-1" || e.Version != 2 || e.Position != first.LastPosition.String() ||
					e.Type != "OrderPaid" || string(e.Data) != `{"type":"OrderPaid"}` || e.Metadata.CorrelationID != "req-1" {
					t.Errorf("got %+v from %q", e, out)
				}
			})

			t.Run("show missing stream", func(t *testing.T) {
				err := c.run(context.Background(), io.Discard, "streams", "show", "order-404")
				if err == nil || !strings.Contains(err.Error(), `"order-404" has no events`) {
					t.Errorf("got error %v", err)
				}
			})

			t.Run("tail --from-start", func(t *testing.T) {
				ship := sync.OnceFunc(func() { appendEvents(t, store, "order-2", "OrderShipped") })
				lines := c.tail(t, 6, ship, "streams", "tail", "--from-start")
				want := []string{"order-1 1 OrderPlaced", "order-1 2 OrderPaid", "order-2 1 OrderPlaced",
					"customer-1 1 CustomerRegistered", "blob-1 1 Blob", "order-2 2 OrderShipped"}
				assertTail(t, lines, want)
				if !strings.HasPrefix(lines[0], first.FirstPosition.String()+" ") {
					t.Errorf("line %q does not start with position %s", lines[0], first.FirstPosition)
				}
			})

			t.Run("tail --after --category", func(t *testing.T) {
				lines := c.tail(t, 3, func() {}, "streams", "tail", "--after", first.FirstPosition.String(), "--category", "order")
				assertTail(t, lines, []string{"order-1 2 OrderPaid", "order-2 1 OrderPlaced", "order-2 2 OrderShipped"})
			})

			t.Run("tail from the end", func(t *testing.T) {
				// The command finds the end before subscribing; appending until
				// something arrives avoids guessing when that is done.
				lines := c.tail(t, 1, func() { appendEvents(t, store, "order-3", "OrderPlaced") }, "streams", "tail")
				for _, l := range lines {
					if f := strings.Fields(l); len(f) != 4 || f[1] != "order-3" {
						t.Errorf("tail printed %q, an event from before it started", l)
					}
				}
			})
		})
	}
}

// tail runs a tail command until it has printed n lines, calling during
// every so often meanwhile, then stops it the way Ctrl-C does.
func (c cli) tail(t *testing.T, n int, during func(), args ...string) []string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- c.run(ctx, &out, args...) }()
	deadline := time.After(20 * time.Second)
	for {
		if lines := out.lines(); len(lines) >= n {
			cancel()
			if err := <-done; err != nil {
				t.Fatalf("tail: %v", err)
			}
			return out.lines()
		}
		select {
		case err := <-done:
			t.Fatalf("tail ended early: %v\n%s", err, out.String())
		case <-deadline:
			cancel()
			<-done
			t.Fatalf("tail printed %q, want %d lines", out.String(), n)
		case <-time.After(200 * time.Millisecond):
			during()
		}
	}
}

// assertTail checks tail lines without their positions.
func assertTail(t *testing.T, lines, want []string) {
	t.Helper()
	var got []string
	for _, l := range lines {
		_, rest, _ := strings.Cut(l, " ")
		got = append(got, rest)
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("tail printed\n%s\nwant (after positions)\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
}

// assertRows checks that each output row starts with the wanted fields.
func assertRows(t *testing.T, out string, want [][]string) {
	t.Helper()
	got := fields(out)
	ok := len(got) == len(want)
	for i := 0; ok && i < len(want); i++ {
		ok = len(got[i]) >= len(want[i]) && strings.Join(got[i][:len(want[i])], " ") == strings.Join(want[i], " ")
	}
	if !ok {
		t.Errorf("output:\n%s\nwant rows starting with %q", out, want)
	}
}

// syncBuffer is written by the command's goroutine and read by the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *syncBuffer) lines() []string {
	var out []string
	for l := range strings.Lines(b.String()) {
		out = append(out, strings.TrimSuffix(l, "\n"))
	}
	return out
}
