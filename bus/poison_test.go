package bus_test

import (
	"context"
	"errors"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
)

// poisonedMessage is msg as the router's poison-queue middleware hands it to
// the box: with the notes saying why, where and who.
func poisonedMessage(uuid, payload string, own map[string]string) *message.Message {
	msg := message.NewMessage(uuid, []byte(payload))
	maps.Copy(msg.Metadata, own)
	msg.Metadata.Set(middleware.ReasonForPoisonedKey, "cannot parse order")
	msg.Metadata.Set(middleware.PoisonedTopicKey, "orders")
	msg.Metadata.Set(middleware.PoisonedHandlerKey, "billing")
	msg.Metadata.Set(middleware.PoisonedSubscriberKey, "*gochannel.GoChannel")
	return msg
}

func TestMemoryPoisonBox(t *testing.T) {
	testPoisonBox(t, func(t *testing.T) bus.PoisonBox { return bus.NewMemoryPoisonBox() })
}

func TestPostgresPoisonBox(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			db := testdb.Open(t, driver)
			testPoisonBox(t, func(t *testing.T) bus.PoisonBox { return newPostgresBox(t, db) })

			t.Run("survives a new box value on the same schema", func(t *testing.T) {
				schema := migratedSchema(t, db)
				first, err := bus.NewPostgresPoisonBox(db, schema)
				if err != nil {
					t.Fatal(err)
				}
				if err := first.Publish(bus.PoisonTopic, poisonedMessage("m-1", "p", map[string]string{"x-tenant": "acme"})); err != nil {
					t.Fatal(err)
				}
				second, err := bus.NewPostgresPoisonBox(db, schema) // as after a restart
				if err != nil {
					t.Fatal(err)
				}
				got := poisoned(t, second, true)
				if len(got) != 1 || got[0].UUID != "m-1" || got[0].Topic != "orders" || got[0].Metadata["x-tenant"] != "acme" {
					t.Fatalf("new box lists %+v, want m-1 from the first", got)
				}
				pub := &recordingPublisher{}
				if err := second.Republish(context.Background(), got[0].ID, pub); err != nil {
					t.Fatalf("Republish through the new box: %v", err)
				}
				if len(poisoned(t, first, true)) != 0 {
					t.Error("the first box still lists the message as pending after the second re-published it")
				}
			})

			t.Run("refuses a bad schema name", func(t *testing.T) {
				for _, schema := range []string{"", "Orders", `x"; DROP TABLE events; --`, "pg_catalog", "1abc", strings.Repeat("a", 64)} {
					if box, err := bus.NewPostgresPoisonBox(db, schema); err == nil {
						t.Errorf("NewPostgresPoisonBox(%q) = %v, want an error", schema, box)
					}
				}
			})

			t.Run("in a schema without the table", func(t *testing.T) {
				box, err := bus.NewPostgresPoisonBox(db, testdb.Schema(t, db))
				if err != nil {
					t.Fatal(err)
				}
				if err := box.Publish(bus.PoisonTopic, poisonedMessage("m-1", "p", nil)); err == nil {
					t.Error("Publish into an unmigrated schema succeeded; the router must see the failure and nack")
				}
			})
		})
	}
}

func migratedSchema(t *testing.T, db *sqlx.DB) string {
	t.Helper()
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(context.Background(), db, schema); err != nil {
		t.Fatalf("migrating %s: %v", schema, err)
	}
	return schema
}

func newPostgresBox(t *testing.T, db *sqlx.DB) *bus.PostgresPoisonBox {
	t.Helper()
	box, err := bus.NewPostgresPoisonBox(db, migratedSchema(t, db))
	if err != nil {
		t.Fatalf("NewPostgresPoisonBox: %v", err)
	}
	return box
}

// testPoisonBox runs the behaviour every PoisonBox must have; newBox returns
// an empty box.
func testPoisonBox(t *testing.T, newBox func(t *testing.T) bus.PoisonBox) {
	ctx := context.Background()
	own := map[string]string{"x-tenant": "acme", bus.KeyCorrelationID: "corr-1", bus.KeyEventType: "OrderPlaced"}

	t.Run("keeps what the poison queue noted", func(t *testing.T) {
		box := newBox(t)
		before := time.Now()
		if err := box.Publish(bus.PoisonTopic, poisonedMessage("m-1", `{"id":1}`, own)); err != nil {
			t.Fatalf("Publish: %v", err)
		}
		got := poisoned(t, box, true)
		if len(got) != 1 {
			t.Fatalf("List(pending) = %d messages, want 1", len(got))
		}
		p := got[0]
		if p.ID < 1 || p.UUID != "m-1" || p.Topic != "orders" || p.Handler != "billing" || p.Reason != "cannot parse order" || string(p.Payload) != `{"id":1}` {
			t.Errorf("poisoned = %+v", p)
		}
		if !maps.Equal(p.Metadata, own) {
			t.Errorf("metadata = %v, want the message's own %v, without the poison notes", p.Metadata, own)
		}
		if p.PoisonedAt.Before(before.Add(-time.Minute)) || p.PoisonedAt.After(time.Now().Add(time.Minute)) {
			t.Errorf("PoisonedAt = %v, want about now (%v)", p.PoisonedAt, before)
		}
		if !p.RepublishedAt.IsZero() {
			t.Errorf("RepublishedAt = %v, want zero before any republish", p.RepublishedAt)
		}
	})

	t.Run("lists oldest first, up to the limit", func(t *testing.T) {
		box := newBox(t)
		for _, id := range []string{"m-1", "m-2", "m-3"} {
			if err := box.Publish(bus.PoisonTopic, poisonedMessage(id, "p", nil)); err != nil {
				t.Fatal(err)
			}
		}
		got, err := box.List(ctx, false, 2)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 2 || got[0].UUID != "m-1" || got[1].UUID != "m-2" || got[0].ID >= got[1].ID {
			t.Errorf("List(limit 2) = %+v, want m-1 then m-2", got)
		}
		if all := poisoned(t, box, false); len(all) != 3 {
			t.Errorf("List(no limit) = %d messages, want 3", len(all))
		}
	})

	t.Run("republish sends it back and marks it", func(t *testing.T) {
		box := newBox(t)
		for _, id := range []string{"m-1", "m-2"} {
			if err := box.Publish(bus.PoisonTopic, poisonedMessage(id, `{"id":1}`, own)); err != nil {
				t.Fatal(err)
			}
		}
		target := poisoned(t, box, true)[0]
		pub := &recordingPublisher{}
		if err := box.Republish(ctx, target.ID, pub); err != nil {
			t.Fatalf("Republish: %v", err)
		}
		if len(pub.msgs) != 1 || pub.topics[0] != "orders" {
			t.Fatalf("published %d messages to %v, want one to orders", len(pub.msgs), pub.topics)
		}
		msg := pub.msgs[0]
		if msg.UUID != "m-1" || string(msg.Payload) != `{"id":1}` {
			t.Errorf("republished %s %q, want the same UUID and payload", msg.UUID, msg.Payload)
		}
		if !maps.Equal(msg.Metadata, own) {
			t.Errorf("republished metadata %v, want %v: the original's, without reason_poisoned and the other notes", msg.Metadata, own)
		}
		pending := poisoned(t, box, true)
		if len(pending) != 1 || pending[0].UUID != "m-2" {
			t.Errorf("pending after republish = %+v, want only m-2", pending)
		}
		all := poisoned(t, box, false)
		if len(all) != 2 || all[0].RepublishedAt.IsZero() || !all[1].RepublishedAt.IsZero() {
			t.Errorf("List(all) = %+v, want m-1 marked republished and m-2 not", all)
		}
	})

	t.Run("a failed republish leaves it pending", func(t *testing.T) {
		box := newBox(t)
		if err := box.Publish(bus.PoisonTopic, poisonedMessage("m-1", "p", nil)); err != nil {
			t.Fatal(err)
		}
		id := poisoned(t, box, true)[0].ID
		if err := box.Republish(ctx, id, &recordingPublisher{err: errBrokerDown}); !errors.Is(err, errBrokerDown) {
			t.Errorf("Republish = %v, want the publisher's error", err)
		}
		if got := poisoned(t, box, true); len(got) != 1 {
			t.Errorf("pending = %+v, want the message still pending", got)
		}
	})

	t.Run("unknown id", func(t *testing.T) {
		box := newBox(t)
		if err := box.Publish(bus.PoisonTopic, poisonedMessage("m-1", "p", nil)); err != nil {
			t.Fatal(err)
		}
		for _, id := range []int64{0, -1, 999999} {
			if err := box.Republish(ctx, id, &recordingPublisher{}); !errors.Is(err, bus.ErrNoPoisoned) {
				t.Errorf("Republish(%d) = %v, want ErrNoPoisoned", id, err)
			}
		}
	})

	t.Run("a message without payload", func(t *testing.T) {
		box := newBox(t)
		msg := poisonedMessage("m-1", "", nil)
		msg.Payload = nil // a command with no body, or a ReplyError
		if err := box.Publish(bus.PoisonTopic, msg); err != nil {
			t.Fatalf("Publish of a message with no payload: %v", err)
		}
		got := poisoned(t, box, true)
		if len(got) != 1 || len(got[0].Payload) != 0 {
			t.Fatalf("List = %+v, want the message with an empty payload", got)
		}
		if err := box.Republish(ctx, got[0].ID, &recordingPublisher{}); err != nil {
			t.Errorf("Republish: %v", err)
		}
	})

	t.Run("a message whose text is not valid UTF-8", func(t *testing.T) {
		box := newBox(t)
		msg := poisonedMessage("bad-\xff-\x00-uuid", "\x00\xff", map[string]string{"x-raw": "a\x00b\xfe"})
		msg.Metadata.Set(middleware.ReasonForPoisonedKey, "bus: message bad-\xff-\x00-uuid: uuid: want the event id, a UUID")
		// The box is the last stop: if it refuses the message, the broker
		// redelivers it for ever.
		if err := box.Publish(bus.PoisonTopic, msg); err != nil {
			t.Fatalf("Publish: %v", err)
		}
		got := poisoned(t, box, true)
		if len(got) != 1 || !strings.HasPrefix(got[0].UUID, "bad-") || !strings.Contains(got[0].Reason, "want the event id") ||
			string(got[0].Payload) != "\x00\xff" || !strings.HasPrefix(got[0].Metadata["x-raw"], "a") {
			t.Fatalf("List = %+v, want the message, its text kept as far as the store allows, its payload exact", got)
		}
	})

	t.Run("through the router and back", func(t *testing.T) {
		box := newBox(t)
		ps := newPubSub(t)
		r, _ := newRouter(t, bus.RouterConfig{Retry: fastRetry, Poison: box})
		var mu sync.Mutex
		fixed := false
		var seen []*message.Message
		r.AddConsumerHandler("billing", "orders", ps, func(msg *message.Message) error {
			mu.Lock()
			defer mu.Unlock()
			seen = append(seen, msg)
			if !fixed {
				return bus.Permanent(errors.New("unknown currency"))
			}
			return nil
		})
		run(t, r)

		orig := message.NewMessage("m-1", []byte(`{"currency":"XYZ"}`))
		maps.Copy(orig.Metadata, own)
		publish(t, ps, "orders", orig)
		wait.Until(t, "the message in the poison box", func() bool { return len(poisoned(t, box, true)) == 1 })
		p := poisoned(t, box, true)[0]
		if p.Topic != "orders" || p.Handler != "billing" || p.Reason != "unknown currency" {
			t.Errorf("poisoned = %+v", p)
		}

		mu.Lock()
		fixed = true // the cause is fixed; the operator re-publishes
		mu.Unlock()
		if err := box.Republish(ctx, p.ID, ps); err != nil {
			t.Fatalf("Republish: %v", err)
		}
		wait.Until(t, "the redelivery", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == 2 })
		mu.Lock()
		again := seen[1]
		mu.Unlock()
		if again.UUID != "m-1" || string(again.Payload) != `{"currency":"XYZ"}` || !maps.Equal(again.Metadata, own) {
			t.Errorf("handler got %s %q %v, want the original UUID, payload and metadata %v", again.UUID, again.Payload, again.Metadata, own)
		}
		if got := poisoned(t, box, true); len(got) != 0 {
			t.Errorf("still pending after a successful republish: %+v", got)
		}
	})
}
