package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/redis/go-redis/v9"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/outbox"
)

// W7's and W8's settings. The relay's defaults were tuned on this kind of
// machine (2 cores); Options overrides them.
const (
	DefaultW7Events    = 100_000
	W7Writers          = 8
	DefaultAppendBatch = 100  // events per W7 append
	DefaultRelayBatch  = 2000 // outbox.Config.BatchSize
	DefaultRelayLanes  = 64   // outbox.Config.Lanes
	w7Group            = "w7"
	w7RelayName        = "bench_w7"
	w7StreamPrefix     = "w7"
	w7Stall            = 60 * time.Second // no new message for this long fails the run
)

// AllBuses is what `--bus all` means: the embedded bus, PostgreSQL (the
// bench's own database) and the brokers on their default loopback ports.
var AllBuses = []string{"gochannel", "postgres", "amqp://guest:guest@127.0.0.1:5672/", "nats://127.0.0.1:4222", "redis://127.0.0.1:6379/0"}

// Options tunes W7 and W8; zero fields take the defaults above.
type Options struct {
	// Bus is W7's bus: "gochannel", "postgres" (the store's own database,
	// Broker tables in the bench schema), or an amqp://, nats:// or
	// redis:// URL.
	Bus string
	// PollInterval is the PostgreSQL bus subscriber's poll interval
	// (broker.DefaultPollInterval when zero).
	PollInterval time.Duration
	// AppendBatch is how many events each W7 append carries.
	AppendBatch int
	// AppendRate, when set, paces W7's writers to this many events per
	// second in all (0: as fast as the store takes them). Latency is only
	// the bus's own below the rate the relay and the bus can sustain;
	// above it, it is the backlog's age.
	AppendRate float64
	// RelayBatch and RelayLanes are the relay's BatchSize and Lanes.
	RelayBatch, RelayLanes int
	// SagaWorkers is W8's saga.Config.Workers.
	SagaWorkers int
	// Logger receives the relay's, broker's and saga runner's logs; by
	// default warnings and errors go to stderr.
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.Bus == "" {
		o.Bus = "gochannel"
	}
	if o.PollInterval <= 0 {
		o.PollInterval = broker.DefaultPollInterval
	}
	if o.AppendBatch <= 0 {
		o.AppendBatch = DefaultAppendBatch
	}
	if o.RelayBatch <= 0 {
		o.RelayBatch = DefaultRelayBatch
	}
	if o.RelayLanes <= 0 {
		o.RelayLanes = DefaultRelayLanes
	}
	if o.SagaWorkers <= 0 {
		o.SagaWorkers = DefaultSagaWorkers
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	return o
}

// ParseBuses expands the --bus values (each may be a comma list; "all" is
// AllBuses) into a list without repeats, and checks each one names a bus W7
// can run and clean up after.
func ParseBuses(values []string) ([]string, error) {
	var out []string
	add := func(b string) {
		if !slices.Contains(out, b) {
			out = append(out, b)
		}
	}
	for _, v := range values {
		for b := range strings.SplitSeq(v, ",") {
			b = strings.TrimSpace(b)
			switch strings.ToLower(b) {
			case "":
				continue
			case "all":
				for _, a := range AllBuses {
					add(a)
				}
				continue
			case "gochannel", "memory":
				add("gochannel")
				continue
			case "postgres":
				add("postgres")
				continue
			}
			cfg, err := broker.ParseURL(b)
			if err != nil {
				return nil, err
			}
			switch cfg.Kind {
			case broker.RabbitMQ, broker.NATS, broker.Redis:
				add(b)
			case broker.Postgres:
				return nil, fmt.Errorf("--bus %s: use --bus postgres, which is the bench's own database (--dsn)", BusName(b))
			default:
				return nil, fmt.Errorf("--bus %s: W7 runs over gochannel, postgres, amqp://, nats:// or redis://", BusName(b))
			}
		}
	}
	if len(out) == 0 {
		out = []string{"gochannel"}
	}
	return out, nil
}

// BusName is how a --bus value is shown: its kind ("gochannel", "postgres",
// "amqp", "nats", "redis").
func BusName(b string) string {
	switch strings.ToLower(b) {
	case "gochannel", "memory":
		return "gochannel"
	case "postgres":
		return "postgres"
	}
	if cfg, err := broker.ParseURL(b); err == nil {
		return string(cfg.Kind)
	}
	return b
}

// busCleanup deletes what a W7 run created on an external broker: the
// fanout exchange and the group's queue (AMQP), the stream with its
// consumers (NATS), the stream key with its group (Redis). PostgreSQL's
// tables go with the bench schema; GoChannel keeps nothing.
func busCleanup(ctx context.Context, kind broker.Kind, url, topic string) error {
	switch kind {
	case broker.RabbitMQ:
		conn, err := amqp091.Dial(url)
		if err != nil {
			return err
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			return err
		}
		defer ch.Close()
		if _, err := ch.QueueDelete(topic+"_"+w7Group, false, false, false); err != nil {
			return fmt.Errorf("deleting queue %s_%s: %w", topic, w7Group, err)
		}
		if err := ch.ExchangeDelete(topic, false, false); err != nil {
			return fmt.Errorf("deleting exchange %s: %w", topic, err)
		}
	case broker.NATS:
		nc, err := nats.Connect(url)
		if err != nil {
			return err
		}
		defer nc.Close()
		js, err := nc.JetStream()
		if err != nil {
			return err
		}
		// The topic has no dots, so the broker named the stream after it.
		if err := js.DeleteStream(topic); err != nil && !errors.Is(err, nats.ErrStreamNotFound) {
			return fmt.Errorf("deleting stream %s: %w", topic, err)
		}
	case broker.Redis:
		opt, err := redis.ParseURL(url)
		if err != nil {
			return err
		}
		c := redis.NewClient(opt)
		defer c.Close()
		if err := c.Del(ctx, topic).Err(); err != nil {
			return fmt.Errorf("deleting stream %s: %w", topic, err)
		}
	}
	return nil
}

// w7consumer records, for each expected message, when it first arrived and
// its recorded_at metadata. Only its own goroutine writes; the fields are
// read once it has returned.
type w7consumer struct {
	index      map[string]int32
	at         []time.Time
	recorded   []string
	unique     int
	duplicates int
	unknown    int
	progress   atomic.Int64 // unique messages so far, for the stall check
	done       chan struct{}
}

func (c *w7consumer) run(ch <-chan *message.Message) {
	total := len(c.at)
	for m := range ch {
		now := time.Now()
		m.Ack()
		i, ok := c.index[m.UUID]
		switch {
		case !ok:
			c.unknown++
		case !c.at[i].IsZero():
			c.duplicates++
		default:
			c.at[i] = now
			c.recorded[i] = m.Metadata.Get(bus.KeyRecordedAt)
			c.unique++
			c.progress.Store(int64(c.unique))
			if c.unique == total {
				close(c.done)
			}
		}
	}
}

// outboxRelay (W7): a consumer subscribes to a fresh topic on the bus, a
// relay publishes the feed to it, and 8 writers append total events (in
// appends of opts.AppendBatch) to 1,000 streams. It times the messages from
// the first append to the last consumed, and each message from its
// recorded_at (the store's append time) to its arrival.
func outboxRelay(ctx context.Context, store eventstore.Store, db DB, total int, opts Options) (res Result, err error) {
	opts = opts.withDefaults()
	busName := BusName(opts.Bus)
	var cfg broker.Config
	switch busName {
	case "gochannel":
		cfg = broker.Config{Kind: broker.GoChannel}
	case "postgres":
		if db.DB == nil {
			return Result{}, errors.New("bench: W7 over the postgres bus needs --store postgres")
		}
		cfg = broker.Config{Kind: broker.Postgres, DB: db.DB, Schema: db.Schema, PollInterval: opts.PollInterval}
	default:
		if cfg, err = broker.ParseURL(opts.Bus); err != nil {
			return Result{}, err
		}
	}
	cfg.Logger = opts.Logger
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	topic := "stele-bench-w7-" + hex.EncodeToString(b) // no dots: NATS names its stream after it

	br, err := broker.Open(ctx, cfg)
	if err != nil {
		return Result{}, err
	}
	closed := false
	closeBroker := func() error {
		if closed {
			return nil
		}
		closed = true
		return br.Close()
	}
	defer func() {
		cerr := errors.Join(closeBroker(), busCleanup(context.WithoutCancel(ctx), cfg.Kind, cfg.URL, topic))
		if cerr != nil && err == nil {
			err = fmt.Errorf("bench: W7 cleanup on %s: %w", busName, cerr)
		}
	}()

	perAppend := max(1, min(opts.AppendBatch, total/W7Writers))
	appendsPerWriter := max(1, total/perAppend/W7Writers)
	n := appendsPerWriter * W7Writers * perAppend
	ids := make([]uuid.UUID, n)
	c := &w7consumer{index: make(map[string]int32, n), at: make([]time.Time, n), recorded: make([]string, n), done: make(chan struct{})}
	for i := range ids {
		ids[i] = uuid.New()
		c.index[ids[i].String()] = int32(i)
	}

	// The consumer first, so nothing is published before its queue exists.
	sub, err := br.Subscriber(w7Group)
	if err != nil {
		return Result{}, err
	}
	if err := sub.(message.SubscribeInitializer).SubscribeInitialize(topic); err != nil {
		return Result{}, err
	}
	subCtx, stopSub := context.WithCancel(ctx)
	defer stopSub()
	msgs, err := sub.Subscribe(subCtx, topic)
	if err != nil {
		return Result{}, err
	}
	var consumer sync.WaitGroup
	consumer.Go(func() { c.run(msgs) })
	defer consumer.Wait()
	defer stopSub()

	relay, err := outbox.NewRelay(store, outbox.Config{Name: w7RelayName, Publisher: br.Publisher(), Topic: topic,
		DB: db.DB, Schema: db.Schema, BatchSize: opts.RelayBatch, Lanes: opts.RelayLanes, Logger: opts.Logger})
	if err != nil {
		return Result{}, err
	}
	relayCtx, stopRelay := context.WithCancel(ctx)
	defer stopRelay()
	relayErr := make(chan error, 1)
	go func() { relayErr <- relay.Run(relayCtx) }()
	relayDone := false
	defer func() {
		stopRelay()
		if !relayDone {
			<-relayErr
		}
	}()

	// The writers: writer w appends to streams w, w+8, ... of 1,000 in
	// turn, perAppend events each time, with an exact expected version;
	// paced, writer w's i-th append is due at start + (i + w/8) × interval.
	const streams = 1000
	var interval time.Duration
	if opts.AppendRate > 0 {
		interval = time.Duration(float64(perAppend*W7Writers) / opts.AppendRate * float64(time.Second))
	}
	start := time.Now()
	var appendEnd time.Time
	var wg sync.WaitGroup
	errs := make([]error, W7Writers)
	for w := range W7Writers {
		wg.Go(func() {
			mine := streams / W7Writers
			versions := make([]eventstore.Version, mine)
			batch := make([]eventstore.EventData, perAppend)
			for i := range appendsPerWriter {
				if interval > 0 {
					due := start.Add(interval*time.Duration(i) + interval*time.Duration(w)/W7Writers)
					if d := time.Until(due); d > 0 {
						select {
						case <-time.After(d):
						case <-ctx.Done():
							errs[w] = ctx.Err()
							return
						}
					}
				}
				k := i % mine
				first := (w*appendsPerWriter + i) * perAppend
				for j := range batch {
					batch[j] = eventstore.EventData{ID: ids[first+j], Type: "OrderPlaced", Data: Payload, Metadata: Meta}
				}
				r, err := store.Append(ctx, w7StreamPrefix+"-"+strconv.Itoa(w+W7Writers*k), eventstore.Exact(versions[k]), batch)
				if err != nil {
					errs[w] = fmt.Errorf("writer %d: %w", w, err)
					return
				}
				versions[k] = r.LastVersion
			}
		})
	}
	wg.Wait()
	appendEnd = time.Now()
	if err := errors.Join(errs...); err != nil {
		return Result{}, err
	}

	// Wait for every message, failing when the relay stops or nothing new
	// arrives for w7Stall.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last, lastChange := int64(-1), time.Now()
wait:
	for {
		select {
		case <-c.done:
			break wait
		case err := <-relayErr:
			relayDone = true
			return Result{}, fmt.Errorf("bench: W7 relay stopped after %d of %d messages: %w", c.progress.Load(), n, err)
		case <-ctx.Done():
			return Result{}, ctx.Err()
		case <-tick.C:
			if p := c.progress.Load(); p != last {
				last, lastChange = p, time.Now()
			} else if time.Since(lastChange) > w7Stall {
				st, serr := relay.Status(ctx)
				return Result{}, fmt.Errorf("bench: W7 over %s: %d of %d messages arrived, none for %s (relay: published %d, backlog %d, last error %q, status error %v)",
					busName, p, n, w7Stall, st.Published, st.Backlog, st.LastError, serr)
			}
		}
	}
	// The relay checkpoints a batch after the broker confirmed it, so the
	// consumer may be ahead of its count for a moment.
	var st outbox.Status
	for deadline := time.Now().Add(10 * time.Second); ; {
		if st, err = relay.Status(ctx); err != nil || st.Published >= int64(n) || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err != nil {
		return Result{}, fmt.Errorf("bench: W7 relay status: %w", err)
	}
	stopRelay()
	if err := <-relayErr; err != nil && !errors.Is(err, context.Canceled) {
		relayDone = true
		return Result{}, fmt.Errorf("bench: W7 relay: %w", err)
	}
	relayDone = true
	stopSub()
	consumer.Wait()
	// Close the broker before the figures: a GoChannel subscriber may still
	// hold a redelivery, and the external ones their connections.
	if err := closeBroker(); err != nil {
		return Result{}, fmt.Errorf("bench: W7 closing the %s bus: %w", busName, err)
	}

	if c.unique != n || c.unknown != 0 {
		return Result{}, fmt.Errorf("bench: W7 over %s: %d of %d events arrived (%d unknown messages)", busName, c.unique, n, c.unknown)
	}
	if st.Published < int64(n) {
		return Result{}, fmt.Errorf("bench: W7 over %s: the relay reports %d messages published, %d arrived", busName, st.Published, n)
	}
	lastAt := slices.MaxFunc(c.at, func(a, b time.Time) int { return a.Compare(b) })
	elapsed := lastAt.Sub(start)
	lat := make([]time.Duration, n)
	for i, s := range c.recorded {
		at, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return Result{}, fmt.Errorf("bench: W7 over %s: message %s: recorded_at %q: %v", busName, ids[i], s, err)
		}
		lat[i] = max(c.at[i].Sub(at), 0)
	}
	slices.Sort(lat)
	res = Result{
		Workload: "W7", Events: n, Seconds: elapsed.Seconds(),
		EventsPerSec: float64(n) / elapsed.Seconds(),
		P50ms:        ms(percentile(lat, 0.50)), P99ms: ms(percentile(lat, 0.99)),
		PeakRSSMB: peakRSSMB(),
		W7Result: &W7Result{
			Bus: busName, MsgsPerSec: float64(n) / elapsed.Seconds(), Delivered: c.unique, Duplicates: c.duplicates,
			AppendSeconds: appendEnd.Sub(start).Seconds(), AppendRate: opts.AppendRate, Writers: W7Writers, AppendBatch: perAppend,
			RelayBatch: opts.RelayBatch, RelayLanes: opts.RelayLanes,
		},
	}
	if busName == "postgres" {
		res.W7Result.PollIntervalMs = ms(opts.PollInterval)
	}
	return res, nil
}
