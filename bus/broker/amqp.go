package broker

import (
	"context"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// AMQP settings that are not in Config.
const (
	// amqpPrefetch is how many un-acked messages RabbitMQ sends a
	// subscription ahead. The watermill subscriber still hands them out one
	// at a time, waiting for each ack, so order holds; prefetching only
	// saves the round trip per message (measured on 2 cores: about 6,000
	// msgs/s at prefetch 1, over 20,000 at 64 and more). The price: after a
	// nack, the messages already prefetched are delivered before the
	// requeued one, and a subscriber holds up to this many messages that
	// the other subscribers of its group cannot get meanwhile.
	amqpPrefetch = 128
	// amqpChannels is how many idle confirm-mode channels the publisher
	// keeps open for the next Publish calls, instead of opening and closing
	// a channel per Publish.
	amqpChannels = 16
)

// amqpConfig is the durable pub/sub configuration (fanout exchange per
// topic, durable queue per group, persistent delivery mode) with publisher
// confirms: Publish returns once RabbitMQ confirmed each message, which for
// a persistent message routed to a durable queue means it was written to
// disk.
func amqpConfig(cfg Config, timeout time.Duration, queueName wamqp.QueueNameGenerator) wamqp.Config {
	c := wamqp.NewDurablePubSubConfig(cfg.URL, queueName)
	c.Connection.AmqpConfig = &amqp091.Config{
		TLSClientConfig: cfg.TLS,
		Dial:            amqp091.DefaultDial(timeout),
		Heartbeat:       10 * time.Second,
		Locale:          "en_US",
		Properties:      amqp091.Table{"connection_name": "stele"},
	}
	c.Publish.ConfirmDelivery = true
	c.Publish.ChannelPoolSize = amqpChannels
	c.Consume.Qos.PrefetchCount = amqpPrefetch
	// Nack requeues (NoRequeueOnNack false, the default): never loss.
	return c
}

// AMQPQueueName is the RabbitMQ queue of consumer group for topic; the
// exchange is named after the topic.
func AMQPQueueName(topic, group string) string { return amqpQueue(topic, group) }

// amqpQueue is the queue of a consumer group for a topic.
func amqpQueue(topic, group string) string { return topic + "_" + group }

func openAMQP(ctx context.Context, cfg Config, logger watermill.LoggerAdapter) (adapter, error) {
	addr := redact(cfg.URL)
	timeout := dialTimeout(ctx, cfg)
	pub, err := newAMQPPublisher(cfg.URL, *amqpConfig(cfg, timeout, nil).Connection.AmqpConfig)
	if err != nil {
		return adapter{}, &ConnectError{Kind: RabbitMQ, Addr: addr, Err: err}
	}
	return adapter{
		pub: pub,
		newSub: func(group string) (groupSub, error) {
			c := amqpConfig(cfg, cfg.DialTimeout, func(topic string) string { return amqpQueue(topic, group) })
			sub, err := wamqp.NewSubscriber(c, logger)
			if err != nil {
				return groupSub{}, &ConnectError{Kind: RabbitMQ, Addr: addr, Err: err}
			}
			return groupSub{
				inner: sub,
				// Declares the exchange, the group's queue (at most 180+1+64
				// bytes, under RabbitMQ's 255) and the binding.
				initialize: sub.SubscribeInitialize,
			}, nil
		},
	}, nil
}
