package saga

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/outbox"
	"github.com/stele-dev/stele/projection"
)

// Config tunes a Runner.
type Config struct {
	// Publisher sends the commands of Send actions (through an outbox relay
	// the runner runs), and Subscriber brings their replies from
	// ReplyTopic (default "saga.<name>.replies"). Both are required when a
	// step uses Send.
	Publisher  message.Publisher
	Subscriber message.Subscriber
	ReplyTopic string
	// DB and Schema keep the runner's checkpoint (which starting events it
	// has seen) and its relay's lease, in the schema pgstore migrated.
	// Without DB they are kept in memory.
	DB     *sqlx.DB
	Schema string
	// RescanInterval bounds how long the runner sleeps when no saga is due,
	// so a saga whose timer was set by another process is still driven in
	// time. Default 1s.
	RescanInterval time.Duration
	// Workers is how many sagas are driven at once. Default 16.
	Workers int
	// Clock tells the time; sagatest gives a virtual one. Default time.Now.
	Clock func() time.Time
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Runner drives the sagas of one Definition: it starts a saga for each
// starting event, runs its steps, keeps its timers, and resumes every open
// saga after a restart. Run one per definition; a second one is safe
// (appends are optimistic, actions idempotent by key) but duplicates work.
type Runner struct {
	store eventstore.Store
	def   Definition
	cfg   Config

	mu      sync.Mutex
	wake    map[string]time.Time // open sagas and when to drive them next
	busy    map[string]bool
	again   map[string]bool // asked for while busy
	kick    chan struct{}
	cancel  context.CancelFunc
	done    chan struct{}
	started bool
	err     error

	starts *projection.Runner
	relay  *outbox.Relay
	inline inlineState // RunDue's, on a runner not started
}

// NewRunner checks def and cfg.
func NewRunner(store eventstore.Store, def Definition, cfg Config) (*Runner, error) {
	def, err := def.validate()
	if err != nil {
		return nil, err
	}
	sends := false
	for _, s := range def.Steps {
		sends = sends || s.Action.send != nil || s.Compensation.send != nil
	}
	if sends && (cfg.Publisher == nil || cfg.Subscriber == nil) {
		return nil, &DefinitionError{"Steps", "a Send action needs Config.Publisher and Config.Subscriber"}
	}
	if cfg.ReplyTopic == "" {
		cfg.ReplyTopic = "saga." + def.Name + ".replies"
	}
	if cfg.RescanInterval <= 0 {
		cfg.RescanInterval = time.Second
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 16
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Runner{store: store, def: def, cfg: cfg, wake: map[string]time.Time{}, busy: map[string]bool{}, again: map[string]bool{},
		kick: make(chan struct{}, 1)}, nil
}

// Start loads the open sagas, then works in the background until Stop.
func (r *Runner) Start(ctx context.Context) error {
	r.mu.Lock()
	if r.started {
		r.mu.Unlock()
		return errors.New("saga: runner already started")
	}
	r.started = true
	r.mu.Unlock()
	if err := r.loadOpen(ctx); err != nil {
		return err
	}
	// With a DB the feed is handled a page at a time, starting the page's
	// sagas in parallel (the checkpoint moves only once all are started).
	var feed any = projection.HandlerFunc(r.onEvent)
	if r.cfg.DB != nil {
		feed = pageHandler{r}
	}
	starts, err := projection.NewRunner(r.store, feed, projection.Config{
		Name: "saga." + r.def.Name, DB: r.cfg.DB, Schema: r.cfg.Schema, BatchSize: 256, Logger: r.cfg.Logger,
		Retries: math.MaxInt32, MaxBackoff: time.Second}) // a store outage must not end the runner
	if err != nil {
		return err
	}
	r.starts = starts
	if r.cfg.Publisher != nil {
		if r.relay, err = outbox.NewRelay(r.store, outbox.Config{Name: "saga." + r.def.Name, Publisher: r.cfg.Publisher,
			Categories: []string{Category(r.def.Name)}, Types: []string{TypeStepStarted},
			TopicFor: commandTopic, Map: commandMessage, DB: r.cfg.DB, Schema: r.cfg.Schema, Logger: r.cfg.Logger}); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	var replies <-chan *message.Message
	if r.cfg.Subscriber != nil {
		if replies, err = r.cfg.Subscriber.Subscribe(ctx, r.cfg.ReplyTopic); err != nil {
			cancel()
			return fmt.Errorf("saga %s: subscribing to replies: %w", r.def.Name, err)
		}
	}
	if err := starts.Start(ctx); err != nil {
		cancel()
		return err
	}
	r.mu.Lock()
	r.cancel, r.done = cancel, make(chan struct{})
	r.mu.Unlock()
	var wg sync.WaitGroup
	if r.relay != nil {
		wg.Go(func() {
			if err := r.relay.Run(ctx); err != nil && ctx.Err() == nil {
				r.fail(fmt.Errorf("saga %s: command relay: %w", r.def.Name, err))
			}
		})
	}
	if replies != nil {
		wg.Go(func() { r.consumeReplies(ctx, replies) })
	}
	wg.Go(func() { r.schedule(ctx) })
	// The feed of starts, operator requests and awaited events retries for
	// as long as it takes; if it stops anyway, the runner fails visibly
	// rather than going on without it.
	wg.Go(func() {
		select {
		case <-starts.Done():
			if ctx.Err() == nil {
				r.fail(fmt.Errorf("saga %s: the feed of starting events stopped: %w", r.def.Name,
					cmp.Or(starts.Err(), errors.New("no reason given"))))
			}
		case <-ctx.Done():
		}
	})
	go func() {
		wg.Wait()
		_ = starts.Stop(context.Background())
		close(r.done)
	}()
	return nil
}

// Stop ends the runner and waits for it (or ctx). Sagas stay where their
// streams say; the next Start resumes them.
func (r *Runner) Stop(ctx context.Context) error {
	r.mu.Lock()
	cancel, done := r.cancel, r.done
	r.mu.Unlock()
	if cancel == nil {
		return nil
	}
	cancel()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Err is the failure that stopped the runner's background work, if any.
func (r *Runner) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

func (r *Runner) fail(err error) {
	r.cfg.Logger.Error("saga runner failed", "saga", r.def.Name, "err", err)
	r.mu.Lock()
	if r.err == nil {
		r.err = err
	}
	cancel := r.cancel
	r.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// loadOpen finds the sagas not yet ended by reading their category.
func (r *Runner) loadOpen(ctx context.Context) error {
	last := map[string]string{}
	for e, err := range eventstore.IterAll(ctx, r.store, eventstore.ReadAllOpts{Category: Category(r.def.Name)}) {
		if err != nil {
			return fmt.Errorf("saga %s: loading open sagas: %w", r.def.Name, err)
		}
		last[e.StreamID] = e.Type
	}
	now := r.cfg.Clock()
	r.mu.Lock()
	defer r.mu.Unlock()
	for stream, typ := range last {
		if typ != TypeCompleted && typ != TypeCompensated && typ != TypeNeedsAttention {
			r.wake[strings.TrimPrefix(stream, Category(r.def.Name)+"-")] = now
		}
	}
	return nil
}

// onEvent starts sagas and notices operators' requests.
func (r *Runner) onEvent(ctx context.Context, e eventstore.Event) error {
	switch {
	case r.startsSaga(e):
		if err := r.startSaga(ctx, e); err != nil {
			return err
		}
	case (e.Type == TypeStarted || e.Type == TypeRetryRequested || e.Type == TypeAbortRequested) &&
		eventstore.Category(e.StreamID) == Category(r.def.Name):
		// A start too: another runner (or this one, before a restart) may
		// have started the saga after loadOpen looked, and not driven it.
		r.due(strings.TrimPrefix(e.StreamID, Category(r.def.Name)+"-"), time.Time{})
	}
	return r.awaited(ctx, e)
}

// awaited records e for the sagas whose step awaits it.
func (r *Runner) awaited(ctx context.Context, e eventstore.Event) error {
	for i, st := range r.def.Steps {
		if a := st.Action.await; a != nil && a.eventType == e.Type {
			if err := r.receive(ctx, i, a.sagaID(e), e); err != nil {
				return err
			}
		}
	}
	return nil
}

// receive records that the event step i awaits has arrived for saga id.
func (r *Runner) receive(ctx context.Context, step int, id string, e eventstore.Event) error {
	if id == "" {
		return nil
	}
	data, _ := json.Marshal(record{Step: step, StepName: r.def.Steps[step].Name, Output: e.Data,
		Reason: fmt.Sprintf("%s from %s v%d", e.Type, e.StreamID, e.Version)})
	for attempt := 0; ; attempt++ {
		in, err := Load(ctx, r.store, r.def.Name, id)
		if errors.Is(err, ErrNoSaga) {
			return nil // not one of ours
		}
		if err != nil {
			return err
		}
		if _, seen := in.Received[step]; seen || slices.Contains(in.Completed, step) || in.Status.Done() {
			return nil // a repeat, or too late to matter
		}
		_, err = r.store.Append(ctx, StreamID(r.def.Name, id), eventstore.Exact(in.Version), []eventstore.EventData{{
			Type: TypeEventReceived, Data: data,
			Metadata: eventstore.Metadata{CorrelationID: e.Metadata.CorrelationID, CausationID: e.ID.String(),
				TraceParent: e.Metadata.TraceParent, TraceState: e.Metadata.TraceState}}})
		if errors.Is(err, eventstore.ErrConcurrencyConflict) && attempt < 50 {
			continue
		}
		if err == nil {
			r.due(id, time.Time{})
		}
		return err
	}
}

// pageHandler hands the runner a page of the feed: it starts the page's
// sagas in parallel, Workers at a time, then handles the other events in
// feed order. Starting is idempotent, so a page handled again after a crash
// starts nothing twice.
type pageHandler struct{ r *Runner }

func (p pageHandler) HandleBatchTx(ctx context.Context, _ *sqlx.Tx, events []eventstore.Event) error {
	r := p.r
	sem := make(chan struct{}, r.cfg.Workers)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for _, e := range events {
		if !r.startsSaga(e) {
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := r.startSaga(ctx, e); err != nil {
				mu.Lock()
				firstErr = cmp.Or(firstErr, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	for _, e := range events {
		handle := r.onEvent
		if r.startsSaga(e) {
			handle = r.awaited // started above; a step may still await it
		}
		if err := handle(ctx, e); err != nil {
			return err
		}
	}
	return nil
}

// startsSaga reports whether e starts one of this definition's sagas.
func (r *Runner) startsSaga(e eventstore.Event) bool {
	return e.Type == r.def.StartedBy && (r.def.Category == "" || eventstore.Category(e.StreamID) == r.def.Category)
}

func (r *Runner) startSaga(ctx context.Context, e eventstore.Event) error {
	id := r.def.ID(e)
	rec := record{InputType: e.Type}
	if json.Valid(e.Data) {
		rec.Input = e.Data
	} else {
		rec.InputBytes = e.Data // kept as it is, not quoted: StepContext.Input gives it back
	}
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	md := eventstore.Metadata{CorrelationID: e.Metadata.CorrelationID, CausationID: e.ID.String(),
		TraceParent: e.Metadata.TraceParent, TraceState: e.Metadata.TraceState}
	if md.CorrelationID == "" {
		md.CorrelationID = e.ID.String()
	}
	_, err = r.store.Append(ctx, StreamID(r.def.Name, id), eventstore.NoStream,
		[]eventstore.EventData{{Type: TypeStarted, Data: data, Metadata: md}})
	if errors.Is(err, eventstore.ErrConcurrencyConflict) {
		// Started before: a redelivered starting event, or another runner's
		// start. Drive it anyway; if it has ended, that costs one read.
		r.due(id, time.Time{})
		return nil
	}
	if err != nil {
		return fmt.Errorf("saga %s: starting %s: %w", r.def.Name, id, err)
	}
	r.due(id, time.Time{})
	return nil
}

// due asks for saga id to be driven at (or after) at; zero means now. A
// saga being driven is driven again as soon as that ends.
func (r *Runner) due(id string, at time.Time) {
	r.mu.Lock()
	if r.busy[id] {
		r.again[id] = true
	} else if w, ok := r.wake[id]; !ok || at.Before(w) {
		r.wake[id] = at
	}
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// schedule drives due sagas until ctx ends.
func (r *Runner) schedule(ctx context.Context) {
	sem := make(chan struct{}, r.cfg.Workers)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		now := r.cfg.Clock()
		next := now.Add(r.cfg.RescanInterval)
		r.mu.Lock()
		var ready []string
		for id, at := range r.wake {
			if r.busy[id] {
				continue
			}
			if !at.After(now) {
				ready = append(ready, id)
				r.busy[id] = true
			} else if at.Before(next) {
				next = at
			}
		}
		r.mu.Unlock()
		for _, id := range ready {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				r.release(id, time.Time{}, false)
				continue
			}
			wg.Go(func() {
				defer func() { <-sem }()
				at, open, err := r.drive(ctx, id)
				if err != nil && ctx.Err() == nil {
					r.cfg.Logger.WarnContext(ctx, "saga: driving failed; retrying", "saga", r.def.Name, "id", id, "err", err)
					at, open = r.cfg.Clock().Add(r.def.Retry.Initial), true
				}
				r.release(id, at, open)
			})
		}
		// next is on the runner's clock, which need not be the wall clock.
		t := time.NewTimer(max(next.Sub(r.cfg.Clock()), time.Millisecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-r.kick:
		case <-t.C:
		}
		t.Stop()
	}
}

// release ends a drive: the saga waits until at, or leaves the open set.
func (r *Runner) release(id string, at time.Time, open bool) {
	r.mu.Lock()
	delete(r.busy, id)
	switch {
	case r.again[id]:
		r.wake[id] = time.Time{} // something happened while it was driven
	case open:
		r.wake[id] = at
	default:
		delete(r.wake, id)
	}
	delete(r.again, id)
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// RunDue drives every open saga that is due now, synchronously, until none
// is: what the background scheduler does, for tests with a virtual clock.
//
// On a runner that was not started, RunDue also does in the caller's
// goroutine what Start does in the background: its first call finds the open
// sagas, and every call reads the feed on from where the last one stopped
// (starting a saga for each starting event, noticing operators' requests)
// and publishes the commands of Send steps through Config.Publisher. Give
// it the replies with HandleReply. That position is kept in memory, whatever
// Config.DB says. So a test (sagatest does) runs sagas with no goroutine
// and no real waiting; do not Start a runner used that way.
func (r *Runner) RunDue(ctx context.Context) error {
	r.mu.Lock()
	inline := !r.started
	r.mu.Unlock()
	if inline {
		r.inline.mu.Lock()
		defer r.inline.mu.Unlock()
		if !r.inline.loaded {
			if err := r.loadOpen(ctx); err != nil {
				return err
			}
			r.inline.loaded = true
		}
	}
	for {
		read := 0
		if inline {
			var err error
			if read, err = r.catchUp(ctx); err != nil {
				return err
			}
		}
		now := r.cfg.Clock()
		r.mu.Lock()
		var ready []string
		for id, at := range r.wake {
			if !r.busy[id] && !at.After(now) {
				ready = append(ready, id)
				r.busy[id] = true
			}
		}
		r.mu.Unlock()
		if len(ready) == 0 && read == 0 {
			return nil
		}
		var failed error
		for _, id := range ready {
			if failed != nil {
				r.release(id, time.Time{}, true) // still due: the next call drives it
				continue
			}
			at, open, err := r.drive(ctx, id)
			r.release(id, at, open)
			failed = err
		}
		if failed != nil {
			return failed
		}
	}
}

// inlineState is where a runner that is not started, driven by RunDue, is
// in the feed.
type inlineState struct {
	mu     sync.Mutex
	loaded bool
	feed   eventstore.Position
}

// catchUp reads the feed after the inline position: it starts sagas,
// notices requests, and publishes commands, as the background feed reader
// and relay of a started runner do. It returns how many events it read.
func (r *Runner) catchUp(ctx context.Context) (int, error) {
	const page = 256
	n := 0
	for {
		events, err := r.store.ReadAll(ctx, eventstore.ReadAllOpts{After: r.inline.feed, Limit: page})
		if err != nil {
			return n, fmt.Errorf("saga %s: reading the feed: %w", r.def.Name, err)
		}
		for _, e := range events {
			if err := r.onEvent(ctx, e); err != nil {
				return n, err
			}
			if r.cfg.Publisher != nil && e.Type == TypeStepStarted && eventstore.Category(e.StreamID) == Category(r.def.Name) {
				if err := r.publishCommand(ctx, e); err != nil {
					return n, err
				}
			}
			r.inline.feed = e.Position
			n++
		}
		if len(events) < page {
			return n, nil
		}
	}
}

// publishCommand publishes the command of a step_started event, as the
// relay of a started runner does (a local action's start has none).
func (r *Runner) publishCommand(ctx context.Context, e eventstore.Event) error {
	msg, err := commandMessage(ctx, e)
	if err != nil || msg == nil {
		return err
	}
	bus.Stamp(msg, e)
	msg.SetContext(ctx)
	if err := r.cfg.Publisher.Publish(commandTopic(e), msg); err != nil {
		return fmt.Errorf("saga %s: publishing the command of %s v%d: %w", r.def.Name, e.StreamID, e.Version, err)
	}
	return nil
}

// Load returns the saga id as its stream tells it.
func (r *Runner) Load(ctx context.Context, id string) (*Instance, error) {
	return Load(ctx, r.store, r.def.Name, id)
}

// drive moves saga id as far as it can go now. It returns when it must
// wait: until at, or for a reply (at is then the deadline), or with open
// false when the saga has ended.
func (r *Runner) drive(ctx context.Context, id string) (at time.Time, open bool, err error) {
	stream := StreamID(r.def.Name, id)
	var ran *outcome // a local action that ran, its outcome not yet recorded
	for conflicts := 0; ; {
		if err := ctx.Err(); err != nil {
			return time.Time{}, true, err
		}
		events, err := eventstore.LoadStream(ctx, r.store, stream)
		if err != nil {
			return time.Time{}, true, err
		}
		if len(events) == 0 {
			return time.Time{}, false, nil
		}
		in, err := fold(r.def.Name, id, events)
		if err != nil {
			return time.Time{}, true, err // kept: an operator can look at it
		}
		var next []eventstore.EventData
		var wait time.Time
		if ran.pending(in) {
			// The action ran, but the stream moved before its outcome was
			// recorded (an operator's request came in): record the outcome
			// now rather than run the action a second time.
			next = ran.events
		} else if next, wait, ran, err = r.decide(ctx, in, events[0].Metadata); err != nil {
			if errors.Is(err, eventstore.ErrConcurrencyConflict) && conflicts < 50 {
				conflicts++
				continue // the attempt's start lost a race: look again
			}
			return time.Time{}, true, err
		}
		if next == nil {
			return wait, !in.Status.Done(), nil
		}
		if _, err := r.store.Append(ctx, stream, eventstore.Exact(in.Version), next); err != nil {
			if errors.Is(err, eventstore.ErrConcurrencyConflict) && conflicts < 50 {
				conflicts++
				continue // someone else moved it: look again
			}
			return time.Time{}, true, err
		}
		ran = nil
	}
}

// outcome is what a local action's attempt came to: the events recording it.
type outcome struct {
	step, attempt int
	compensating  bool
	events        []eventstore.EventData
}

// pending reports whether o's attempt is still in flight in in, so its
// outcome is still to be recorded.
func (o *outcome) pending(in *Instance) bool {
	return o != nil && in.InFlight && in.Current == o.step && in.Attempt == o.attempt &&
		(in.Status == Compensating) == o.compensating && (in.Status == Running || in.Status == Compensating)
}

// decide returns the events that move the saga on, or, when it must wait,
// until when. Local actions run here, between the append that records their
// start and the one that records their outcome; ran is then that outcome.
func (r *Runner) decide(ctx context.Context, in *Instance, md eventstore.Metadata) (next []eventstore.EventData, wait time.Time, ran *outcome, err error) {
	now := r.cfg.Clock()
	md = eventstore.Metadata{CorrelationID: md.CorrelationID, TraceParent: md.TraceParent, TraceState: md.TraceState}
	emit := func(typ string, rec record) eventstore.EventData {
		data, _ := json.Marshal(rec)
		return eventstore.EventData{Type: typ, Data: data, Metadata: md}
	}
	one := func(e eventstore.EventData) ([]eventstore.EventData, time.Time, *outcome, error) {
		return []eventstore.EventData{e}, time.Time{}, nil, nil
	}
	compensating := in.Status == Compensating
	switch in.Status {
	case Completed, Compensated, NeedsAttention:
		return nil, time.Time{}, nil, nil
	}
	step := in.Current
	if in.AbortReason != "" && !compensating && !in.InFlight {
		rec := record{Reason: in.AbortReason}
		if step >= 0 && in.timedOut && r.def.Steps[step].Compensation.defined() {
			// The step's attempt timed out, and the abort makes it the
			// last: it may have acted, as when it runs out of attempts.
			rec.Step, rec.StepName, rec.Uncertain = step, r.def.Steps[step].Name, true
		}
		return one(emit(TypeCompensating, rec))
	}
	if step < 0 { // nothing under way: what comes next?
		if !compensating {
			next := len(in.Completed)
			if next == len(r.def.Steps) {
				return one(emit(TypeCompleted, record{}))
			}
			if out, ok := in.Received[next]; ok && r.def.Steps[next].Action.await != nil {
				// The awaited event came before the step: nothing to wait for.
				return one(emit(TypeStepSucceeded, record{Step: next, StepName: r.def.Steps[next].Name, Attempt: 1, Output: out}))
			}
			return r.startAttempt(ctx, in, next, false, 1, emit)
		}
		next := in.nextCompensation()
		if next < 0 {
			return one(emit(TypeCompensated, record{}))
		}
		if !r.def.Steps[next].Compensation.defined() {
			return one(emit(TypeStepSucceeded, record{Step: next, StepName: r.def.Steps[next].Name,
				Compensating: true, Reason: "nothing to undo"}))
		}
		return r.startAttempt(ctx, in, next, true, 1, emit)
	}
	action := r.def.Steps[step].Action
	if compensating {
		action = r.def.Steps[step].Compensation
	}
	if out, ok := in.Received[step]; ok && !compensating && action.await != nil {
		return one(emit(TypeStepSucceeded, record{Step: step, StepName: r.def.Steps[step].Name, Attempt: in.Attempt, Output: out}))
	}
	switch {
	case in.InFlight && !now.Before(in.Deadline):
		return r.failure(in, step, compensating, in.Attempt, fmt.Errorf("%w (%s)", ErrDeadline, r.def.timeout(step)), true, emit), time.Time{}, nil, nil
	case in.InFlight && action.do != nil:
		// Started by a runner that did not record the outcome (it died, or
		// another runner is at it): run it again, with the same key.
		return r.runLocal(ctx, in, step, compensating, in.Attempt, action, emit)
	case in.InFlight:
		return nil, in.Deadline, nil, nil // the reply, or the deadline, moves it on
	case !in.RetryAt.IsZero() && now.Before(in.RetryAt):
		return nil, in.RetryAt, nil, nil
	default: // a failed attempt whose retry is due
		return r.startAttempt(ctx, in, step, compensating, in.Attempt+1, emit)
	}
}

type emitFunc func(string, record) eventstore.EventData

// startAttempt records the start of an attempt (with its command, for a Send
// action) and, for a local action, runs it.
func (r *Runner) startAttempt(ctx context.Context, in *Instance, step int, compensating bool, attempt int, emit emitFunc) ([]eventstore.EventData, time.Time, *outcome, error) {
	action := r.def.Steps[step].Action
	if compensating {
		action = r.def.Steps[step].Compensation
	}
	now := r.cfg.Clock()
	rec := record{Step: step, StepName: r.def.Steps[step].Name, Compensating: compensating, Attempt: attempt,
		Deadline: now.Add(r.def.timeout(step))}
	if action.send != nil {
		sc := in.stepContext(r.def, step, compensating, attempt)
		topic, msg, err := action.send(sc)
		switch {
		case err != nil:
			err = fmt.Errorf("building the command: %w", err)
		case msg == nil:
			err = bus.Permanent(errors.New("building the command: no message"))
		case topic == "":
			err = bus.Permanent(errors.New("building the command: no topic"))
		}
		if err != nil {
			// Nothing was recorded or sent: an answer, whatever the error.
			return r.failure(in, step, compensating, attempt, err, false, emit), time.Time{}, nil, nil
		}
		rec.Topic, rec.Payload, rec.Metadata = topic, msg.Payload, map[string]string{}
		for k, v := range msg.Metadata {
			rec.Metadata[k] = v
		}
		rec.Metadata[bus.KeyIdempotency] = sc.Key
		rec.Metadata[bus.KeyDeadline] = rec.Deadline.UTC().Format(time.RFC3339Nano)
		rec.Metadata[bus.KeyReplyTo] = r.cfg.ReplyTopic
		rec.Metadata[bus.KeyCorrelationID] = replyID(in.ID, step, compensating)
		return []eventstore.EventData{emit(TypeStepStarted, rec)}, time.Time{}, nil, nil
	}
	if action.do == nil { // an awaited event: start waiting
		return []eventstore.EventData{emit(TypeStepStarted, rec)}, time.Time{}, nil, nil
	}
	// Record the start first, so a crash during the action is seen as an
	// attempt in flight, then run it and record the outcome.
	if _, err := r.store.Append(ctx, StreamID(r.def.Name, in.ID), eventstore.Exact(in.Version),
		[]eventstore.EventData{emit(TypeStepStarted, rec)}); err != nil {
		return nil, time.Time{}, nil, err
	}
	in.Version++
	in.InFlight, in.Current, in.Attempt, in.Deadline = true, step, attempt, rec.Deadline
	return r.runLocal(ctx, in, step, compensating, attempt, action, emit)
}

func (r *Runner) runLocal(ctx context.Context, in *Instance, step int, compensating bool, attempt int, action Action, emit emitFunc) ([]eventstore.EventData, time.Time, *outcome, error) {
	actx, cancel := context.WithTimeout(ctx, max(in.Deadline.Sub(r.cfg.Clock()), time.Millisecond))
	out, err := action.do(actx, in.stepContext(r.def, step, compensating, attempt))
	cancel()
	if ctx.Err() != nil {
		return nil, time.Time{}, nil, ctx.Err() // stopping: the next runner runs it again
	}
	var next []eventstore.EventData
	if err != nil {
		next = r.failure(in, step, compensating, attempt, err, errors.Is(err, ErrDeadline) || errors.Is(err, context.DeadlineExceeded), emit)
	} else {
		next = []eventstore.EventData{emit(TypeStepSucceeded, record{Step: step, StepName: r.def.Steps[step].Name,
			Compensating: compensating, Attempt: attempt, Output: out})}
	}
	ran := &outcome{step: step, attempt: attempt, compensating: compensating, events: next}
	if err == nil && !compensating && in.AbortReason == "" {
		// Record what comes next in the same append: the end, or the start
		// of the next local step (which the next pass then runs, as it
		// would after a crash). One commit saved per step.
		switch k := step + 1; {
		case k == len(r.def.Steps):
			next = append(next, emit(TypeCompleted, record{}))
		case r.def.Steps[k].Action.do != nil:
			next = append(next, emit(TypeStepStarted, record{Step: k, StepName: r.def.Steps[k].Name, Attempt: 1,
				Deadline: r.cfg.Clock().Add(r.def.timeout(k))}))
		}
	}
	return next, time.Time{}, ran, nil
}

// failure records a failed attempt, and what follows: a retry later, or
// compensation (for a step), or needs-attention (for a compensation).
// timedOut says the attempt ended without an answer (its deadline passed,
// or a local action gave up on its context's).
func (r *Runner) failure(in *Instance, step int, compensating bool, attempt int, cause error, timedOut bool, emit emitFunc) []eventstore.EventData {
	policy := r.def.retry(step)
	rec := record{Step: step, StepName: r.def.Steps[step].Name, Compensating: compensating, Attempt: attempt,
		Error: cause.Error(), Permanent: bus.IsPermanent(cause)}
	// A permanent error is an answer, even one that wraps a timeout.
	rec.TimedOut = timedOut && !rec.Permanent && !compensating
	if !rec.Permanent && attempt < policy.MaxAttempts {
		rec.RetryAt = r.cfg.Clock().Add(policy.delay(attempt, rand.Float64()))
		return []eventstore.EventData{emit(TypeStepFailed, rec)}
	}
	why := fmt.Sprintf("step %s failed", rec.StepName)
	if rec.Permanent {
		why += " permanently: "
	} else {
		why += fmt.Sprintf(" %d times: ", attempt)
	}
	why += cause.Error()
	if compensating {
		return []eventstore.EventData{emit(TypeStepFailed, rec),
			emit(TypeNeedsAttention, record{Step: step, StepName: rec.StepName, Compensating: true, Reason: "compensation of " + why})}
	}
	// A step that timed out may have acted (a command delivered, its reply
	// lost): it is compensated too, first. A refusal or an error it
	// reported is an answer, and leaves it out.
	uncertain := rec.TimedOut && r.def.Steps[step].Compensation.defined()
	if uncertain {
		why += " (no answer, so it may have acted: its compensation runs first)"
	}
	return []eventstore.EventData{emit(TypeStepFailed, rec),
		emit(TypeCompensating, record{Step: step, StepName: rec.StepName, Reason: why, Uncertain: uncertain})}
}

// ErrDeadline is the failure recorded for an attempt that had no outcome by
// its deadline.
var ErrDeadline = errors.New("deadline passed")

// replyID is the correlation id of a step's commands: the same for every
// attempt, so a late reply to an earlier attempt still completes the step.
func replyID(id string, step int, compensating bool) string {
	phase := "do"
	if compensating {
		phase = "undo"
	}
	return id + "|" + strconv.Itoa(step) + "|" + phase
}

func parseReplyID(s string) (id string, step int, compensating bool, ok bool) {
	rest, phase, ok1 := cutLast(s, "|")
	id, n, ok2 := cutLast(rest, "|")
	step, err := strconv.Atoi(n)
	if !ok1 || !ok2 || err != nil || (phase != "do" && phase != "undo") {
		return "", 0, false, false
	}
	return id, step, phase == "undo", true
}

func cutLast(s, sep string) (string, string, bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}

// consumeReplies records the replies to commands as step outcomes.
func (r *Runner) consumeReplies(ctx context.Context, replies <-chan *message.Message) {
	for msg := range replies {
		if err := r.onReply(ctx, msg); err != nil {
			// Never acknowledge a reply that is not recorded, stopping or
			// not: the broker delivers it again.
			if ctx.Err() == nil {
				r.cfg.Logger.WarnContext(msg.Context(), "saga: recording a reply failed; it will come again", "saga", r.def.Name, "err", err)
			}
			msg.Nack()
			continue
		}
		msg.Ack()
	}
}

// HandleReply records a reply to one of the runner's commands, as a started
// runner does with each message on Config.ReplyTopic. It is for replies that
// reach the application another way (a handler of its own, or sagatest with
// a runner that is not started). A reply that names no step of this
// definition, or comes after its step moved on, is ignored. The saga then
// moves on in the background, or at the next RunDue.
func (r *Runner) HandleReply(ctx context.Context, reply *message.Message) error {
	return r.onReply(ctx, reply)
}

func (r *Runner) onReply(ctx context.Context, msg *message.Message) error {
	id, step, compensating, ok := parseReplyID(msg.Metadata.Get(bus.KeyCorrelationID))
	if !ok || step < 0 || step >= len(r.def.Steps) {
		r.cfg.Logger.WarnContext(msg.Context(), "saga: dropping a reply that names no step", "saga", r.def.Name, "correlation_id", msg.Metadata.Get(bus.KeyCorrelationID))
		return nil
	}
	stream := StreamID(r.def.Name, id)
	for conflicts := 0; ; conflicts++ {
		events, err := eventstore.LoadStream(ctx, r.store, stream)
		if err != nil {
			return err
		}
		in, err := fold(r.def.Name, id, events)
		if err != nil || len(events) == 0 {
			return err
		}
		phaseOK := (in.Status == Compensating) == compensating && (in.Status == Running || in.Status == Compensating)
		if !phaseOK || in.Current != step {
			return nil // a late or repeated reply: the step has moved on
		}
		md := eventstore.Metadata{CorrelationID: events[0].Metadata.CorrelationID, CausationID: msg.UUID,
			TraceParent: msg.Metadata.Get(bus.KeyTraceParent), TraceState: msg.Metadata.Get(bus.KeyTraceState)}
		emit := func(typ string, rec record) eventstore.EventData {
			data, _ := json.Marshal(rec)
			return eventstore.EventData{Type: typ, Data: data, Metadata: md}
		}
		var next []eventstore.EventData
		if rerr := bus.ReplyErr(msg); rerr != nil {
			if !in.InFlight {
				return nil // the attempt already timed out; its retry will ask again
			}
			if c := msg.Metadata.Get(bus.KeyCausationID); c != "" && c != lastStarted(events).ID.String() {
				// An error answering an earlier attempt's command (bus.Reply
				// names the command as the cause): it is not this attempt's
				// outcome. A success to any attempt completes the step.
				return nil
			}
			next = r.failure(in, step, compensating, in.Attempt, rerr, false, emit)
		} else {
			next = []eventstore.EventData{emit(TypeStepSucceeded, record{Step: step, StepName: r.def.Steps[step].Name,
				Compensating: compensating, Attempt: in.Attempt, Output: msg.Payload})}
		}
		_, err = r.store.Append(ctx, stream, eventstore.Exact(in.Version), next)
		if errors.Is(err, eventstore.ErrConcurrencyConflict) && conflicts < 50 {
			continue
		}
		if err == nil {
			r.due(id, time.Time{})
		}
		return err
	}
}

// lastStarted is the last step_started event of a saga's stream: the
// attempt in flight, when one is.
func lastStarted(events []eventstore.Event) eventstore.Event {
	for i := len(events) - 1; i >= 0; i-- {
		if events[i].Type == TypeStepStarted {
			return events[i]
		}
	}
	return eventstore.Event{}
}

// commandTopic and commandMessage turn a step_started event with a command
// into the message the relay publishes.
func commandTopic(e eventstore.Event) string {
	var rec record
	if json.Unmarshal(e.Data, &rec) != nil {
		return ""
	}
	return rec.Topic
}

func commandMessage(_ context.Context, e eventstore.Event) (*message.Message, error) {
	var rec record
	if err := json.Unmarshal(e.Data, &rec); err != nil {
		return nil, err
	}
	if rec.Topic == "" {
		return nil, nil // a local action: nothing to send
	}
	msg := message.NewMessage(e.ID.String(), rec.Payload)
	for k, v := range rec.Metadata {
		msg.Metadata[k] = v
	}
	return msg, nil
}
