package broker_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus/broker"
)

func TestParseURL(t *testing.T) {
	for _, tc := range []struct {
		in   string
		kind broker.Kind
		url  string // want Config.URL; "" for GoChannel
	}{
		{"gochannel", broker.GoChannel, ""},
		{"memory", broker.GoChannel, ""},
		{" GoChannel ", broker.GoChannel, ""},
		{"memory://", broker.GoChannel, ""},
		{"postgres://postgres@127.0.0.1:5432/test?sslmode=disable", broker.Postgres, "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"},
		{"postgresql:///test?host=/var/run/postgresql", broker.Postgres, "postgresql:///test?host=/var/run/postgresql"},
		{"amqp://guest:guest@127.0.0.1:5672/", broker.RabbitMQ, "amqp://guest:guest@127.0.0.1:5672/"},
		{"amqps://rabbit.example:5671/vhost", broker.RabbitMQ, "amqps://rabbit.example:5671/vhost"},
		{"nats://127.0.0.1:4222", broker.NATS, "nats://127.0.0.1:4222"},
		{"NATS://127.0.0.1:4222", broker.NATS, "NATS://127.0.0.1:4222"},
		{"redis://127.0.0.1:6379/0", broker.Redis, "redis://127.0.0.1:6379/0"},
		{"rediss://:secret@redis.example:6380/2", broker.Redis, "rediss://:secret@redis.example:6380/2"},
		{"kafka://127.0.0.1:9092", broker.Kafka, "kafka://127.0.0.1:9092"},
		{"kafka://k1:9092,k2:9092,k3:9092", broker.Kafka, "kafka://k1:9092,k2:9092,k3:9092"},
	} {
		cfg, err := broker.ParseURL(tc.in)
		if err != nil {
			t.Errorf("ParseURL(%q): %v", tc.in, err)
			continue
		}
		if cfg.Kind != tc.kind || cfg.URL != tc.url {
			t.Errorf("ParseURL(%q) = {Kind: %q, URL: %q}, want {%q, %q}", tc.in, cfg.Kind, cfg.URL, tc.kind, tc.url)
		}
	}
}

func TestParseURLErrors(t *testing.T) {
	for _, tc := range []struct{ in, reason string }{
		{"", "empty"},
		{"   ", "empty"},
		{"mqtt://127.0.0.1:1883", `unknown scheme "mqtt"`},
		{"http://127.0.0.1", `unknown scheme "http"`},
		{"127.0.0.1:5672", "no scheme"},
		{"://127.0.0.1", "no scheme"},
		{"nats://", "no host"},
		{"amqp:///vhost", "no host"},
		{"kafka://", "want kafka://host:port"},
		{"kafka://k1", "want kafka://host:port"},
		{"kafka://k1:9092,,k2:9092", "want kafka://host:port"},
		{"gochannel://somewhere", "takes no address"},
		{"redis://127.0.0.1:port/0", "invalid port"},
	} {
		_, err := broker.ParseURL(tc.in)
		var ce *broker.ConfigError
		if !errors.As(err, &ce) {
			t.Errorf("ParseURL(%q) = %v, want a *ConfigError", tc.in, err)
			continue
		}
		if ce.Field != "URL" || !strings.Contains(ce.Reason, tc.reason) {
			t.Errorf("ParseURL(%q): %v, want field URL and a reason saying %q", tc.in, err, tc.reason)
		}
	}
	_, err := broker.ParseURL("amqp://guest:s3cret@127.0.0.1:port/")
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("ParseURL error %v shows the password", err)
	}
}

func TestOpenConfigErrors(t *testing.T) {
	db := &sqlx.DB{} // never used: the config is refused first
	for _, tc := range []struct {
		name  string
		cfg   broker.Config
		field string
	}{
		{"nothing", broker.Config{}, "Kind"},
		{"unknown kind", broker.Config{Kind: "mqtt"}, "Kind"},
		{"unknown scheme", broker.Config{URL: "mqtt://127.0.0.1"}, "URL"},
		{"kind and URL disagree", broker.Config{Kind: broker.NATS, URL: "redis://127.0.0.1:6379"}, "URL"},
		{"amqp without URL", broker.Config{Kind: broker.RabbitMQ}, "URL"},
		{"kafka without URL", broker.Config{Kind: broker.Kafka}, "URL"},
		{"postgres without URL or DB", broker.Config{Kind: broker.Postgres}, "URL"},
		{"postgres with URL and DB", broker.Config{URL: "postgres://127.0.0.1/x", DB: db}, "DB"},
		{"DB for redis", broker.Config{URL: "redis://127.0.0.1:6379", DB: db}, "DB"},
		{"Schema for nats", broker.Config{URL: "nats://127.0.0.1:4222", Schema: "s"}, "Schema"},
		{"bad schema", broker.Config{DB: db, Schema: `a"; DROP TABLE x; --`}, "Schema"},
		{"TLS for postgres", broker.Config{DB: db, TLS: &tls.Config{}}, "TLS"},
		{"TLS for gochannel", broker.Config{Kind: broker.GoChannel, TLS: &tls.Config{}}, "TLS"},
		{"negative poll interval", broker.Config{DB: db, PollInterval: -time.Second}, "PollInterval"},
		{"negative dial timeout", broker.Config{Kind: broker.GoChannel, DialTimeout: -1}, "DialTimeout"},
		{"negative partitions", broker.Config{URL: "kafka://127.0.0.1:9092", Partitions: -1}, "Partitions"},
		{"negative replication", broker.Config{URL: "kafka://127.0.0.1:9092", ReplicationFactor: -1}, "ReplicationFactor"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := broker.Open(t.Context(), tc.cfg)
			if b != nil {
				b.Close()
			}
			var ce *broker.ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("Open = %v, want a *ConfigError", err)
			}
			if ce.Field != tc.field {
				t.Fatalf("Open: %v, want field %s", err, tc.field)
			}
		})
	}
}

// TestOpenConnectErrors opens every kind against a port nothing listens on:
// the error is a *ConnectError naming the kind and the address (without the
// password), and it comes quickly.
func TestOpenConnectErrors(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	for _, tc := range []struct {
		kind broker.Kind
		url  string
	}{
		{broker.Postgres, "postgres://postgres:s3cret@" + addr + "/test?sslmode=disable"},
		{broker.RabbitMQ, "amqp://guest:s3cret@" + addr + "/"},
		{broker.NATS, "nats://" + addr},
		{broker.Redis, "redis://:s3cret@" + addr + "/0"},
		{broker.Kafka, "kafka://" + addr},
	} {
		t.Run(string(tc.kind), func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			b, err := broker.Open(t.Context(), broker.Config{URL: tc.url, DialTimeout: 2 * time.Second, Logger: testLogger})
			if b != nil {
				b.Close()
				t.Fatal("Open succeeded against a closed port")
			}
			var ce *broker.ConnectError
			if !errors.As(err, &ce) {
				t.Fatalf("Open = %v, want a *ConnectError", err)
			}
			msg := err.Error()
			if ce.Kind != tc.kind || !strings.Contains(msg, string(tc.kind)) || !strings.Contains(msg, addr) {
				t.Errorf("error %q does not name %s and %s", msg, tc.kind, addr)
			}
			if strings.Contains(msg, "s3cret") {
				t.Errorf("error %q shows the password", msg)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("Open took %v to fail", d)
			}
			t.Logf("%v (after %v)", err, time.Since(start).Round(time.Millisecond))
		})
	}
}

func TestOpenCancelledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := broker.Open(ctx, broker.Config{Kind: broker.GoChannel}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Open with a cancelled context = %v, want context.Canceled", err)
	}
}

func TestNames(t *testing.T) {
	b, err := broker.Open(t.Context(), broker.Config{Kind: broker.GoChannel})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	sub, err := b.Subscriber("g")
	if err != nil {
		t.Fatal(err)
	}
	for _, topic := range []string{"", "has space", "slash/topic", "star*", "gt>", ".leading", "trailing.", "double..dot", "ünïcode", strings.Repeat("x", 181)} {
		var ce *broker.ConfigError
		if err := b.Publisher().Publish(topic, message.NewMessage(watermill.NewUUID(), nil)); !errors.As(err, &ce) || ce.Field != "topic" {
			t.Errorf("Publish(%q) = %v, want a *ConfigError for the topic", topic, err)
		}
		if _, err := sub.Subscribe(t.Context(), topic); !errors.As(err, &ce) || ce.Field != "topic" {
			t.Errorf("Subscribe(%q) = %v, want a *ConfigError for the topic", topic, err)
		}
	}
	for _, topic := range []string{"stele.events", "orders.commands", "a", "A-b_c.D-9", strings.Repeat("x", 180)} {
		if err := b.Publisher().Publish(topic, message.NewMessage(watermill.NewUUID(), nil)); err != nil {
			t.Errorf("Publish(%q): %v", topic, err)
		}
	}
	for _, group := range []string{"", "a b", strings.Repeat("g", 65)} {
		var ce *broker.ConfigError
		if _, err := b.Subscriber(group); !errors.As(err, &ce) || ce.Field != "group" {
			t.Errorf("Subscriber(%q) = %v, want a *ConfigError for the group", group, err)
		}
	}
}

func TestNATSNames(t *testing.T) {
	for in, want := range map[string]string{
		"orders":       "orders",
		"orders-v2_x":  "orders-v2_x",
		"stele.events": "stele_events_",
	} {
		got := broker.NATSStreamName(in)
		if !strings.HasPrefix(got, want) || strings.Contains(got, ".") {
			t.Errorf("NATSStreamName(%q) = %q, want prefix %q and no dot", in, got, want)
		}
	}
	if broker.NATSStreamName("a.b") == broker.NATSStreamName("a_b") {
		t.Error(`"a.b" and "a_b" map to the same stream`)
	}
	if broker.NATSStreamName("a.b") != broker.NATSStreamName("a.b") {
		t.Error("the mapping is not stable")
	}
	if got := broker.NATSConsumer(broker.NATSStreamName("x.y"), "proj.orders", "x.y"); got != broker.NATSStreamName("proj.orders") {
		t.Errorf("consumer on the topic's own stream = %q, want the group's name", got)
	}
	a, b := broker.NATSConsumer("ALL", "g", "x.a"), broker.NATSConsumer("ALL", "g", "x.b")
	if a == b || strings.Contains(a, ".") {
		t.Errorf("consumers of one group on a shared stream: %q and %q, want two names without dots", a, b)
	}
}

func TestPGTableNames(t *testing.T) {
	if got := broker.PGTableName("", "watermill_", "stele.events"); got != `"watermill_stele.events"` {
		t.Errorf("got %s", got)
	}
	if got := broker.PGTableName("s1", "watermill_offsets_", "t"); got != `"s1"."watermill_offsets_t"` {
		t.Errorf("got %s", got)
	}
	long1 := strings.Repeat("x", 60) + ".a"
	long2 := strings.Repeat("x", 60) + ".b"
	n1, n2 := broker.PGTableName("", "watermill_offsets_", long1), broker.PGTableName("", "watermill_offsets_", long2)
	if len(n1) != 63+2 || n1 == n2 {
		t.Errorf("long names %s and %s: want 63 bytes (plus quotes) and distinct", n1, n2)
	}
}
