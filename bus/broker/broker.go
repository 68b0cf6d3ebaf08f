// Package broker opens the message bus stele runs on: the embedded,
// in-process GoChannel bus or one of the external brokers stele supports
// (PostgreSQL, RabbitMQ, NATS JetStream, Redis Streams, Kafka), all through
// one constructor and all configured for the same guarantees.
//
// A Broker hands out Watermill publishers and subscribers
// (github.com/ThreeDotsLabs/watermill/message), so Watermill's Router and
// middleware work on every kind. What every kind is configured to give:
//
//   - Durable publish: Publish returns nil only after the broker has accepted
//     each message (AMQP publisher confirms, a JetStream PubAck, a Redis XADD
//     reply, a Kafka produce acknowledged by all in-sync replicas, a committed
//     PostgreSQL insert; GoChannel: every in-process subscriber acked it).
//   - At-least-once delivery: a message is removed only when a subscriber
//     acks it. Nack means redelivery, never loss; consumers must be
//     idempotent (deduplicate on Message.UUID).
//   - Order: one subscriber of a consumer group receives a topic's messages
//     in publish order as long as nothing is nacked (Kafka: per partition,
//     see PartitionKey). A nacked message may come back after later ones.
//   - Consumer groups: every group receives every message of a topic;
//     subscribers of one group share the messages between them. GoChannel
//     has no groups: every subscriber receives every message.
//   - The message UUID, the payload (any bytes) and every metadata entry
//     arrive unchanged. Some adapters add entries on redelivery (AMQP:
//     "_watermill_amqp_redelivered"); none removes or changes one.
//
// Topic and group names are 1 to 180 (groups: 64) characters of
// [A-Za-z0-9._-], neither starting nor ending with a dot and without two dots
// in a row (stele uses dotted names such as "stele.events"); every kind
// accepts them (see each Kind for how a name is mapped).
package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jmoiron/sqlx"
)

// Kind names a message broker.
type Kind string

const (
	// GoChannel is the embedded, in-process bus (Watermill's gochannel, one
	// per topic), the default. It is configured with
	// BlockPublishUntilSubscriberAck: Publish returns once every subscriber
	// of the topic acked the message, which keeps order and gives
	// back-pressure. It is never Persistent: a message published while a
	// topic has no subscriber is dropped, and nothing survives the process.
	// It has no consumer groups (every subscriber gets every message) and
	// re-sends a nacked message at once, without delay: use a Retry
	// middleware with a backoff. A handler must not publish to its own topic
	// while something subscribes to that topic (the GoChannel deadlocks).
	GoChannel Kind = "gochannel"

	// Postgres is watermill-sql/v4 with its default PostgreSQL schema (a
	// table "watermill_<topic>" per topic, payload BYTEA, metadata JSON) and
	// DefaultPostgreSQLOffsetsAdapter (table "watermill_offsets_<topic>",
	// one row per consumer group). Tables are created when first used
	// (publish, subscribe or SubscribeInitialize), in Config.Schema when
	// set. Names longer than PostgreSQL's 63 bytes are shortened with a hash.
	// A group's subscribers take turns (a row lock), they do not share the
	// work; a new group starts at the first message of the table. Message
	// UUIDs must be at most 36 characters. Any long-running transaction on
	// the cluster delays delivery (see the watermill-sql documentation).
	Postgres Kind = "postgres"

	// RabbitMQ is watermill-amqp/v3 with the durable pub/sub topology: a
	// durable fanout exchange named after the topic, and per consumer group
	// a durable queue "<topic>_<group>" bound to it; persistent messages,
	// publisher confirms. A message published before a group's queue exists
	// (before the group first subscribed or was initialised with
	// SubscribeInitialize) is not kept for that group.
	RabbitMQ Kind = "amqp"

	// NATS is watermill-nats/v2 on JetStream. Each topic is a subject
	// captured by a stream: an existing stream that captures it, or one
	// created as "<topic>" (dots, which stream names cannot hold, mapped to
	// "_" and the name suffixed with a hash) with file storage and limits
	// retention. Each consumer group is a durable push consumer named after
	// the group (mapped the same way; suffixed with a hash of the topic on a
	// stream that captures several subjects) that starts at the first
	// message of the stream; the broker creates it, so it outlives its
	// subscribers. Metadata travels as headers; entries NATS headers would
	// change (spaces around a value, line breaks, keys that are not HTTP
	// tokens or start with "Nats-") travel encoded in one header. A message
	// a subscriber had received but not handed out when its subscription
	// ended is redelivered after the ack wait (30 s).
	NATS Kind = "nats"

	// Redis is watermill-redisstream: a stream (key) per topic, XADD to
	// publish, one Redis consumer group per group, starting at the first
	// entry of the stream. A message left un-acked by a subscriber that went
	// away (or whose subscription ended while it held the message) is
	// claimed by another subscriber of its group after it has been idle for
	// a minute.
	Redis Kind = "redis"

	// Kafka is watermill-kafka/v3 (Sarama, protocol 2.1, so any broker from
	// Kafka 2.1 on). Missing topics are created with Config.Partitions and
	// Config.ReplicationFactor. Messages with the metadata entry PartitionKey
	// go to the partition of that key, and order is kept per partition; a new
	// consumer group starts at the oldest retained offset. Sarama records
	// metrics with rcrowley/go-metrics, which starts one process-wide
	// goroutine that never ends; set metrics.UseNilMetrics = true before
	// Open to turn that off.
	Kafka Kind = "kafka"
)

// PartitionKey is the metadata key whose value chooses a message's Kafka
// partition: messages with the same value are kept in order. Give every
// message of one stream the same value (its stream id). Messages without it
// are spread over the partitions. Other kinds ignore it (and keep it).
const PartitionKey = "partition_key"

// Default values of Config fields left zero.
const (
	DefaultPollInterval = 100 * time.Millisecond
	DefaultDialTimeout  = 10 * time.Second
)

// Config says which broker to open and how.
type Config struct {
	// Kind is the broker. When empty it is inferred from URL's scheme (see
	// ParseURL), or Postgres when DB is set.
	Kind Kind

	// URL is where the broker is:
	//   amqp://guest:guest@127.0.0.1:5672/ (or amqps://)
	//   nats://127.0.0.1:4222
	//   redis://127.0.0.1:6379/0 (or rediss://)
	//   kafka://host:port[,host:port...]
	//   postgres://user@host:5432/db?sslmode=disable (any lib/pq or pgx DSN URL)
	// GoChannel needs none ("gochannel" and "memory" are accepted).
	URL string

	// DB is the PostgreSQL pool to use instead of opening URL: set one of
	// the two for Postgres. The Broker does not close it.
	DB *sqlx.DB

	// Schema is the PostgreSQL schema the watermill tables live in; it is
	// created when missing. Empty means the connection's search_path.
	Schema string

	// TLS, when set, is used to connect to AMQP (amqps), NATS, Redis and
	// Kafka. PostgreSQL takes its TLS settings from the DSN (sslmode).
	TLS *tls.Config

	// PollInterval is how often a Postgres subscriber looks for new messages
	// when it found none. Default DefaultPollInterval.
	PollInterval time.Duration

	// Partitions and ReplicationFactor are used when a Kafka topic that does
	// not exist yet is created. Default 1 and 1. Existing topics are used as
	// they are.
	Partitions        int32
	ReplicationFactor int16

	// DialTimeout bounds each attempt to connect (or, when Open's context
	// has an earlier deadline, that deadline). Default DefaultDialTimeout.
	DialTimeout time.Duration

	// Logger receives Watermill's logs (Watermill's info level is logged at
	// debug, they are chatty). Default slog.Default().
	Logger *slog.Logger
}

// ConfigError is a configuration Open, ParseURL or Subscriber refused before
// connecting to anything.
type ConfigError struct {
	Field  string // the Config field (or "group", "topic")
	Reason string
}

func (e *ConfigError) Error() string {
	return "broker: invalid " + e.Field + ": " + e.Reason
}

// ConnectError is a failure to reach or set up a broker.
type ConnectError struct {
	Kind Kind
	Addr string // the URL without its password, or the brokers' addresses
	Err  error
}

func (e *ConnectError) Error() string {
	return fmt.Sprintf("broker: cannot connect to %s at %s: %v", e.Kind, e.Addr, e.Err)
}

func (e *ConnectError) Unwrap() error { return e.Err }

// ErrClosed is returned by a Broker, or a Subscriber it made, after Close.
var ErrClosed = errors.New("broker: closed")

// ParseURL returns the Config for a broker URL: "gochannel" or "memory" for
// the in-process bus, else the scheme decides the Kind (postgres,
// postgresql, amqp, amqps, nats, redis, rediss, kafka). Any other scheme is
// a *ConfigError.
func ParseURL(s string) (Config, error) {
	s = strings.TrimSpace(s)
	switch strings.ToLower(s) {
	case "":
		return Config{}, &ConfigError{Field: "URL", Reason: "empty"}
	case "gochannel", "memory", "gochannel://", "memory://":
		return Config{Kind: GoChannel}, nil
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok || scheme == "" {
		return Config{}, &ConfigError{Field: "URL", Reason: fmt.Sprintf("%q has no scheme (want gochannel, postgres://, amqp://, nats://, redis:// or kafka://)", redact(s))}
	}
	var k Kind
	switch strings.ToLower(scheme) {
	case "postgres", "postgresql":
		k = Postgres
	case "amqp", "amqps":
		k = RabbitMQ
	case "nats":
		k = NATS
	case "redis", "rediss":
		k = Redis
	case "kafka":
		k = Kafka
		if _, err := kafkaBrokers(s); err != nil {
			return Config{}, err
		}
		return Config{Kind: k, URL: s}, nil
	case "gochannel", "memory":
		if rest != "" {
			return Config{}, &ConfigError{Field: "URL", Reason: fmt.Sprintf("%q: the in-process bus takes no address", s)}
		}
		return Config{Kind: GoChannel}, nil
	default:
		return Config{}, &ConfigError{Field: "URL", Reason: fmt.Sprintf("unknown scheme %q (want gochannel, postgres, amqp, nats, redis or kafka)", scheme)}
	}
	u, err := url.Parse(s)
	if err != nil {
		return Config{}, &ConfigError{Field: "URL", Reason: fmt.Sprintf("%q: %v", redact(s), errors.Unwrap(err))}
	}
	if u.Host == "" && k != Postgres { // a PostgreSQL DSN may name a socket in its query
		return Config{}, &ConfigError{Field: "URL", Reason: fmt.Sprintf("%q has no host", redact(s))}
	}
	return Config{Kind: k, URL: s}, nil
}

// kafkaBrokers returns the host:port list of a kafka:// URL.
func kafkaBrokers(s string) ([]string, error) {
	_, rest, _ := strings.Cut(s, "://")
	hosts, _, _ := strings.Cut(rest, "/")
	hosts, _, _ = strings.Cut(hosts, "?")
	var out []string
	for _, h := range strings.Split(hosts, ",") {
		h = strings.TrimSpace(h)
		host, port, ok := strings.Cut(h, ":")
		if h == "" || !ok || host == "" || port == "" || strings.ContainsAny(port, ":@") {
			return nil, &ConfigError{Field: "URL", Reason: fmt.Sprintf("%q: want kafka://host:port[,host:port...]", s)}
		}
		out = append(out, h)
	}
	return out, nil
}

// redact hides a URL's password, also in a URL that does not parse.
func redact(s string) string {
	if u, err := url.Parse(s); err == nil {
		if u.User != nil {
			return u.Redacted()
		}
		return s
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return s
	}
	authority := rest
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority = rest[:i]
	}
	at := strings.LastIndexByte(authority, '@')
	if at < 0 {
		return s
	}
	user, _, hasPassword := strings.Cut(authority[:at], ":")
	if !hasPassword {
		return s
	}
	return scheme + "://" + user + ":xxxxx" + rest[at:]
}

var identifier = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,62}$`)

// normalize validates cfg and fills in the defaults.
func normalize(cfg Config) (Config, error) {
	if cfg.Kind == "" {
		switch {
		case cfg.URL != "":
			p, err := ParseURL(cfg.URL)
			if err != nil {
				return cfg, err
			}
			cfg.Kind = p.Kind
		case cfg.DB != nil:
			cfg.Kind = Postgres
		default:
			return cfg, &ConfigError{Field: "Kind", Reason: "required (or a URL to infer it from)"}
		}
	} else if cfg.URL != "" {
		p, err := ParseURL(cfg.URL)
		if err != nil {
			return cfg, err
		}
		if p.Kind != cfg.Kind {
			return cfg, &ConfigError{Field: "URL", Reason: fmt.Sprintf("%q is a %s URL, Kind is %s", redact(cfg.URL), p.Kind, cfg.Kind)}
		}
	}
	switch cfg.Kind {
	case GoChannel, Postgres, RabbitMQ, NATS, Redis, Kafka:
	default:
		return cfg, &ConfigError{Field: "Kind", Reason: fmt.Sprintf("unknown kind %q", cfg.Kind)}
	}
	if cfg.Kind == GoChannel {
		cfg.URL = ""
	}
	switch {
	case cfg.Kind == Postgres && cfg.DB == nil && cfg.URL == "":
		return cfg, &ConfigError{Field: "URL", Reason: "postgres needs a URL or a DB"}
	case cfg.Kind == Postgres && cfg.DB != nil && cfg.URL != "":
		return cfg, &ConfigError{Field: "DB", Reason: "set DB or URL, not both"}
	case cfg.Kind != Postgres && cfg.DB != nil:
		return cfg, &ConfigError{Field: "DB", Reason: "only used by postgres, not " + string(cfg.Kind)}
	case cfg.Kind != Postgres && cfg.Schema != "":
		return cfg, &ConfigError{Field: "Schema", Reason: "only used by postgres, not " + string(cfg.Kind)}
	case cfg.Kind != GoChannel && cfg.Kind != Postgres && cfg.URL == "":
		return cfg, &ConfigError{Field: "URL", Reason: string(cfg.Kind) + " needs a URL"}
	case (cfg.Kind == GoChannel || cfg.Kind == Postgres) && cfg.TLS != nil:
		return cfg, &ConfigError{Field: "TLS", Reason: "not used by " + string(cfg.Kind) + " (postgres: set sslmode in the DSN)"}
	case cfg.Schema != "" && !identifier.MatchString(cfg.Schema):
		return cfg, &ConfigError{Field: "Schema", Reason: fmt.Sprintf("%q is not an identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63)", cfg.Schema)}
	case cfg.PollInterval < 0:
		return cfg, &ConfigError{Field: "PollInterval", Reason: "negative"}
	case cfg.DialTimeout < 0:
		return cfg, &ConfigError{Field: "DialTimeout", Reason: "negative"}
	case cfg.Partitions < 0:
		return cfg, &ConfigError{Field: "Partitions", Reason: "negative"}
	case cfg.ReplicationFactor < 0:
		return cfg, &ConfigError{Field: "ReplicationFactor", Reason: "negative"}
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.Partitions == 0 {
		cfg.Partitions = 1
	}
	if cfg.ReplicationFactor == 0 {
		cfg.ReplicationFactor = 1
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return cfg, nil
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$`)

// validName checks a topic or group name (what is 180 or 64 characters at most).
func validName(field, name string, max int) error {
	switch {
	case name == "":
		return &ConfigError{Field: field, Reason: "empty"}
	case len(name) > max:
		return &ConfigError{Field: field, Reason: fmt.Sprintf("%q is longer than %d characters", name, max)}
	case !namePattern.MatchString(name):
		return &ConfigError{Field: field, Reason: fmt.Sprintf("%q: want [A-Za-z0-9._-], no leading, trailing or double dot", name)}
	}
	return nil
}

const (
	maxTopic = 180
	maxGroup = 64
)

// adapter is what a Kind plugs into a Broker.
type adapter struct {
	pub message.Publisher
	// preparePub runs once per topic before the first publish (creating a
	// stream or a topic); may be nil.
	preparePub func(topic string) error
	// newSub makes the subscriber of a consumer group.
	newSub func(group string) (groupSub, error)
	// close releases what the adapter holds besides pub and the
	// subscribers; runs last; may be nil.
	close func() error
}

// groupSub is an adapter's subscriber for one consumer group.
type groupSub struct {
	inner message.Subscriber
	// prepare runs before each Subscribe; may be nil.
	prepare func(topic string) error
	// initialize implements SubscribeInitialize: create what the group needs
	// so that messages published from now on are kept for it. Nil means
	// prepare (or nothing).
	initialize func(topic string) error
	// close closes inner; nil means inner.Close.
	close func() error
	// ended, when set, runs once a subscription to topic has ended and
	// inner closed its channel. Setting it promises that inner closes a
	// subscription's channel when its context is cancelled, so Close waits
	// for every ended before it closes inner.
	ended func(topic string)
}

// Broker is an open message broker: one shared publisher and the
// subscribers made with Subscriber. It is safe for concurrent use.
type Broker struct {
	kind Kind
	pub  *publisher
	ad   adapter

	mu     sync.Mutex
	subs   []*subscriber
	closed bool
}

// Open connects to the broker cfg describes and checks that it answers.
// Config errors are *ConfigError (nothing was contacted); a broker that
// cannot be reached is a *ConnectError naming the kind and address.
func Open(ctx context.Context, cfg Config) (*Broker, error) {
	cfg, err := normalize(cfg)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	logger := cancelQuiet{watermill.NewSlogLoggerWithLevelMapping(cfg.Logger, map[slog.Level]slog.Level{slog.LevelInfo: slog.LevelDebug})}
	var ad adapter
	switch cfg.Kind {
	case GoChannel:
		ad = openGoChannel(logger)
	case Postgres:
		ad, err = openPostgres(ctx, cfg, logger)
	case RabbitMQ:
		ad, err = openAMQP(ctx, cfg, logger)
	case NATS:
		ad, err = openNATS(ctx, cfg, logger)
	case Redis:
		ad, err = openRedis(ctx, cfg, logger)
	case Kafka:
		ad, err = openKafka(ctx, cfg, logger)
	}
	if err != nil {
		return nil, err
	}
	return &Broker{kind: cfg.Kind, ad: ad, pub: &publisher{inner: ad.pub, prepare: ad.preparePub}}, nil
}

// dialTimeout is how long one connection attempt may take.
func dialTimeout(ctx context.Context, cfg Config) time.Duration {
	d := cfg.DialTimeout
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < d {
		d = max(time.Until(dl), time.Millisecond)
	}
	return d
}

// Kind says which broker this is.
func (b *Broker) Kind() Kind { return b.kind }

// Publisher returns the broker's publisher, shared by all callers and safe
// for concurrent use. Publish returns nil only once the broker accepted every
// message (see the package documentation); when it returns an error, some of
// the messages may have been published. Publish refuses an invalid topic
// name with a *ConfigError. The Broker closes it.
func (b *Broker) Publisher() message.Publisher { return b.pub }

// Subscriber returns a new subscriber in consumer group group: every group
// receives every message published to a topic, and the subscribers of one
// group share them (each message goes to one of them, at least once). Call it
// twice with the same group for two competing subscribers.
//
// GoChannel has no consumer groups: group is checked but otherwise ignored,
// and every subscriber receives every message.
//
// Cancelling the context given to Subscribe closes the returned channel;
// messages the adapter still had for it are nacked, so they are redelivered
// (NATS and Redis: see their Kind for messages not yet handed out). An ack
// given just before the subscription ends may not reach the broker: the
// message is then delivered again (the adapters send an ack before they hand
// out the next message, so only the last one can be affected).
// The returned subscriber also implements message.SubscribeInitializer:
// SubscribeInitialize(topic) creates what the group needs so that messages
// published from then on are kept for it. Closing the subscriber, or the
// Broker, ends all its subscriptions.
func (b *Broker) Subscriber(group string) (message.Subscriber, error) {
	if err := validName("group", group, maxGroup); err != nil {
		return nil, err
	}
	b.mu.Lock()
	closed := b.closed
	b.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	gs, err := b.ad.newSub(group)
	if err != nil {
		return nil, err
	}
	s := newSubscriber(gs)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		_ = s.Close()
		return nil, ErrClosed
	}
	b.subs = append(b.subs, s)
	return s, nil
}

// Close closes every subscriber the Broker made (their channels close), then
// the publisher and the connections. It returns once all of it has stopped.
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	subs := b.subs
	b.subs = nil
	b.mu.Unlock()

	var errs []error
	var wg sync.WaitGroup
	errc := make(chan error, len(subs))
	for _, s := range subs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errc <- s.Close()
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		errs = append(errs, err)
	}
	errs = append(errs, b.pub.Close())
	if b.ad.close != nil {
		errs = append(errs, b.ad.close())
	}
	return errors.Join(errs...)
}

// publisher validates topic names and prepares each topic once before
// handing the messages to the adapter's publisher.
type publisher struct {
	inner    message.Publisher
	prepare  func(topic string) error
	prepared sync.Map // topic → struct{}

	closeOnce sync.Once
	closeErr  error
}

func (p *publisher) Publish(topic string, msgs ...*message.Message) error {
	if err := validName("topic", topic, maxTopic); err != nil {
		return err
	}
	if p.prepare != nil {
		if _, ok := p.prepared.Load(topic); !ok {
			if err := p.prepare(topic); err != nil {
				return fmt.Errorf("broker: preparing topic %s: %w", topic, err)
			}
			p.prepared.Store(topic, struct{}{})
		}
	}
	return p.inner.Publish(topic, msgs...)
}

func (p *publisher) Close() error {
	p.closeOnce.Do(func() { p.closeErr = p.inner.Close() })
	return p.closeErr
}

// subscriber wraps an adapter's subscriber: it validates topics, prepares
// them, and forwards each subscription through a channel it closes as soon
// as the subscription's context is cancelled, whatever the adapter does.
type subscriber struct {
	gs     groupSub
	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup // forwarders

	closeOnce sync.Once
	closeErr  error
}

func newSubscriber(gs groupSub) *subscriber {
	ctx, cancel := context.WithCancel(context.Background())
	return &subscriber{gs: gs, ctx: ctx, cancel: cancel}
}

func (s *subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	if err := validName("topic", topic, maxTopic); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	s.wg.Add(1)
	s.mu.Unlock()

	if s.gs.prepare != nil {
		if err := s.gs.prepare(topic); err != nil {
			s.wg.Done()
			return nil, fmt.Errorf("broker: preparing topic %s: %w", topic, err)
		}
	}
	subCtx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(s.ctx, cancel)
	in, err := s.gs.inner.Subscribe(subCtx, topic)
	if err != nil {
		stop()
		cancel()
		s.wg.Done()
		return nil, err
	}
	out := make(chan *message.Message)
	go func() {
		defer s.wg.Done()
		defer stop()
		defer cancel()
		forward(subCtx, in, out)
		if s.gs.ended != nil {
			s.gs.ended(topic)
		}
	}()
	return out, nil
}

// forward passes messages from in to out until ctx is cancelled or in is
// closed, then closes out and nacks whatever else in yields until the
// adapter closes it.
func forward(ctx context.Context, in <-chan *message.Message, out chan<- *message.Message) {
	defer func() {
		for m := range in {
			m.Nack()
		}
	}()
	defer close(out)
	for {
		select {
		case m, ok := <-in:
			if !ok {
				return
			}
			select {
			case out <- m:
			case <-ctx.Done():
				m.Nack()
				return
			}
		case <-ctx.Done():
			return
		}
	}
}

// SubscribeInitialize creates what the group needs for topic, so that
// messages published from now on are kept for it (the topic's table, queue,
// stream, consumer, consumer group or Kafka topic).
func (s *subscriber) SubscribeInitialize(topic string) error {
	if err := validName("topic", topic, maxTopic); err != nil {
		return err
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return ErrClosed
	}
	init := s.gs.initialize
	if init == nil {
		init = s.gs.prepare
	}
	if init == nil {
		return nil
	}
	if err := init(topic); err != nil {
		return fmt.Errorf("broker: initialising topic %s: %w", topic, err)
	}
	return nil
}

// Close ends every subscription (their channels close) and the adapter's
// subscriber, and returns once they have stopped.
func (s *subscriber) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		if s.gs.ended != nil {
			s.wg.Wait() // the subscriptions end on the cancel alone
		}
		if s.gs.close != nil {
			s.closeErr = s.gs.close()
		} else {
			s.closeErr = s.gs.inner.Close()
		}
		s.wg.Wait()
	})
	return s.closeErr
}

// cancelQuiet logs at debug level the errors that only say a context was
// cancelled: adapters log them as errors when a subscription ends, as it
// does whenever its context is cancelled or the subscriber closed.
type cancelQuiet struct{ watermill.LoggerAdapter }

func (l cancelQuiet) Error(msg string, err error, fields watermill.LogFields) {
	if errors.Is(err, context.Canceled) {
		l.LoggerAdapter.Debug(msg, fields.Add(watermill.LogFields{"err": err.Error()}))
		return
	}
	l.LoggerAdapter.Error(msg, err, fields)
}

func (l cancelQuiet) With(fields watermill.LogFields) watermill.LoggerAdapter {
	return cancelQuiet{l.LoggerAdapter.With(fields)}
}
