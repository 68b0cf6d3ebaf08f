package broker_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/rcrowley/go-metrics"
	"github.com/redis/go-redis/v9"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/bus/bustest"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/testsvc"
	"github.com/stele-dev/stele/internal/wait"
)

func TestMain(m *testing.M) {
	// Sarama's go-metrics meters start a process-wide ticker goroutine that
	// never stops; goleak would report it after the Kafka tests.
	metrics.UseNilMetrics = true
	testdb.VerifyMain(m)
}

// testLogger shows what Watermill logs at warning level and above.
var testLogger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

func mustOpen(t *testing.T, cfg broker.Config) *broker.Broker {
	t.Helper()
	cfg.Logger = testLogger
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	b, err := broker.Open(ctx, cfg)
	if err != nil {
		t.Fatalf("Open(%s): %v", cfg.Kind, err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func TestGoChannel(t *testing.T) {
	bustest.Run(t, func(t *testing.T) *broker.Broker {
		return mustOpen(t, broker.Config{Kind: broker.GoChannel})
	}, bustest.Features{})
}

// TestPostgres runs the suite with a pool of each database/sql driver
// (lib/pq and pgx scan the xid8 offsets differently), each subtest in a
// schema of its own.
func TestPostgres(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			db := testdb.Open(t, driver)
			bustest.Run(t, func(t *testing.T) *broker.Broker {
				return mustOpen(t, broker.Config{DB: db, Schema: testdb.Schema(t, db)})
			}, bustest.Features{ConsumerGroups: true, Persistent: true})
		})
	}
}

// TestPostgresURL opens the pool from a URL (lib/pq's database/sql driver
// is not used: the broker opens URLs with pgx) and checks the tables land in
// Config.Schema.
func TestPostgresURL(t *testing.T) {
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	b := mustOpen(t, broker.Config{URL: testdb.DSN(), Schema: schema})
	topic := testsvc.Name("stele.events.")
	sub, err := b.Subscriber("g")
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.(message.SubscribeInitializer).SubscribeInitialize(topic); err != nil {
		t.Fatal(err)
	}
	if err := b.Publisher().Publish(topic, message.NewMessage(watermill.NewUUID(), []byte{0xff})); err != nil {
		t.Fatal(err)
	}
	var tables []string
	if err := db.Select(&tables, `SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1`, schema); err != nil {
		t.Fatal(err)
	}
	want := []string{"watermill_offsets_" + topic, "watermill_" + topic} // sorted
	if strings.Join(tables, ",") != strings.Join(want, ",") {
		t.Fatalf("tables in schema %s: %q, want %q", schema, tables, want)
	}
	var payloadType string
	if err := db.Get(&payloadType, `SELECT data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND column_name = 'payload'`, schema, want[1]); err != nil {
		t.Fatal(err)
	}
	if payloadType != "bytea" {
		t.Fatalf("payload column is %s, want bytea", payloadType)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRabbitMQ(t *testing.T) {
	testsvc.Require(t, "RabbitMQ", testsvc.HostPort(testsvc.AMQPURL))
	bustest.Run(t, func(t *testing.T) *broker.Broker {
		return mustOpen(t, broker.Config{URL: testsvc.AMQPURL})
	}, bustest.Features{
		ConsumerGroups: true,
		Persistent:     true,
		Cleanup:        deleteAMQP,
	})
}

func TestNATS(t *testing.T) {
	testsvc.Require(t, "NATS", testsvc.HostPort(testsvc.NATSURL))
	bustest.Run(t, func(t *testing.T) *broker.Broker {
		return mustOpen(t, broker.Config{URL: testsvc.NATSURL})
	}, bustest.Features{
		ConsumerGroups: true,
		Persistent:     true,
		Cleanup:        deleteNATS,
	})
}

func TestRedis(t *testing.T) {
	testsvc.Require(t, "Redis", testsvc.HostPort(testsvc.RedisURL))
	bustest.Run(t, func(t *testing.T) *broker.Broker {
		return mustOpen(t, broker.Config{URL: testsvc.RedisURL})
	}, bustest.Features{
		ConsumerGroups: true,
		Persistent:     true,
		Cleanup:        deleteRedis,
	})
}

// deleteAMQP deletes the exchange and the groups' queues of a topic.
func deleteAMQP(t testing.TB, topic string, groups []string) {
	conn, err := amqp091.Dial(testsvc.AMQPURL)
	if err != nil {
		t.Errorf("cleanup: %v", err)
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Errorf("cleanup: %v", err)
		return
	}
	for _, g := range groups {
		if _, err := ch.QueueDelete(broker.AMQPQueueName(topic, g), false, false, false); err != nil {
			t.Errorf("cleanup: deleting queue %s: %v", broker.AMQPQueueName(topic, g), err)
			return
		}
	}
	if err := ch.ExchangeDelete(topic, false, false); err != nil {
		t.Errorf("cleanup: deleting exchange %s: %v", topic, err)
	}
}

// deleteNATS deletes the stream of a topic, and so its consumers.
func deleteNATS(t testing.TB, topic string, _ []string) {
	nc, err := nats.Connect(testsvc.NATSURL)
	if err != nil {
		t.Errorf("cleanup: %v", err)
		return
	}
	defer nc.Close()
	js, err := nc.JetStream()
	if err == nil {
		err = js.DeleteStream(broker.NATSStreamName(topic)) // and its consumers
	}
	if err != nil && !errors.Is(err, nats.ErrStreamNotFound) {
		t.Errorf("cleanup: deleting stream %s: %v", broker.NATSStreamName(topic), err)
	}
}

// deleteRedis deletes the stream (key) of a topic, and so its groups.
func deleteRedis(t testing.TB, topic string, _ []string) {
	opt, _ := redis.ParseURL(testsvc.RedisURL)
	c := redis.NewClient(opt)
	defer c.Close()
	if err := c.Del(context.Background(), topic).Err(); err != nil {
		t.Errorf("cleanup: deleting stream %s: %v", topic, err)
	}
}

func TestKafka(t *testing.T) {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(3))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	url := "kafka://" + strings.Join(cluster.ListenAddrs(), ",")
	bustest.Run(t, func(t *testing.T) *broker.Broker {
		return mustOpen(t, broker.Config{URL: url, Partitions: 4, ReplicationFactor: 3})
	}, bustest.Features{ConsumerGroups: true, Persistent: true})
}

// TestGoChannelPublishFromHandler: a handler that publishes to another topic
// while some other goroutine subscribes must not deadlock the bus (one
// GoChannel for all topics does: its blocking Publish holds a read lock that
// Subscribe's write lock waits for, and the handler's Publish then waits
// behind Subscribe).
func TestGoChannelPublishFromHandler(t *testing.T) {
	b := mustOpen(t, broker.Config{Kind: broker.GoChannel})
	sub, err := b.Subscriber("g")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	events, err := sub.Subscribe(ctx, "orders.events")
	if err != nil {
		t.Fatal(err)
	}
	inHandler, proceed := make(chan struct{}), make(chan struct{})
	go func() {
		for m := range events {
			close(inHandler)
			<-proceed
			_ = b.Publisher().Publish("orders.commands", message.NewMessage(watermill.NewUUID(), nil))
			m.Ack()
		}
	}()
	published := make(chan error, 1)
	go func() {
		published <- b.Publisher().Publish("orders.events", message.NewMessage(watermill.NewUUID(), nil))
	}()
	<-inHandler
	subscribed := make(chan error, 1)
	go func() {
		_, err := sub.Subscribe(ctx, "orders.audit")
		subscribed <- err
	}()
	time.Sleep(50 * time.Millisecond) // give Subscribe the time to wait for a lock, if it has to
	close(proceed)
	var errs []error
	wait.Until(t, "the publish and the subscribe to return", func() bool {
		select {
		case err := <-published:
			errs = append(errs, err)
		case err := <-subscribed:
			errs = append(errs, err)
		default:
		}
		return len(errs) == 2
	})
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
}
