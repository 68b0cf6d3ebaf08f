// Package sagatest tests saga definitions as given a starting event, when
// replies come and time passes, then a status and the steps that ran:
//
//	f := sagatest.New(t, def).Start("order-1", "order_placed", order)
//	f.Reply("charge", []byte(`{"charge":"ch_1"}`))
//	f.Advance(time.Minute) // the ship step's deadline passes, again and again
//	f.Then(saga.Compensated).ThenSteps("do:reserve", "do:charge", "undo:charge", "undo:reserve")
//
// A Fixture runs the real saga.Runner over a memstore, on a virtual clock,
// in the test's goroutine: it never starts the runner, and drives it with
// Runner.RunDue after each given event, reply and advance of the clock.
// Commands of Send steps are captured instead of published (Sent,
// LastCommand); Reply answers them as the receiving service would with
// bus.Reply. Nothing waits in real time, except a local action that blocks
// until its context's deadline: that deadline is real, so give such a step
// a short Step.Timeout.
package sagatest

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/saga"
)

// TB is what a Fixture needs of a test; *testing.T and *testing.B have it.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
}

// Epoch is where a Fixture's clock starts.
var Epoch = time.Date(2030, time.January, 1, 0, 0, 0, 0, time.UTC)

// Fixture is a scenario under way for one saga definition. Its saga is the
// one the last given starting event started; the other sagas it runs can be
// read with saga.Load or saga.List on Store.
type Fixture struct {
	t      TB
	ctx    context.Context
	def    saga.Definition
	store  *memstore.Store
	runner *saga.Runner
	bus    *fakeBus

	mu  sync.Mutex
	now time.Time
	id  string // the saga under test
}

// Command is a command a Send step sent.
type Command struct {
	Topic        string
	SagaID       string
	Step         string // the step's name
	Compensating bool   // sent by the step's compensation
	Attempt      int
	Key          string // the idempotency key (metadata "idempotency_key")
	Payload      []byte
	Metadata     message.Metadata
	// Message is the command as published, for a responder of your own.
	Message *message.Message
}

// New returns a fixture for def, with an empty store and the clock at Epoch.
// It fails the test if saga.NewRunner refuses def.
func New(t TB, def saga.Definition) *Fixture {
	t.Helper()
	f := &Fixture{t: t, ctx: context.Background(), def: def, now: Epoch}
	f.store = memstore.New(&memstore.Config{Now: f.Now})
	f.bus = &fakeBus{f: f}
	r, err := saga.NewRunner(f.store, def, saga.Config{Publisher: f.bus, Subscriber: f.bus, ReplyTopic: f.bus.replyTopic(),
		Clock: f.Now, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("sagatest: %v", err)
	}
	f.runner = r
	return f
}

// Now is the fixture's virtual time.
func (f *Fixture) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

// Store is the fixture's event store.
func (f *Fixture) Store() *memstore.Store { return f.store }

// Runner is the runner under test (never started).
func (f *Fixture) Runner() *saga.Runner { return f.runner }

// ID is the id of the saga under test ("" before one started).
func (f *Fixture) ID() string { return f.id }

// Given appends events to stream and runs what is due. A starting event
// among them makes its saga the one under test.
func (f *Fixture) Given(stream string, events ...eventstore.EventData) *Fixture {
	f.t.Helper()
	res, err := f.store.Append(f.ctx, stream, eventstore.Any, events)
	if err != nil {
		f.t.Fatalf("sagatest: appending to %s: %v", stream, err)
	}
	stored, err := f.store.ReadStream(f.ctx, stream, eventstore.ReadStreamOpts{From: res.FirstVersion, Limit: len(events)})
	if err != nil {
		f.t.Fatalf("sagatest: reading %s: %v", stream, err)
	}
	for _, e := range stored {
		if e.Type == f.def.StartedBy && (f.def.Category == "" || eventstore.Category(e.StreamID) == f.def.Category) {
			f.id = e.StreamID
			if f.def.ID != nil {
				f.id = f.def.ID(e)
			}
		}
	}
	return f.run()
}

// Start gives one starting event: data is JSON-encoded unless it is a
// []byte or a string.
func (f *Fixture) Start(stream, eventType string, data any) *Fixture {
	f.t.Helper()
	var b []byte
	switch d := data.(type) {
	case []byte:
		b = d
	case string:
		b = []byte(d)
	default:
		var err error
		if b, err = json.Marshal(d); err != nil {
			f.t.Fatalf("sagatest: encoding the starting event: %v", err)
		}
	}
	return f.Given(stream, eventstore.EventData{Type: eventType, Data: b})
}

// Reply answers the last command step sent, for the saga under test, with
// payload, as the receiving service would with bus.Reply. step is a step's
// name ("charge"), or "undo:charge" for its compensation's command.
func (f *Fixture) Reply(step string, payload []byte) *Fixture {
	f.t.Helper()
	return f.ReplyTo(f.LastCommand(step), payload)
}

// ReplyError answers the last command of step with a failure, as bus.ReplyError
// would: the attempt fails, for good if err is bus.Permanent.
func (f *Fixture) ReplyError(step string, err error) *Fixture {
	f.t.Helper()
	return f.ReplyErrorTo(f.LastCommand(step), err)
}

// ReplyTo answers cmd (any command in Sent: an earlier attempt's, another
// saga's, or one answered already) and runs what is due.
func (f *Fixture) ReplyTo(cmd Command, payload []byte) *Fixture {
	f.t.Helper()
	if err := bus.Reply(f.bus, cmd.Message, message.NewMessage(uuid.NewString(), payload)); err != nil {
		f.t.Fatalf("sagatest: replying to %s: %v", cmd, err)
	}
	return f.run()
}

// ReplyErrorTo answers cmd with a failure and runs what is due.
func (f *Fixture) ReplyErrorTo(cmd Command, err error) *Fixture {
	f.t.Helper()
	if err := bus.ReplyError(f.bus, cmd.Message, err); err != nil {
		f.t.Fatalf("sagatest: replying to %s: %v", cmd, err)
	}
	return f.run()
}

// Advance moves the clock d on. Timers that fall due on the way (deadlines,
// retries) fire at their own time, in order, as they would in real time.
func (f *Fixture) Advance(d time.Duration) *Fixture {
	f.t.Helper()
	f.mu.Lock()
	end := f.now.Add(d)
	f.mu.Unlock()
	for range 100_000 {
		next, ok := f.nextTimer()
		if !ok || next.After(end) {
			f.setNow(end)
			return f.run()
		}
		if next.After(f.Now()) { // never backwards
			f.setNow(next)
		}
		f.run()
	}
	f.t.Fatalf("sagatest: Advance(%s): timers keep falling due", d)
	return f
}

// Abort asks the saga under test to stop and compensate (saga.Abort), and
// runs what is due.
func (f *Fixture) Abort(reason string) *Fixture {
	f.t.Helper()
	if err := saga.Abort(f.ctx, f.store, f.def.Name, f.id, reason); err != nil {
		f.t.Fatalf("sagatest: %v", err)
	}
	return f.run()
}

// RequestRetry sends the saga under test, which needs attention, back to
// compensating (saga.RequestRetry), and runs what is due.
func (f *Fixture) RequestRetry(reason string) *Fixture {
	f.t.Helper()
	if err := saga.RequestRetry(f.ctx, f.store, f.def.Name, f.id, reason); err != nil {
		f.t.Fatalf("sagatest: %v", err)
	}
	return f.run()
}

// Then fails the test unless the saga under test is in status.
func (f *Fixture) Then(status saga.Status) *Fixture {
	f.t.Helper()
	if in := f.Instance(); in.Status != status {
		f.t.Fatalf("saga %s is %s, want %s (%s)\nhistory:\n  %s", in.ID, in.Status, status,
			cmp.Or(in.FailedReason, in.LastError, "no error"), strings.Join(f.History(), "\n  "))
	}
	return f
}

// ThenSteps fails the test unless the actions and compensations that
// succeeded, in order, are want: "do:<step>" for an action, "undo:<step>"
// for a compensation (a step without one is left out).
func (f *Fixture) ThenSteps(want ...string) *Fixture {
	f.t.Helper()
	var got []string
	for _, h := range f.Instance().History {
		if h.Type == "step_succeeded" && h.Attempt > 0 { // a skipped compensation has no attempt
			got = append(got, phase(h.Compensating)+h.Step)
		}
	}
	if !slices.Equal(got, want) {
		f.t.Fatalf("steps done:\n  got  %q\n  want %q\nhistory:\n  %s", got, want, strings.Join(f.History(), "\n  "))
	}
	return f
}

// Instance is the saga under test as its stream tells it.
func (f *Fixture) Instance() *saga.Instance {
	f.t.Helper()
	if f.id == "" {
		f.t.Fatalf("sagatest: no saga started (give a %s event)", f.def.StartedBy)
	}
	in, err := saga.Load(f.ctx, f.store, f.def.Name, f.id)
	if err != nil {
		f.t.Fatalf("sagatest: %v", err)
	}
	return in
}

// History is the saga under test's history, one line per event, without
// times: "step_failed do:charge #1: card declined" (an error, a reason, or
// a step's output follows the colon).
func (f *Fixture) History() []string {
	f.t.Helper()
	in := f.Instance()
	lines := make([]string, len(in.History))
	for i, h := range in.History {
		l := h.Type
		if h.Step != "" && strings.HasPrefix(h.Type, "step_") {
			l += " " + phase(h.Compensating) + h.Step
		}
		if h.Attempt > 0 {
			l += " #" + strconv.Itoa(h.Attempt)
		}
		if h.Detail != "" && h.Type != "step_started" { // a start's detail is its deadline
			l += ": " + h.Detail
		}
		lines[i] = l
	}
	return lines
}

// Sent is every command sent so far, by every saga, in order.
func (f *Fixture) Sent() []Command {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.bus.sent)
}

// LastCommand is the last command step sent for the saga under test ("charge",
// or "undo:charge" for the compensation's). It fails the test if none was.
func (f *Fixture) LastCommand(step string) Command {
	f.t.Helper()
	undo := strings.HasPrefix(step, "undo:")
	name := strings.TrimPrefix(strings.TrimPrefix(step, "undo:"), "do:")
	sent := f.Sent()
	for i := len(sent) - 1; i >= 0; i-- {
		if c := sent[i]; c.SagaID == f.id && c.Step == name && c.Compensating == undo {
			return c
		}
	}
	f.t.Fatalf("sagatest: saga %s sent no command for %s; sent: %v", f.id, step, sent)
	return Command{}
}

func (c Command) String() string {
	return fmt.Sprintf("%s %s%s #%d to %s", c.SagaID, phase(c.Compensating), c.Step, c.Attempt, c.Topic)
}

func phase(compensating bool) string {
	if compensating {
		return "undo:"
	}
	return "do:"
}

func (f *Fixture) setNow(t time.Time) {
	f.mu.Lock()
	f.now = t
	f.mu.Unlock()
}

// run drives what is due now; a store failure fails the test.
func (f *Fixture) run() *Fixture {
	f.t.Helper()
	if err := f.runner.RunDue(f.ctx); err != nil {
		f.t.Fatalf("sagatest: running due sagas: %v", err)
	}
	return f
}

// nextTimer is the earliest deadline or retry time of an open saga.
func (f *Fixture) nextTimer() (time.Time, bool) {
	f.t.Helper()
	all, err := saga.List(f.ctx, f.store, f.def.Name, "")
	if err != nil {
		f.t.Fatalf("sagatest: %v", err)
	}
	var next time.Time
	for _, in := range all {
		at := in.RetryAt
		if in.InFlight {
			at = in.Deadline
		}
		if !in.Status.Done() && !at.IsZero() && (next.IsZero() || at.Before(next)) {
			next = at
		}
	}
	return next, !next.IsZero()
}

// fakeBus stands in for the broker: it keeps the commands the runner
// publishes and hands the replies published to it straight to the runner.
type fakeBus struct {
	f    *Fixture
	sent []Command // under f.mu
}

func (b *fakeBus) Publish(topic string, msgs ...*message.Message) error {
	for _, msg := range msgs {
		if topic == b.replyTopic() {
			if err := b.f.runner.HandleReply(b.f.ctx, msg); err != nil {
				return err
			}
			continue
		}
		cmd, err := b.command(topic, msg)
		if err != nil {
			return err
		}
		b.f.mu.Lock()
		b.sent = append(b.sent, cmd)
		b.f.mu.Unlock()
	}
	return nil
}

func (b *fakeBus) replyTopic() string { return "saga." + b.f.def.Name + ".replies" }

// command describes msg from the saga event it was published for (the
// runner stamps the stream and version on it).
func (b *fakeBus) command(topic string, msg *message.Message) (Command, error) {
	stream := msg.Metadata.Get(bus.KeyStreamID)
	v, err := strconv.Atoi(msg.Metadata.Get(bus.KeyStreamVersion))
	id, ok := strings.CutPrefix(stream, saga.Category(b.f.def.Name)+"-")
	if err != nil || !ok {
		return Command{}, fmt.Errorf("sagatest: command %s to %s names no saga event (stream %q)", msg.UUID, topic, stream)
	}
	in, err := saga.Load(b.f.ctx, b.f.store, b.f.def.Name, id)
	if err != nil {
		return Command{}, err
	}
	if v < 1 || v > len(in.History) {
		return Command{}, fmt.Errorf("sagatest: command %s: saga %s has no version %d", msg.UUID, id, v)
	}
	h := in.History[v-1]
	return Command{Topic: topic, SagaID: id, Step: h.Step, Compensating: h.Compensating, Attempt: h.Attempt,
		Key: msg.Metadata.Get(bus.KeyIdempotency), Payload: msg.Payload, Metadata: msg.Metadata, Message: msg}, nil
}

func (b *fakeBus) Close() error { return nil }

// Subscribe is never called: the runner is not started, and replies go
// straight to it.
func (b *fakeBus) Subscribe(context.Context, string) (<-chan *message.Message, error) {
	return nil, errors.New("sagatest: the fixture's bus takes no subscriptions")
}
