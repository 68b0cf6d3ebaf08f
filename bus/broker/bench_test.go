package broker_test

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/testsvc"
)

// BenchmarkConsume measures how fast one subscriber of a consumer group
// receives and acks messages already waiting in the broker (published
// beforehand, untimed): b.N messages, reported as msgs/s.
//
//	go test -run '^$' -bench Consume -benchtime 20000x ./bus/broker/
func BenchmarkConsume(b *testing.B) {
	b.Run("amqp", func(b *testing.B) {
		testsvc.Require(b, "RabbitMQ", testsvc.HostPort(testsvc.AMQPURL))
		benchConsume(b, broker.Config{URL: testsvc.AMQPURL}, deleteAMQP)
	})
	b.Run("amqp-router", func(b *testing.B) {
		testsvc.Require(b, "RabbitMQ", testsvc.HostPort(testsvc.AMQPURL))
		benchConsume(b, broker.Config{URL: testsvc.AMQPURL}, deleteAMQP, withRouter)
	})
	b.Run("nats", func(b *testing.B) {
		testsvc.Require(b, "NATS", testsvc.HostPort(testsvc.NATSURL))
		benchConsume(b, broker.Config{URL: testsvc.NATSURL}, deleteNATS)
	})
	b.Run("nats-router", func(b *testing.B) {
		testsvc.Require(b, "NATS", testsvc.HostPort(testsvc.NATSURL))
		benchConsume(b, broker.Config{URL: testsvc.NATSURL}, deleteNATS, withRouter)
	})
	b.Run("redis", func(b *testing.B) {
		testsvc.Require(b, "Redis", testsvc.HostPort(testsvc.RedisURL))
		benchConsume(b, broker.Config{URL: testsvc.RedisURL}, deleteRedis)
	})
	b.Run("postgres", func(b *testing.B) {
		db := testdb.Open(b, "pgx")
		benchConsume(b, broker.Config{DB: db, Schema: testdb.Schema(b, db)}, nil)
	})
	b.Run("kafka", func(b *testing.B) {
		c, err := kfake.NewCluster(kfake.NumBrokers(1))
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		benchConsume(b, broker.Config{URL: "kafka://" + strings.Join(c.ListenAddrs(), ",")}, nil)
	})
}

// withRouter consumes through a Watermill Router with an empty handler
// instead of reading the channel directly.
const withRouter = true

// cleanup deletes what a benchmark left on a broker (nil: nothing to do).
type cleanup func(t testing.TB, topic string, groups []string)

func benchConsume(b *testing.B, cfg broker.Config, del cleanup, router ...bool) {
	cfg.Logger = testLogger
	topic, group := testsvc.Name("bench.consume."), testsvc.Name("g")
	if del != nil {
		defer del(b, topic, []string{group}) // after br.Close
	}
	br, err := broker.Open(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer br.Close()
	sub, err := br.Subscriber(group)
	if err != nil {
		b.Fatal(err)
	}
	if err := sub.(message.SubscribeInitializer).SubscribeInitialize(topic); err != nil {
		b.Fatal(err)
	}
	n := b.N
	// Publish from 16 goroutines, in batches of 100.
	var wg sync.WaitGroup
	next := make(chan int)
	errc := make(chan error, 16)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for start := range next {
				msgs := make([]*message.Message, 0, 100)
				for i := start; i < min(start+100, n); i++ {
					m := message.NewMessage(watermill.NewUUID(), []byte(strconv.Itoa(i)))
					m.Metadata.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
					msgs = append(msgs, m)
				}
				if err := br.Publisher().Publish(topic, msgs...); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	pubStart := time.Now()
	for i := 0; i < n; i += 100 {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errc:
		b.Fatal(err)
	default:
	}
	pubElapsed := time.Since(pubStart)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b.ResetTimer()
	start := time.Now()
	if len(router) > 0 && router[0] {
		r, err := message.NewRouter(message.RouterConfig{}, watermill.NopLogger{})
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan struct{})
		var handled atomic.Int64
		r.AddConsumerHandler("bench", topic, sub, func(*message.Message) error {
			if handled.Add(1) == int64(n) {
				close(done)
			}
			return nil
		})
		go func() { _ = r.Run(ctx) }()
		select {
		case <-done:
		case <-time.After(5 * time.Minute):
			b.Fatalf("only %d of %d messages handled", handled.Load(), n)
		}
		defer r.Close()
	} else {
		ch, err := sub.Subscribe(ctx, topic)
		if err != nil {
			b.Fatal(err)
		}
		for i := 0; i < n; i++ {
			select {
			case m := <-ch:
				m.Ack()
			case <-time.After(30 * time.Second):
				b.Fatalf("only %d of %d messages after 30s without one", i, n)
			}
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(n)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(n)/pubElapsed.Seconds(), "published-msgs/s")
}
