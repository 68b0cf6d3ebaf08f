package broker_test

import (
	"context"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/internal/testsvc"
)

// TestRedisEndedSubscriptionHandsBack: a message a Redis subscription was
// given but never acked, when the subscription ends, reaches the group's
// next subscriber within seconds, not after the minute a consumer's pending
// entry otherwise waits to be claimed.
func TestRedisEndedSubscriptionHandsBack(t *testing.T) {
	testsvc.Require(t, "Redis", testsvc.HostPort(testsvc.RedisURL))
	b := mustOpen(t, broker.Config{URL: testsvc.RedisURL})
	topic := testsvc.Name("handback.")
	group := testsvc.Name("g-")
	t.Cleanup(func() { deleteRedis(t, topic, nil) })

	sub1, err := b.Subscriber(group)
	if err != nil {
		t.Fatal(err)
	}
	ctx1, cancel1 := context.WithCancel(t.Context())
	defer cancel1()
	ch1, err := sub1.Subscribe(ctx1, topic)
	if err != nil {
		t.Fatal(err)
	}
	sent := message.NewMessage(watermill.NewUUID(), []byte("held"))
	if err := b.Publisher().Publish(topic, sent); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-ch1:
		if m.UUID != sent.UUID {
			t.Fatalf("first subscription got %s, want %s", m.UUID, sent.UUID)
		}
		// neither acked nor nacked: the subscription ends holding it
	case <-time.After(10 * time.Second):
		t.Fatal("first subscription got nothing")
	}
	cancel1()
	for range ch1 {
	}

	sub2, err := b.Subscriber(group)
	if err != nil {
		t.Fatal(err)
	}
	ch2, err := sub2.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	// Claimed once handed back: the grace, then the next claim tick (1 s).
	select {
	case m := <-ch2:
		if m.UUID != sent.UUID {
			t.Fatalf("second subscription got %s, want %s", m.UUID, sent.UUID)
		}
		m.Ack()
	case <-time.After(15 * time.Second):
		t.Fatal("the message held by the ended subscription was not redelivered within 15 s (a pending entry waits a minute unless handed back)")
	}
}
