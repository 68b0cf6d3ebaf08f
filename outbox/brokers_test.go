package outbox_test

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/redis/go-redis/v9"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/testsvc"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/outbox"
)

var quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))

func openBroker(t *testing.T, cfg broker.Config) *broker.Broker {
	t.Helper()
	cfg.Logger = quiet
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := broker.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// brokerCase opens one kind of bus for a test and removes what the test left
// on a shared server.
type brokerCase struct {
	name    string
	open    func(t *testing.T, schema string) *broker.Broker
	cleanup func(t *testing.T, topic string)
}

func brokerCases() []brokerCase {
	return []brokerCase{
		{name: "gochannel", open: func(t *testing.T, _ string) *broker.Broker {
			return openBroker(t, broker.Config{Kind: broker.GoChannel})
		}},
		{name: "postgres", open: func(t *testing.T, schema string) *broker.Broker {
			return openBroker(t, broker.Config{DB: testdb.Open(t, "postgres"), Schema: schema, PollInterval: 10 * time.Millisecond})
		}},
		{name: "rabbitmq", open: func(t *testing.T, _ string) *broker.Broker {
			testsvc.Require(t, "RabbitMQ", testsvc.HostPort(testsvc.AMQPURL))
			return openBroker(t, broker.Config{URL: testsvc.AMQPURL})
		}, cleanup: func(t *testing.T, topic string) {
			conn, err := amqp091.Dial(testsvc.AMQPURL)
			if err != nil {
				return
			}
			defer conn.Close()
			ch, err := conn.Channel()
			if err != nil {
				return
			}
			_, _ = ch.QueueDelete(broker.AMQPQueueName(topic, "consumer"), false, false, false)
			_, _ = ch.QueueDelete(broker.AMQPQueueName(topic, "raw"), false, false, false)
			_ = ch.ExchangeDelete(topic, false, false)
		}},
		{name: "nats", open: func(t *testing.T, _ string) *broker.Broker {
			testsvc.Require(t, "NATS", testsvc.HostPort(testsvc.NATSURL))
			return openBroker(t, broker.Config{URL: testsvc.NATSURL})
		}, cleanup: func(t *testing.T, topic string) {
			nc, err := nats.Connect(testsvc.NATSURL)
			if err != nil {
				return
			}
			defer nc.Close()
			if js, err := nc.JetStream(); err == nil {
				_ = js.DeleteStream(broker.NATSStreamName(topic))
			}
		}},
		{name: "redis", open: func(t *testing.T, _ string) *broker.Broker {
			testsvc.Require(t, "Redis", testsvc.HostPort(testsvc.RedisURL))
			return openBroker(t, broker.Config{URL: testsvc.RedisURL})
		}, cleanup: func(t *testing.T, topic string) {
			opt, _ := redis.ParseURL(testsvc.RedisURL)
			c := redis.NewClient(opt)
			defer c.Close()
			_ = c.Del(context.Background(), topic).Err()
		}},
		{name: "kafka", open: func(t *testing.T, _ string) *broker.Broker {
			cluster, err := kfake.NewCluster(kfake.NumBrokers(1))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(cluster.Close)
			return openBroker(t, broker.Config{URL: "kafka://" + strings.Join(cluster.ListenAddrs(), ","), Partitions: 4})
		}},
	}
}

// TestRelayOverEveryBroker: the same relay, over each bus stele supports and
// its real broker: every committed event reaches a consumer group (with an
// inbox) exactly once in effect, nothing rolled back arrives, and each
// stream's events arrive in order.
func TestRelayOverEveryBroker(t *testing.T) {
	for _, bc := range brokerCases() {
		t.Run(bc.name, func(t *testing.T) {
			store, schema := pgSetup(t, nil)
			db := testdb.Open(t, "postgres")
			b := bc.open(t, schema)
			topic := testsvc.Name("relay.events")
			if bc.cleanup != nil {
				t.Cleanup(func() { bc.cleanup(t, topic) })
			}
			sub, err := b.Subscriber("consumer")
			if err != nil {
				t.Fatal(err)
			}
			consumer := newInboxConsumer(t, db, schema)
			consumer.consume(t, sub, topic) // subscribed before anything is published
			rawSub, err := b.Subscriber("raw")
			if err != nil {
				t.Fatal(err)
			}
			raw := collect(t, rawSub, topic)

			r, err := outbox.NewRelay(store, outbox.Config{Name: "to-" + bc.name, Publisher: b.Publisher(), Topic: topic,
				DB: db, Schema: schema, BatchSize: 50, Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			runRelay(t, r)
			app := &appender{committed: map[string]bool{}, rolledBack: map[string]bool{}}
			var wg sync.WaitGroup
			for i := range 2 {
				wg.Go(func() { app.run(t, context.Background(), store, db, fmt.Sprintf("over%d", i), 150, uint64(i)) })
			}
			wg.Wait()
			var effects, over int
			wait.Until(t, "every committed event applied", func() bool {
				testdbQuery(t, db, `SELECT count(*), count(*) FILTER (WHERE applied > 1) FROM "`+schema+`".effects`, &effects, &over)
				return effects == len(app.committed)
			})
			if over != 0 {
				t.Fatalf("%d effects applied twice", over)
			}
			wait.Until(t, "the raw group to see every event", func() bool { return raw.unique() == len(app.committed) })
			for _, d := range raw.deliveries() {
				if !app.committed[d.UUID] {
					t.Fatalf("delivered %s, which did not commit", d.UUID)
				}
			}
			checkStreamOrder(t, raw.deliveries())
		})
	}
}

// natsServer runs a NATS server with JetStream of the test's own, so the test
// can kill and restart it.
type natsServer struct {
	bin       string
	port, dir string
	cmd       *exec.Cmd
}

func (s *natsServer) start(t *testing.T) {
	t.Helper()
	s.cmd = exec.Command(s.bin, "-a", "127.0.0.1", "-p", s.port, "-js", "-sd", s.dir)
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting nats-server (Debian: apt-get install nats-server): %v", err)
	}
	wait.Until(t, "nats-server listening", func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+s.port, 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

func (s *natsServer) kill() {
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
}

// TestRelaySurvivesBrokerRestart: the NATS server is killed in the middle of a
// stream of appends and started again on its data: the relay retries from its
// checkpoint, and nothing is lost.
func TestRelaySurvivesBrokerRestart(t *testing.T) {
	bin := testsvc.Binary(t, "nats-server", "Debian: apt-get install nats-server", "/usr/sbin")
	srv := &natsServer{bin: bin, port: freePort(t), dir: t.TempDir()}
	srv.start(t)
	t.Cleanup(srv.kill)

	store, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	b := openBroker(t, broker.Config{URL: "nats://127.0.0.1:" + srv.port})
	topic := testsvc.Name("restart.events")
	sub, err := b.Subscriber("consumer")
	if err != nil {
		t.Fatal(err)
	}
	consumer := newInboxConsumer(t, db, schema)
	consumer.consume(t, sub, topic)

	r, err := outbox.NewRelay(store, outbox.Config{Name: "restart", Publisher: b.Publisher(), Topic: topic,
		DB: db, Schema: schema, BatchSize: 20, Backoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	app := &appender{committed: map[string]bool{}, rolledBack: map[string]bool{}}
	done := make(chan struct{})
	go func() { defer close(done); app.run(t, context.Background(), store, db, "restart", 400, 9) }()

	countEffects := func() int {
		var n, over int
		testdbQuery(t, db, `SELECT count(*), count(*) FILTER (WHERE applied > 1) FROM "`+schema+`".effects`, &n, &over)
		if over != 0 {
			t.Fatalf("%d effects applied twice", over)
		}
		return n
	}
	wait.Until(t, "some events through NATS", func() bool { return countEffects() >= 50 })
	srv.kill()
	time.Sleep(300 * time.Millisecond) // the broker stays down while appends go on
	srv.start(t)
	<-done
	wait.Until(t, "every committed event through the restarted NATS", func() bool { return countEffects() == len(app.committed) })
	st, err := r.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d events relayed across a NATS restart; relay published %d", len(app.committed), st.Published)
}

// The relay child: TestMain runs it instead of the tests when childEnv is set.
const childEnv = "STELE_OUTBOX_RELAY_CHILD"

func relayChild() int {
	dsn, schema, topic := os.Getenv("CHILD_DSN"), os.Getenv("CHILD_SCHEMA"), os.Getenv("CHILD_TOPIC")
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema, PollInterval: 10 * time.Millisecond})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx := context.Background()
	b, err := broker.Open(ctx, broker.Config{URL: testsvc.AMQPURL, Logger: quiet})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	r, err := outbox.NewRelay(store, outbox.Config{Name: "killed", Publisher: b.Publisher(), Topic: topic,
		DB: db, Schema: schema, BatchSize: childBatch, LeaseTTL: 300 * time.Millisecond, LeaseRetry: 20 * time.Millisecond, Logger: quiet})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Fprintln(os.Stderr, r.Run(ctx)) // until it is killed
	return 1
}

const childBatch = 25

// TestRelayProcessKilled runs the relay as a separate process and kills it
// with SIGKILL again and again while events are appended, each time starting
// a new one, which takes over once the dead one's lease ran out. The consumer,
// over RabbitMQ with an inbox, applies every committed event exactly once;
// duplicates stay under kills × batch size.
func TestRelayProcessKilled(t *testing.T) {
	testsvc.Require(t, "RabbitMQ", testsvc.HostPort(testsvc.AMQPURL))
	store, schema := pgSetup(t, nil)
	db := testdb.Open(t, "postgres")
	b := openBroker(t, broker.Config{URL: testsvc.AMQPURL})
	topic := testsvc.Name("killed.events")
	t.Cleanup(func() {
		for _, bc := range brokerCases() {
			if bc.name == "rabbitmq" {
				bc.cleanup(t, topic)
			}
		}
	})
	sub, err := b.Subscriber("consumer")
	if err != nil {
		t.Fatal(err)
	}
	consumer := newInboxConsumer(t, db, schema)
	consumer.consume(t, sub, topic)
	rawSub, err := b.Subscriber("raw")
	if err != nil {
		t.Fatal(err)
	}
	raw := collect(t, rawSub, topic)

	// Paced so the appends span several relay lives.
	app := &appender{pause: 4 * time.Millisecond, committed: map[string]bool{}, rolledBack: map[string]bool{}}
	done := make(chan struct{})
	go func() { defer close(done); app.run(t, context.Background(), store, db, "killed", 800, 3) }()

	startChild := func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"=1", "CHILD_DSN="+testdb.DSN(), "CHILD_SCHEMA="+schema, "CHILD_TOPIC="+topic)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	rng := rand.New(rand.NewPCG(11, 12))
	kills := 0
	for {
		select {
		case <-done:
		default:
			cmd := startChild()
			time.Sleep(time.Duration(150+rng.IntN(400)) * time.Millisecond)
			_ = cmd.Process.Kill() // SIGKILL: no release, no last checkpoint
			_ = cmd.Wait()
			kills++
			continue
		}
		break
	}
	last := startChild()
	t.Cleanup(func() { _ = last.Process.Kill(); _ = last.Wait() })
	var effects, over int
	wait.Until(t, "every committed event applied", func() bool {
		testdbQuery(t, db, `SELECT count(*), count(*) FILTER (WHERE applied > 1) FROM "`+schema+`".effects`, &effects, &over)
		return effects == len(app.committed)
	})
	if over != 0 {
		t.Fatalf("%d effects applied twice", over)
	}
	wait.Until(t, "the raw group to see every event", func() bool { return raw.unique() == len(app.committed) })
	got := raw.deliveries()
	for _, d := range got {
		if !app.committed[d.UUID] {
			t.Fatalf("delivered %s, which did not commit", d.UUID)
		}
	}
	dups := len(got) - raw.unique()
	t.Logf("%d committed, %d relay processes killed, %d deliveries, %d duplicates", len(app.committed), kills, len(got), dups)
	if kills < 4 {
		t.Fatalf("only %d kills: the appends finished too fast to test anything", kills)
	}
	if dups > kills*childBatch {
		t.Fatalf("%d duplicates after %d kills, want at most %d", dups, kills, kills*childBatch)
	}
	checkStreamOrder(t, got)
}
