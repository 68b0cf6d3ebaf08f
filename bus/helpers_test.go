package bus_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"github.com/stele-dev/stele/bus"
)

// quiet is the logger the tests give the router: failing handlers are the
// point of most tests, so their error logs are noise.
var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// newPubSub returns an in-process bus that keeps order: Publish returns once
// every subscriber acked (or the message was poisoned and acked).
func newPubSub(t testing.TB) *gochannel.GoChannel {
	t.Helper()
	ps := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, watermill.NopLogger{})
	t.Cleanup(func() {
		if err := ps.Close(); err != nil {
			t.Errorf("closing pub/sub: %v", err)
		}
	})
	return ps
}

// fastRetry retries quickly so the tests stay fast.
var fastRetry = bus.RetryPolicy{MaxRetries: 3, Initial: time.Millisecond, Max: 5 * time.Millisecond, Multiplier: 2, Jitter: 0.1}

// newRouter builds a router with NewRouter; cfg.Logger defaults to quiet.
func newRouter(t testing.TB, cfg bus.RouterConfig) (*message.Router, bus.PoisonBox) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quiet
	}
	if cfg.CloseTimeout == 0 {
		cfg.CloseTimeout = 10 * time.Second
	}
	r, box, err := bus.NewRouter(cfg)
	if err != nil {
		t.Fatalf("NewRouter: %v", err)
	}
	return r, box
}

// run starts r and returns once it is subscribed to every topic; the router
// is closed, and Run awaited, when the test ends.
func run(t testing.TB, r *message.Router) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background()) }()
	select {
	case <-r.Running():
	case err := <-done:
		t.Fatalf("router stopped before running: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("router did not start")
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("closing router: %v", err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("router Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("router Run did not return after Close")
		}
	})
}

// publish sends msg and fails the test if the bus refuses it.
func publish(t testing.TB, pub message.Publisher, topic string, msg *message.Message) {
	t.Helper()
	if err := pub.Publish(topic, msg); err != nil {
		t.Fatalf("publishing to %s: %v", topic, err)
	}
}

// calls records when a handler ran and with which message context.
type calls struct {
	mu    sync.Mutex
	at    []time.Time
	ctxs  []context.Context
	uuids []string
}

func (c *calls) record(msg *message.Message) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.at = append(c.at, time.Now())
	c.ctxs = append(c.ctxs, msg.Context())
	c.uuids = append(c.uuids, msg.UUID)
	return len(c.at)
}

func (c *calls) n() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.at)
}

func (c *calls) times() []time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Time(nil), c.at...)
}

// recordingPublisher keeps what is published to it, or fails with err.
type recordingPublisher struct {
	mu     sync.Mutex
	err    error
	topics []string
	msgs   []*message.Message
}

func (p *recordingPublisher) Publish(topic string, msgs ...*message.Message) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return p.err
	}
	for _, m := range msgs {
		p.topics = append(p.topics, topic)
		p.msgs = append(p.msgs, m)
	}
	return nil
}

func (p *recordingPublisher) Close() error { return nil }

var errBrokerDown = errors.New("broker down")

// poisoned lists box's messages, failing the test on error.
func poisoned(t testing.TB, box bus.PoisonBox, pending bool) []bus.Poisoned {
	t.Helper()
	ps, err := box.List(context.Background(), pending, 0)
	if err != nil {
		t.Fatalf("List(pending=%v): %v", pending, err)
	}
	return ps
}
