package broker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	"github.com/redis/go-redis/v9"
)

// Redis settings that are not in Config.
const (
	// redisNackResend is how long a nacked message waits before the
	// subscriber hands it out again (it stays pending in Redis meanwhile,
	// and the messages after it wait too).
	redisNackResend = 100 * time.Millisecond
	// redisMaxIdle is how long a message may stay un-acked before another
	// subscriber of the group claims it (its subscriber is presumed gone).
	// A handler that takes longer than this gets the message processed
	// twice.
	redisMaxIdle = time.Minute
	// redisClaimInterval is how often a subscriber looks for messages to
	// claim: those idle past redisMaxIdle and those handed back.
	redisClaimInterval = time.Second
	// redisBlock is how long one XREADGROUP waits for new entries, and
	// redisHandbackGrace how long an ended subscription waits before it
	// hands back what it holds: long enough for a read already sent to
	// come back.
	redisBlock         = 100 * time.Millisecond
	redisHandbackGrace = 3*redisBlock + 200*time.Millisecond
)

// openRedis sets up watermill-redisstream: Publish is an XADD per message
// (answered once Redis has appended it; how durable that is depends on the
// server's appendonly/fsync settings), each group is a Redis consumer group
// created at the stream's first entry ("0"), and subscribers read with
// XREADGROUP, ack with XACK, and claim messages left pending by a subscriber
// that went away.
func openRedis(ctx context.Context, cfg Config, logger watermill.LoggerAdapter) (adapter, error) {
	addr := redact(cfg.URL)
	opt, err := redis.ParseURL(cfg.URL)
	if err != nil {
		return adapter{}, &ConfigError{Field: "URL", Reason: fmt.Sprintf("%q: %v", addr, err)}
	}
	if cfg.TLS != nil {
		opt.TLSConfig = cfg.TLS
	}
	opt.DialTimeout = dialTimeout(ctx, cfg)
	pubClient := redis.NewClient(opt)
	pctx, cancel := context.WithTimeout(ctx, opt.DialTimeout)
	defer cancel()
	if err := pubClient.Ping(pctx).Err(); err != nil {
		_ = pubClient.Close()
		return adapter{}, &ConnectError{Kind: Redis, Addr: addr, Err: err}
	}
	pub, err := redisstream.NewPublisher(redisstream.PublisherConfig{Client: pubClient}, logger)
	if err != nil {
		_ = pubClient.Close()
		return adapter{}, &ConnectError{Kind: Redis, Addr: addr, Err: err}
	}
	opt.DialTimeout = cfg.DialTimeout
	return adapter{
		pub: pub, // closes pubClient
		newSub: func(group string) (groupSub, error) {
			// A client per subscriber: the subscriber closes it.
			client := redis.NewClient(opt)
			consumer := watermill.NewShortUUID()
			sub, err := redisstream.NewSubscriber(redisstream.SubscriberConfig{
				Client:          client,
				ConsumerGroup:   group,
				Consumer:        consumer,
				NackResendSleep: redisNackResend,
				MaxIdleTime:     redisMaxIdle,
				ClaimInterval:   redisClaimInterval,
				BlockTime:       redisBlock,
				OldestId:        "0",
				// Without it the first XREADGROUP blocks forever on an
				// empty stream and Close cannot stop it.
				DisableIndefiniteInitialBlock: true,
				// Stop reading once the subscription is over instead of
				// sleeping half a second first (past Close: a leak); keep
				// retrying other errors.
				ShouldStopOnReadErrors: func(err error) bool {
					return errors.Is(err, context.Canceled) || errors.Is(err, redis.ErrClosed)
				},
			}, logger)
			if err != nil {
				_ = client.Close()
				return groupSub{}, &ConnectError{Kind: Redis, Addr: addr, Err: err}
			}
			return groupSub{
				inner: sub,
				initialize: func(topic string) error {
					ctx, cancel := context.WithTimeout(context.Background(), opt.DialTimeout)
					defer cancel()
					err := client.XGroupCreateMkStream(ctx, topic, group, "0").Err()
					if err != nil && err.Error() != "BUSYGROUP Consumer Group name already exists" {
						return err
					}
					return nil
				},
				ended: func(topic string) {
					redisHandBack(client, topic, group, consumer, logger)
				},
			}, nil
		},
	}, nil
}

// redisHandBack makes the messages an ended subscription still holds
// claimable by the group's other subscribers at once. watermill-redisstream
// closes a subscription's channel without waiting for an XREADGROUP already
// sent, so Redis can deliver a message to a consumer that will never hand
// it out or ack it. Left alone it waits redisMaxIdle for a claim. Marking
// the consumer's pending entries idle for that long (XCLAIM to itself with
// IDLE) lets the next claim, within redisClaimInterval or at the next
// subscriber's start, take them.
func redisHandBack(client *redis.Client, topic, group, consumer string, logger watermill.LoggerAdapter) {
	time.Sleep(redisHandbackGrace) // no condition to wait on: the read is inside the adapter
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fields := watermill.LogFields{"topic": topic, "consumer_group": group, "consumer": consumer}
	for {
		pending, err := client.XPendingExt(ctx, &redis.XPendingExtArgs{
			Stream: topic, Group: group, Consumer: consumer,
			Start: "-", End: "+", Count: 100,
		}).Result()
		if err != nil || len(pending) == 0 {
			if err != nil {
				logger.Error("handing back pending messages", err, fields)
			}
			return
		}
		args := []any{"XCLAIM", topic, group, consumer + "-ended", 0}
		for _, p := range pending {
			args = append(args, p.ID)
		}
		args = append(args, "IDLE", redisMaxIdle.Milliseconds(), "JUSTID")
		if err := client.Do(ctx, args...).Err(); err != nil {
			logger.Error("handing back pending messages", err, fields)
			return
		}
		logger.Debug("handed back pending messages", fields.Add(watermill.LogFields{"count": len(pending)}))
	}
}
