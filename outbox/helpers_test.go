package outbox_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	"github.com/rcrowley/go-metrics"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/internal/testdb"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(relayChild()) // a relay process for TestRelayProcessKilled
	}
	// Sarama's go-metrics meters start a process-wide ticker that never
	// stops; goleak would report it after the Kafka tests.
	metrics.UseNilMetrics = true
	testdb.VerifyMain(m)
}

// delivery is one message as a consumer saw it.
type delivery struct {
	UUID    string
	Stream  string
	Version int64
	Type    string
	MD      message.Metadata
	Payload []byte
}

// collector consumes a topic and records every delivery, duplicates included.
type collector struct {
	mu   sync.Mutex
	got  []delivery
	stop context.CancelFunc
	done chan struct{}
}

func newGoChannel(t *testing.T) *gochannel.GoChannel {
	t.Helper()
	pubsub := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, watermill.NopLogger{})
	t.Cleanup(func() { _ = pubsub.Close() })
	return pubsub
}

func collect(t *testing.T, sub message.Subscriber, topic string) *collector {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	msgs, err := sub.Subscribe(ctx, topic)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	c := &collector{stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for m := range msgs {
			v, _ := strconv.ParseInt(m.Metadata.Get(bus.KeyStreamVersion), 10, 64)
			c.mu.Lock()
			c.got = append(c.got, delivery{UUID: m.UUID, Stream: m.Metadata.Get(bus.KeyStreamID), Version: v,
				Type: m.Metadata.Get(bus.KeyEventType), MD: m.Metadata, Payload: m.Payload})
			c.mu.Unlock()
			m.Ack()
		}
	}()
	t.Cleanup(func() { cancel(); <-c.done })
	return c
}

func (c *collector) deliveries() []delivery {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]delivery(nil), c.got...)
}

func (c *collector) unique() int {
	seen := map[string]bool{}
	for _, d := range c.deliveries() {
		seen[d.UUID] = true
	}
	return len(seen)
}

// checkStreamOrder fails unless every stream's first deliveries of each
// version arrive in version order (a redelivery may repeat an older one).
func checkStreamOrder(t *testing.T, got []delivery) {
	t.Helper()
	next := map[string]int64{}
	for _, d := range got {
		want := next[d.Stream] + 1
		switch {
		case d.Version == want:
			next[d.Stream] = want
		case d.Version < want:
			// a duplicate of something already seen: allowed (at least once)
		default:
			t.Fatalf("stream %s: got version %d before %d", d.Stream, d.Version, want)
		}
	}
}

func streamName(prefix string, i int) string { return fmt.Sprintf("%s-%d", prefix, i) }
