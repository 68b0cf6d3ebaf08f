package broker

import (
	"context"
	"sync"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
)

// openGoChannel makes the in-process bus: a Watermill GoChannel per topic,
// with BlockPublishUntilSubscriberAck (Publish returns once every
// subscriber acked, which keeps publish order under the Router, where
// without it the order is lost, and slows a publisher down to its
// consumers) and never Persistent (it would keep every message in memory
// forever, and does not keep order).
//
// One GoChannel per topic because a GoChannel holds a read lock for as long
// as a blocking Publish waits for its acks, and Subscribe takes the write
// lock: a handler that publishes (to any topic) while another goroutine
// subscribes would deadlock the whole bus. With a GoChannel per topic this
// remains only for a handler publishing to its own topic while something
// subscribes to that topic.
func openGoChannel(logger watermill.LoggerAdapter) adapter {
	g := &goChannels{logger: logger, byTopic: map[string]*gochannel.GoChannel{}}
	return adapter{
		pub: g, // closing the publisher closes the GoChannels, after the subscribers
		newSub: func(string) (groupSub, error) {
			// The GoChannels serve every subscriber; a subscriber's Close
			// only ends its own subscriptions (by cancelling their contexts).
			return groupSub{inner: g, close: func() error { return nil }}, nil
		},
	}
}

type goChannels struct {
	logger  watermill.LoggerAdapter
	mu      sync.Mutex
	byTopic map[string]*gochannel.GoChannel
	closed  bool
}

func (g *goChannels) topic(topic string) (*gochannel.GoChannel, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, ErrClosed
	}
	gc := g.byTopic[topic]
	if gc == nil {
		gc = gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, g.logger)
		g.byTopic[topic] = gc
	}
	return gc, nil
}

func (g *goChannels) Publish(topic string, msgs ...*message.Message) error {
	gc, err := g.topic(topic)
	if err != nil {
		return err
	}
	return gc.Publish(topic, msgs...)
}

func (g *goChannels) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	gc, err := g.topic(topic)
	if err != nil {
		return nil, err
	}
	return gc.Subscribe(ctx, topic)
}

func (g *goChannels) Close() error {
	g.mu.Lock()
	g.closed = true
	gcs := g.byTopic
	g.byTopic = nil
	g.mu.Unlock()
	for _, gc := range gcs {
		_ = gc.Close() // never fails
	}
	return nil
}
