package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/internal/testdb"
)

var (
	poisonHeader    = []string{"ID", "POISONED_AT", "TOPIC", "HANDLER", "UUID", "REASON"}
	poisonAllHeader = []string{"ID", "POISONED_AT", "TOPIC", "HANDLER", "UUID", "REPUBLISHED_AT", "REASON"}
)

// poisonMessage is what the router's poison-queue middleware hands the box:
// the message with notes saying why, where from and who gave up.
func poisonMessage(topic, handler, reason string, payload []byte, own map[string]string) *message.Message {
	msg := message.NewMessage(watermill.NewUUID(), payload)
	for k, v := range own {
		msg.Metadata.Set(k, v)
	}
	msg.Metadata.Set(middleware.ReasonForPoisonedKey, reason)
	msg.Metadata.Set(middleware.PoisonedTopicKey, topic)
	msg.Metadata.Set(middleware.PoisonedHandlerKey, handler)
	msg.Metadata.Set(middleware.PoisonedSubscriberKey, "*sql.Subscriber")
	return msg
}

// poisonLs runs bus poison ls --json with args and decodes its lines.
func (c cli) poisonLs(args ...string) []poisonedJSON {
	c.t.Helper()
	out := c.mustRun(append([]string{"bus", "poison", "ls", "--json"}, args...)...)
	var got []poisonedJSON
	for line := range strings.Lines(out) {
		var p poisonedJSON
		if err := json.Unmarshal([]byte(line), &p); err != nil {
			c.t.Fatalf("%v in %q", err, out)
		}
		got = append(got, p)
	}
	return got
}

// TestPoison fills the poison box as the router would, lists it, and
// re-publishes a message over the PostgreSQL bus to a subscriber of its
// original topic.
func TestPoison(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			c, _ := newCLI(t, driver)
			db := testdb.Open(t, driver)
			box, err := bus.NewPostgresPoisonBox(db, c.schema)
			if err != nil {
				t.Fatal(err)
			}

			assertRows(t, c.mustRun("bus", "poison", "ls"), [][]string{poisonHeader})

			longReason := "cannot parse order: " + strings.Repeat("x", 100) + "\nstack trace line 2"
			payload := []byte{0xff, 0x00, '{', '}'} // not text: must arrive byte for byte
			first := poisonMessage("orders", "billing", "invalid character 'x'", payload, map[string]string{"x-tenant": "acme"})
			second := poisonMessage("invoices", "mailer", longReason, []byte(`{"id":2}`), nil)
			if err := box.Publish(bus.PoisonTopic, first); err != nil {
				t.Fatal(err)
			}
			if err := box.Publish(bus.PoisonTopic, second); err != nil {
				t.Fatal(err)
			}

			var ids []string
			t.Run("ls", func(t *testing.T) {
				out := c.mustRun("bus", "poison", "ls")
				rows := fields(out)
				if len(rows) != 3 {
					t.Fatalf("poison ls printed\n%s\nwant a header and two messages", out)
				}
				ids = []string{rows[1][0], rows[2][0]}
				assertRows(t, out, [][]string{
					poisonHeader,
					{ids[0], rows[1][1], "orders", "billing", first.UUID, "invalid", "character", "'x'"},
					{ids[1], rows[2][1], "invoices", "mailer", second.UUID},
				})
				if at, err := time.Parse(time.RFC3339, rows[1][1]); err != nil || time.Since(at) > time.Minute {
					t.Errorf("POISONED_AT %q", rows[1][1])
				}
				if r := strings.Join(rows[2][5:], " "); len(r) != maxReason || !strings.HasPrefix(r, "cannot parse order: xxx") || !strings.HasSuffix(r, "x...") {
					t.Errorf("long reason shown as %q, want its first line cut to %d characters", r, maxReason)
				}

				got := c.poisonLs()
				if len(got) != 2 {
					t.Fatalf("ls --json: %+v", got)
				}
				p := got[0]
				if strconv.FormatInt(p.ID, 10) != ids[0] || p.UUID != first.UUID || p.Topic != "orders" || p.Handler != "billing" ||
					p.Reason != "invalid character 'x'" || !bytes.Equal(p.Payload, payload) || p.RepublishedAt != nil ||
					len(p.Metadata) != 1 || p.Metadata["x-tenant"] != "acme" {
					t.Errorf("ls --json, first message: %+v", p)
				}
				if got[1].Reason != longReason {
					t.Errorf("ls --json cut the reason: %q", got[1].Reason)
				}
				var stderr bytes.Buffer
				if err := c.run(ctx, &stderr, "bus", "poison", "ls", "--limit", "1"); err != nil {
					t.Fatal(err)
				}
				if out := stderr.String(); len(fields(out)) != 3 || !strings.Contains(out, "showing the oldest 1; there may be more") {
					t.Errorf("ls --limit 1 printed %q", out)
				}
			})
			if len(ids) != 2 {
				t.FailNow()
			}

			t.Run("republish", func(t *testing.T) {
				out := c.mustRun("bus", "poison", "republish", ids[0], "--bus", testdb.DSN())
				if want := "republished " + ids[0] + " to orders\n"; out != want {
					t.Errorf("republish printed %q, want %q", out, want)
				}

				// A consumer of the original topic on the same bus gets it back.
				m := receiveOne(t, c.schema, "orders")
				if m.UUID != first.UUID || !bytes.Equal(m.Payload, payload) || m.Metadata.Get("x-tenant") != "acme" ||
					m.Metadata.Get(middleware.ReasonForPoisonedKey) != "" || m.Metadata.Get(middleware.PoisonedTopicKey) != "" {
					t.Errorf("received %s %x %v, want %s %x with x-tenant and without the poison notes",
						m.UUID, m.Payload, m.Metadata, first.UUID, payload)
				}

				assertRows(t, c.mustRun("bus", "poison", "ls"), [][]string{
					poisonHeader,
					{ids[1], fields(c.mustRun("bus", "poison", "ls"))[1][1], "invoices", "mailer", second.UUID},
				})
				out = c.mustRun("bus", "poison", "ls", "--all")
				rows := fields(out)
				if len(rows) != 3 {
					t.Fatalf("ls --all printed\n%s", out)
				}
				assertRows(t, out, [][]string{
					poisonAllHeader,
					{ids[0], rows[1][1], "orders", "billing", first.UUID},
					{ids[1], rows[2][1], "invoices", "mailer", second.UUID, "-", "cannot", "parse", "order:"},
				})
				if at, err := time.Parse(time.RFC3339, rows[1][5]); err != nil || time.Since(at) > time.Minute {
					t.Errorf("REPUBLISHED_AT %q", rows[1][5])
				}
				all := c.poisonLs("--all")
				if len(all) != 2 || all[0].RepublishedAt == nil || all[1].RepublishedAt != nil {
					t.Errorf("ls --all --json: %+v", all)
				}
			})

			t.Run("republish an unknown id", func(t *testing.T) {
				var out bytes.Buffer
				busSchema := testdb.Schema(t, db) // the broker creates it
				err := c.run(ctx, &out, "bus", "poison", "republish", "987654321", ids[1], "--bus", testdb.DSN(), "--bus-schema", busSchema)
				if !errors.Is(err, bus.ErrNoPoisoned) || !strings.Contains(err.Error(), "poisoned message 987654321 not found in schema "+c.schema) {
					t.Errorf("got %v", err)
				}
				// The known id still went out.
				if want := "republished " + ids[1] + " to invoices\n"; out.String() != want {
					t.Errorf("printed %q, want %q", out.String(), want)
				}
				assertRows(t, c.mustRun("bus", "poison", "ls"), [][]string{poisonHeader})
				if m := receiveOne(t, busSchema, "invoices"); m.UUID != second.UUID || string(m.Payload) != `{"id":2}` {
					t.Errorf("received %s %s in --bus-schema, want %s", m.UUID, m.Payload, second.UUID)
				}
			})
		})
	}
}

func TestPoisonBadInput(t *testing.T) {
	c, _ := newCLI(t, "postgres")
	db := testdb.Open(t, "postgres")
	bare := cli{t: t, driver: "postgres", schema: testdb.Schema(t, db)} // never migrated
	for _, tc := range []struct {
		c    cli
		args []string
		want string
	}{
		{bare, []string{"bus", "poison", "ls"}, "has no bus tables; run stele migrate --schema " + bare.schema},
		{bare, []string{"bus", "poison", "republish", "1", "--bus", testdb.DSN()}, "has no bus tables"},
		{c, []string{"bus", "poison", "ls", "--limit", "0"}, "--limit 0: want at least 1"},
		{c, []string{"bus", "poison", "republish", "1"}, `required flag(s) "bus" not set`},
		{c, []string{"bus", "poison", "republish", "--bus", testdb.DSN()}, "requires at least 1 arg"},
		{c, []string{"bus", "poison", "republish", "x1", "--bus", testdb.DSN()}, `poisoned message id "x1": want the number`},
		{c, []string{"bus", "poison", "republish", "1", "--bus", "gochannel"}, "--bus gochannel: the in-process bus lives inside one process"},
		{c, []string{"bus", "poison", "republish", "1", "--bus", "memory"}, "the CLI's own has no consumers"},
		{c, []string{"bus", "poison", "republish", "1", "--bus", "ftp://x"}, `--bus: broker: invalid URL: unknown scheme "ftp"`},
		{c, []string{"bus", "poison", "republish", "1", "--bus", "nats://127.0.0.1:1", "--bus-schema", "s"}, "--bus-schema is only for a postgres:// bus, not nats"},
	} {
		err := tc.c.run(context.Background(), io.Discard, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("stele %s: %v, want an error containing %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}

// receiveOne subscribes to topic on the PostgreSQL bus in schema, as a new
// consumer group, and returns the first message, acked.
func receiveOne(t *testing.T, schema, topic string) *message.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := broker.Open(ctx, broker.Config{URL: testdb.DSN(), Schema: schema, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	sub, err := b.Subscriber("t")
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := sub.Subscribe(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-msgs:
		m.Ack()
		return m
	case <-ctx.Done():
		t.Fatalf("no message arrived on %s in schema %s", topic, schema)
		return nil
	}
}
