// Package outbox publishes what was appended to the event store to a
// Watermill publisher, and dedupes it on the consumer's side.
//
// The event log is the outbox: an event appended in a transaction (alone, or
// with business rows through AppendTx) is relayed once that transaction is
// visible in the global feed, so there is never a second write to get wrong.
// The Relay reads the feed from its checkpoint, publishes, and moves the
// checkpoint only after the broker confirmed: delivery is at least once, in
// stream order. The Inbox gives consumers exactly-once effect.
package outbox

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"math/rand/v2"
	"os"
	"regexp"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
)

// DefaultTopic is where events go when Config names no topic.
const DefaultTopic = "stele.events"

// Config tunes a Relay.
type Config struct {
	// Name identifies the relay: its lease and checkpoint. Required;
	// [a-z0-9_.-], at most 100 bytes.
	Name string
	// Publisher receives the messages. Required. Its Publish must return
	// only once the broker has the message (bus/broker configures every
	// adapter that way); the checkpoint moves after it returns.
	Publisher message.Publisher
	// Topic receives every message, unless TopicFor names another for an
	// event. Defaults to DefaultTopic.
	Topic    string
	TopicFor func(eventstore.Event) string
	// Categories and Types, when set, relay only events of those stream
	// categories and event types; Filter, when set, must also accept an
	// event. Skipped events still move the checkpoint.
	Categories []string
	Types      []string
	Filter     func(eventstore.Event) bool
	// Map, when set, turns an event into the public integration message to
	// publish instead of the event itself (nil skips the event). The
	// relay stamps it with the event's id (when it has no UUID), order key,
	// position and trace context; see bus.Stamp.
	Map func(context.Context, eventstore.Event) (*message.Message, error)
	// From is where a relay with no checkpoint yet starts: after this
	// position. Defaults to the start of the log.
	From eventstore.Position
	// BatchSize is how many events are read, published and checkpointed
	// together. Defaults to 256. After a crash at most one batch per lane
	// is published again.
	BatchSize int
	// Lanes publish a batch in parallel, each stream always in the same lane
	// so its order holds. Defaults to 4; 1 keeps the feed's order across
	// streams too.
	Lanes int
	// DB and Schema hold the lease and checkpoint (the schema pgstore
	// migrated). Without DB they live in State, in memory.
	DB     *sqlx.DB
	Schema string
	State  *MemoryState
	// LeaseTTL is how long a lease lasts without renewal; another relay of
	// the same name takes over once it has run out. Defaults to 10s.
	LeaseTTL time.Duration
	// LeaseRetry is how often a relay without the lease tries to take it.
	// Defaults to LeaseTTL/4.
	LeaseRetry time.Duration
	// Backoff is the first wait after a failed publish; each next one
	// doubles, with jitter, up to MaxBackoff. Defaults 100ms and 10s.
	Backoff, MaxBackoff time.Duration
	// Owner names this relay instance in status output. Defaults to
	// host:pid:random.
	Owner  string
	Logger *slog.Logger
}

var nameRE = regexp.MustCompile(`^[a-z0-9_.-]{1,100}$`)

// ConfigError is returned by NewRelay for a configuration it cannot run.
type ConfigError struct{ Field, Reason string }

func (e *ConfigError) Error() string { return "outbox: Config." + e.Field + ": " + e.Reason }

// ErrNoRelay is returned by ReadStatus for a name no relay has used.
var ErrNoRelay = errors.New("outbox: no such relay")

// errLeaseLost ends a relay session when another relay took over;
// errLeaseExpired stops a publish when the local deadline has passed.
var (
	errLeaseLost    = errors.New("outbox: lease lost to another relay")
	errLeaseExpired = errors.New("outbox: lease deadline passed before publishing")
)

// Relay publishes the global feed to a broker. Create it with NewRelay and
// run it with Run.
type Relay struct {
	store eventstore.Store
	cfg   Config
	state state
	seed  maphash.Seed

	categories map[string]bool
	types      map[string]bool

	// beforeCommit, when set by tests, runs after a batch was published and
	// before its checkpoint is written; an error ends Run as a crash would
	// (the lease is kept until it runs out).
	beforeCommit func() error
	// beforePublish, when set by tests, runs before each Publish call.
	beforePublish func()
}

// NewRelay checks cfg and returns a relay over store.
func NewRelay(store eventstore.Store, cfg Config) (*Relay, error) {
	if !nameRE.MatchString(cfg.Name) {
		return nil, &ConfigError{"Name", fmt.Sprintf("%q: want [a-z0-9_.-], 1 to 100 bytes", cfg.Name)}
	}
	if cfg.Publisher == nil {
		return nil, &ConfigError{"Publisher", "required"}
	}
	if cfg.Topic == "" {
		cfg.Topic = DefaultTopic
	}
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = 256
	}
	if cfg.Lanes <= 0 {
		cfg.Lanes = 4
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = 10 * time.Second
	}
	if cfg.LeaseTTL < 100*time.Millisecond {
		return nil, &ConfigError{"LeaseTTL", "at least 100ms"}
	}
	if cfg.LeaseRetry <= 0 {
		cfg.LeaseRetry = cfg.LeaseTTL / 4
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 10 * time.Second
	}
	if cfg.Owner == "" {
		host, _ := os.Hostname()
		cfg.Owner = fmt.Sprintf("%s:%d:%s", host, os.Getpid(), uuid.NewString()[:8])
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	r := &Relay{store: store, cfg: cfg, seed: maphash.MakeSeed()}
	switch {
	case cfg.DB != nil:
		st, err := newPGState(cfg.DB, cfg.Schema)
		if err != nil {
			return nil, err
		}
		r.state = st
	case cfg.State != nil:
		r.state = cfg.State
	default:
		r.state = NewMemoryState()
	}
	if len(cfg.Categories) > 0 {
		r.categories = map[string]bool{}
		for _, c := range cfg.Categories {
			r.categories[c] = true
		}
	}
	if len(cfg.Types) > 0 {
		r.types = map[string]bool{}
		for _, t := range cfg.Types {
			r.types[t] = true
		}
	}
	return r, nil
}

// Run relays until ctx ends, then gives up its lease and returns ctx's
// error. While another relay of the same name holds the lease, Run waits
// and takes over when that lease runs out. A failed publish is retried with
// backoff from the last checkpoint; Run only returns early for an error no
// retry can fix (a failing Map or a bad configuration).
func (r *Relay) Run(ctx context.Context) error {
	for {
		l, err := r.acquire(ctx)
		if err != nil {
			return err
		}
		err = r.session(ctx, l)
		if errors.Is(err, errCrash) {
			return err // as a crash would: the lease stays held until it runs out
		}
		if ctx.Err() != nil {
			r.releaseLease(l)
			return ctx.Err()
		}
		if errors.Is(err, errLeaseLost) {
			r.cfg.Logger.WarnContext(ctx, "outbox: relay lost its lease; waiting to take it back", "relay", r.cfg.Name, "epoch", l.epoch)
			continue
		}
		if err != nil {
			r.releaseLease(l)
			return err
		}
	}
}

func (r *Relay) releaseLease(l *heldLease) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.state.release(ctx, r.cfg.Name, l.epoch); err != nil {
		r.cfg.Logger.WarnContext(ctx, "outbox: releasing the lease", "relay", r.cfg.Name, "err", err)
	}
}

// heldLease is a lease with the local deadline before which this relay may
// publish. The deadline is measured on this process's monotonic clock from
// before the request that won or renewed the lease, so it ends no later than
// the database's lease_until: once it has passed, this relay publishes
// nothing until it has renewed (which fails if another relay took over).
type heldLease struct {
	lease
	mu       sync.Mutex // guards deadline: lanes renew while they publish
	deadline time.Time
}

func (l *heldLease) until() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return time.Until(l.deadline)
}

func (r *Relay) acquire(ctx context.Context) (*heldLease, error) {
	for {
		start := time.Now()
		l, ok, err := r.state.acquire(ctx, r.cfg.Name, r.cfg.Owner, r.cfg.LeaseTTL)
		if err != nil && ctx.Err() == nil {
			r.cfg.Logger.WarnContext(ctx, "outbox: taking the lease", "relay", r.cfg.Name, "err", err)
		}
		if ok {
			if l.checkpoint == eventstore.Start && r.cfg.From != eventstore.Start {
				// Record From as the checkpoint, so that status readers
				// that do not know it (ReadStatus) measure the right backlog.
				l.checkpoint = r.cfg.From
				if _, err := r.state.commit(ctx, r.cfg.Name, l.epoch, r.cfg.LeaseTTL, progress{pos: r.cfg.From}); err != nil {
					r.cfg.Logger.WarnContext(ctx, "outbox: recording the start position", "relay", r.cfg.Name, "err", err)
				}
			}
			r.cfg.Logger.InfoContext(ctx, "outbox: relay holds the lease", "relay", r.cfg.Name, "epoch", l.epoch, "after", l.checkpoint)
			return &heldLease{lease: l, deadline: start.Add(r.cfg.LeaseTTL)}, nil
		}
		if !sleep(ctx, r.cfg.LeaseRetry) {
			return nil, ctx.Err()
		}
	}
}

// ensure renews the lease when half of it is gone (or always, with force),
// and reports errLeaseLost when it cannot be held.
func (r *Relay) ensure(ctx context.Context, l *heldLease, force bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !force && time.Until(l.deadline) > r.cfg.LeaseTTL/2 {
		return nil
	}
	start := time.Now()
	ok, err := r.state.renew(ctx, r.cfg.Name, l.epoch, r.cfg.LeaseTTL)
	if err != nil {
		if time.Now().Before(l.deadline) {
			return nil // still ours for now; try again before the next publish
		}
		return fmt.Errorf("%w (renewal failed: %v)", errLeaseLost, err)
	}
	if !ok {
		return errLeaseLost
	}
	l.deadline = start.Add(r.cfg.LeaseTTL)
	return nil
}

// errCrash is what a test hook returns to end Run like a crash.
var errCrash = errors.New("outbox: relay crashed (test)")

// session relays from the lease's checkpoint until ctx ends or the lease is lost.
func (r *Relay) session(ctx context.Context, l *heldLease) error {
	read := eventstore.ReadAllOpts{After: l.checkpoint, Limit: r.cfg.BatchSize}
	if len(r.cfg.Categories) == 1 {
		read.Category = r.cfg.Categories[0]
	}
	failures := 0
	sent := &sentSet{ids: map[uuid.UUID]bool{}}
	for {
		if err := r.ensure(ctx, l, false); err != nil {
			return err
		}
		wake := r.store.WaitForAppend()
		var head eventstore.Position
		var err error
		if read.Category != "" {
			head, err = r.store.Head(ctx)
		}
		var page []eventstore.Event
		if err == nil {
			page, err = r.store.ReadAll(ctx, read)
		}
		skipTo := read.After
		if err == nil && len(page) > 0 {
			skipTo = page[len(page)-1].Position
			err = r.publishAndCommit(ctx, l, page, sent)
		}
		if err == nil && read.Category != "" && len(page) < read.Limit && skipTo.Less(head) {
			// The category feed had nothing more up to head: move the
			// checkpoint past the other categories' events too.
			var ok bool
			ok, err = r.state.commit(ctx, r.cfg.Name, l.epoch, r.cfg.LeaseTTL, progress{pos: head})
			if err == nil && !ok {
				err = errLeaseLost
			}
			if err == nil {
				skipTo = head
			}
		}
		switch {
		case err == nil:
			failures = 0
			if skipTo != read.After {
				read.After = skipTo
				sent.reset()
			}
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, errLeaseExpired):
			// Paused past the local deadline (a long publish, a GC or a
			// stopped process): publish again only if a renewal shows that
			// no other relay took over, from the last checkpoint.
			if err := r.ensure(ctx, l, true); err != nil {
				return err
			}
			continue
		case errors.Is(err, errLeaseLost), errors.Is(err, errCrash), isFatal(err):
			return err
		default:
			failures++
			r.cfg.Logger.WarnContext(ctx, "outbox: relay failed; retrying from its checkpoint", "relay", r.cfg.Name, "attempt", failures, "err", err)
			_ = r.state.fail(ctx, r.cfg.Name, l.epoch, err)
			if !sleep(ctx, backoff(r.cfg.Backoff, r.cfg.MaxBackoff, failures)) {
				return ctx.Err()
			}
			continue
		}
		if len(page) == read.Limit {
			continue
		}
		// Idle: wait for an append, and wake in time to renew the lease.
		t := time.NewTimer(max(l.until()-r.cfg.LeaseTTL/2, r.cfg.LeaseTTL/20))
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// fatalError is an error retrying cannot fix: Run returns it.
type fatalError struct{ err error }

func (e *fatalError) Error() string { return e.err.Error() }
func (e *fatalError) Unwrap() error { return e.err }

func isFatal(err error) bool {
	var f *fatalError
	return errors.As(err, &f)
}

type outgoing struct {
	topic string
	msg   *message.Message
	id    uuid.UUID
}

// sentSet holds the events of the current page a broker confirmed, so a
// retry of the page publishes only the rest.
type sentSet struct {
	mu  sync.Mutex
	ids map[uuid.UUID]bool
}

func (s *sentSet) has(id uuid.UUID) bool { s.mu.Lock(); defer s.mu.Unlock(); return s.ids[id] }
func (s *sentSet) add(ids []uuid.UUID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		s.ids[id] = true
	}
}
func (s *sentSet) reset() { s.mu.Lock(); defer s.mu.Unlock(); clear(s.ids) }

// publishAndCommit publishes a page (what sent does not hold yet) and then
// moves the checkpoint past it.
func (r *Relay) publishAndCommit(ctx context.Context, l *heldLease, page []eventstore.Event, sent *sentSet) error {
	lanes := make([][]outgoing, r.cfg.Lanes)
	n := 0
	for _, e := range page {
		if !r.wants(e) {
			continue
		}
		msg, err := r.message(ctx, e)
		if err != nil {
			return err
		}
		if msg == nil {
			continue
		}
		topic := r.cfg.Topic
		if r.cfg.TopicFor != nil {
			if t := r.cfg.TopicFor(e); t != "" {
				topic = t
			}
		}
		lane := 0
		if r.cfg.Lanes > 1 {
			lane = int(maphash.String(r.seed, e.StreamID) % uint64(r.cfg.Lanes))
		}
		n++
		if sent.has(e.ID) {
			continue // confirmed by an earlier try of this page
		}
		lanes[lane] = append(lanes[lane], outgoing{topic: topic, msg: msg, id: e.ID})
	}
	if n > 0 {
		if err := r.publish(ctx, l, lanes, sent); err != nil {
			return err
		}
	}
	if r.beforeCommit != nil {
		if err := r.beforeCommit(); err != nil {
			return fmt.Errorf("%w: %v", errCrash, err)
		}
	}
	last := page[len(page)-1]
	start := time.Now()
	ok, err := r.state.commit(ctx, r.cfg.Name, l.epoch, r.cfg.LeaseTTL,
		progress{pos: last.Position, published: n, latency: time.Since(last.RecordedAt)})
	if err != nil {
		return err
	}
	if !ok {
		return errLeaseLost
	}
	l.mu.Lock()
	l.deadline = start.Add(r.cfg.LeaseTTL) // the commit renewed the lease
	l.mu.Unlock()
	return nil
}

func (r *Relay) wants(e eventstore.Event) bool {
	if r.categories != nil && !r.categories[eventstore.Category(e.StreamID)] {
		return false
	}
	if r.types != nil && !r.types[e.Type] {
		return false
	}
	return r.cfg.Filter == nil || r.cfg.Filter(e)
}

func (r *Relay) message(ctx context.Context, e eventstore.Event) (*message.Message, error) {
	var msg *message.Message
	if r.cfg.Map == nil {
		msg = bus.ToMessage(e)
	} else {
		m, err := r.cfg.Map(ctx, e)
		if err != nil {
			return nil, &fatalError{fmt.Errorf("outbox: relay %s: mapping %s v%d (%s): %w", r.cfg.Name, e.StreamID, e.Version, e.Type, err)}
		}
		if m == nil {
			return nil, nil
		}
		bus.Stamp(m, e)
		msg = m
	}
	msg.SetContext(ctx)
	return msg, nil
}

// publish sends each lane's messages in order, the lanes in parallel, and
// returns once all are confirmed or one failed.
func (r *Relay) publish(ctx context.Context, l *heldLease, lanes [][]outgoing, sent *sentSet) error {
	busy := 0
	for _, lane := range lanes {
		if len(lane) > 0 {
			busy++
		}
	}
	if busy == 1 {
		for _, lane := range lanes {
			if len(lane) > 0 {
				return r.publishLane(ctx, l, lane, sent)
			}
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(lanes))
	for i, lane := range lanes {
		if len(lane) == 0 {
			continue
		}
		wg.Go(func() { errs[i] = r.publishLane(ctx, l, lane, sent) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// publishLane publishes runs of messages with the same topic in one call
// each, checking before every call that the lease is still ours.
func (r *Relay) publishLane(ctx context.Context, l *heldLease, lane []outgoing, sent *sentSet) error {
	for len(lane) > 0 {
		end := 1
		for end < len(lane) && lane[end].topic == lane[0].topic {
			end++
		}
		msgs := make([]*message.Message, end)
		for i := range msgs {
			msgs[i] = lane[i].msg
		}
		if r.beforePublish != nil {
			r.beforePublish()
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		// The fencing check: past the local deadline another relay may hold
		// the name, so nothing more is published until a renewal proves
		// otherwise (the caller's next ensure does that).
		// Renew first when half of the lease is gone, so a long page
		// does not run into the deadline.
		if err := r.ensure(ctx, l, false); err != nil {
			return err
		}
		if l.until() <= 0 {
			return errLeaseExpired
		}
		if err := r.cfg.Publisher.Publish(lane[0].topic, msgs...); err != nil {
			return fmt.Errorf("outbox: relay %s: publishing to %s: %w", r.cfg.Name, lane[0].topic, err)
		}
		ids := make([]uuid.UUID, end)
		for i := range ids {
			ids[i] = lane[i].id
		}
		sent.add(ids)
		lane = lane[end:]
	}
	return nil
}

func backoff(first, limit time.Duration, attempt int) time.Duration {
	d := first << min(attempt-1, 20)
	if d > limit || d <= 0 {
		d = limit
	}
	return d/2 + rand.N(d/2+1) // jitter: between half and all of it
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
