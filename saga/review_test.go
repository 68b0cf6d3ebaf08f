package saga_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/saga/sagatest"
)

// rvSub is a subscriber whose channel the test feeds; it closes the channel
// when the runner's context ends, as a real subscriber does.
type rvSub struct{ ch chan *message.Message }

func (s *rvSub) Subscribe(ctx context.Context, _ string) (<-chan *message.Message, error) {
	go func() { <-ctx.Done(); close(s.ch) }()
	return s.ch, nil
}
func (s *rvSub) Close() error { return nil }

// rvBlockStore blocks reads of one stream, once armed, until the reader's
// context ends.
type rvBlockStore struct {
	eventstore.Store
	stream  string
	armed   atomic.Bool
	entered chan struct{}
	once    sync.Once
}

func (s *rvBlockStore) ReadStream(ctx context.Context, id string, o eventstore.ReadStreamOpts) ([]eventstore.Event, error) {
	if id == s.stream && s.armed.Load() {
		s.once.Do(func() { close(s.entered) })
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return s.Store.ReadStream(ctx, id, o)
}

// TestReviewReplyNotAckedUnlessRecorded: docs/sagas.md says replies are
// acknowledged only after they are recorded. A reply whose recording is cut
// short by Stop must be nacked (or left), not acked.
func TestReviewReplyNotAckedUnlessRecorded(t *testing.T) {
	ctx := context.Background()
	store := &rvBlockStore{Store: memstore.New(nil), stream: saga.StreamID("rv_ack", "order-1"), entered: make(chan struct{})}
	def := saga.Definition{Name: "rv_ack", StartedBy: "order_placed", StepTimeout: time.Minute,
		Steps: []saga.Step{{Name: "charge", Action: send("payments")}}}
	sub := &rvSub{ch: make(chan *message.Message, 1)}
	r, err := saga.NewRunner(store, def, saga.Config{Publisher: nopPublisher{}, Subscriber: sub, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	place(t, store, "order-1")
	wait.Until(t, "the charge to be in flight", func() bool {
		in, err := r.Load(ctx, "order-1")
		return err == nil && in.InFlight && in.Current == 0
	})
	store.armed.Store(true)
	reply := message.NewMessage(uuid.NewString(), []byte("charged"))
	reply.Metadata.Set(bus.KeyCorrelationID, "order-1|0|do")
	sub.ch <- reply
	<-store.entered // the runner is recording the reply
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := r.Stop(sctx); err != nil {
		t.Fatal(err)
	}
	store.armed.Store(false)
	in, err := r.Load(ctx, "order-1")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-reply.Acked():
		if countType(in, "step_succeeded", "charge") == 0 {
			t.Fatalf("the reply was acked but never recorded (saga %s, in flight %v): the broker will not deliver it again", in.Status, in.InFlight)
		}
	case <-reply.Nacked():
	default:
	}
}

// rvFailStore fails every start of a saga while failing is set.
type rvFailStore struct {
	eventstore.Store
	prefix  string
	failing atomic.Bool
}

func (s *rvFailStore) Append(ctx context.Context, id string, ev eventstore.ExpectedVersion, events []eventstore.EventData) (eventstore.AppendResult, error) {
	if s.failing.Load() && strings.HasPrefix(id, s.prefix) && ev == eventstore.NoStream {
		return eventstore.AppendResult{}, errors.New("injected: database unavailable")
	}
	return s.Store.Append(ctx, id, ev, events)
}

// TestReviewStartsFeedFailureIsNotSilent: when the store fails long enough
// for the feed reader that starts sagas to give up (projection PolicyStop,
// 5 retries, about 1.5s), the runner must either report it (Err) or keep
// trying: a starting event placed after the store is back must start its saga.
func TestReviewStartsFeedFailureIsNotSilent(t *testing.T) {
	ctx := context.Background()
	store := &rvFailStore{Store: memstore.New(nil), prefix: saga.Category("rv_feed") + "-"}
	store.failing.Store(true)
	def := saga.Definition{Name: "rv_feed", StartedBy: "order_placed", Steps: []saga.Step{{Name: "a", Action: noop}}}
	r, err := saga.NewRunner(store, def, saga.Config{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer r.Stop(ctx)
	place(t, store, "order-1")
	time.Sleep(2 * time.Second) // the store is down past the feed's retries
	store.failing.Store(false)
	place(t, store, "order-2")
	wait.Until(t, "the runner to report the stopped feed, or to start order-2", func() bool {
		if r.Err() != nil {
			return true // reported: acceptable
		}
		in, err := r.Load(ctx, "order-2")
		return err == nil && in.Status == saga.Completed // kept going: acceptable
	})
}

// rvConflictStore, once, moves the saga's stream just before the append that
// records a local step's success together with the next step's start.
type rvConflictStore struct {
	eventstore.Store
	inject func(ctx context.Context, stream string) error
	done   atomic.Bool
}

func (s *rvConflictStore) Append(ctx context.Context, id string, ev eventstore.ExpectedVersion, events []eventstore.EventData) (eventstore.AppendResult, error) {
	if len(events) == 2 && events[0].Type == saga.TypeStepSucceeded && events[1].Type == saga.TypeStepStarted &&
		s.done.CompareAndSwap(false, true) {
		if err := s.inject(ctx, id); err != nil {
			return eventstore.AppendResult{}, err
		}
	}
	return s.Store.Append(ctx, id, ev, events)
}

// TestReviewChainedStartLosesARace: the chained append [a succeeded, b
// started] conflicts with an awaited event recorded for a later step. The
// outcome of a is recorded without running a again, b is started and run
// once, and no step is skipped or run twice.
func TestReviewChainedStartLosesARace(t *testing.T) {
	mem := memstore.New(nil)
	fx := newEffects()
	store := &rvConflictStore{Store: mem}
	store.inject = func(ctx context.Context, stream string) error {
		v, err := mem.StreamVersion(ctx, stream)
		if err != nil {
			return err
		}
		data, _ := json.Marshal(map[string]any{"step": 2, "step_name": "c", "output": []byte("paid")})
		_, err = mem.Append(ctx, stream, eventstore.Exact(v), []eventstore.EventData{{Type: saga.TypeEventReceived, Data: data}})
		return err
	}
	def := saga.Definition{Name: "rv_chain", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "a", Action: fx.do("a"), Compensation: fx.do("undo_a")},
		{Name: "b", Action: fx.do("b")},
		{Name: "c", Action: saga.Await("paid", byOrder)},
		{Name: "d", Action: fx.do("d")},
	}}
	r := startRunner(t, store, def, saga.Config{})
	place(t, store, "order-1")
	in := waitDone(t, r, "order-1")["order-1"]
	if in.Status != saga.Completed || !store.done.Load() {
		t.Fatalf("status %s (conflict injected: %v)", in.Status, store.done.Load())
	}
	wantEffects(t, fx, "order-1", "a", "b", "d")
	for _, k := range []string{"a", "b", "d"} {
		if n := fx.callsOf("rv_chain:order-1:" + k); n != 1 {
			t.Errorf("step %s ran %d times, want once", k, n)
		}
		if n := countType(in, "step_succeeded", k); n != 1 {
			t.Errorf("step %s recorded %d successes, want 1", k, n)
		}
	}
	if n := countType(in, "step_started", "b"); n != 1 {
		t.Errorf("b started %d times, want 1", n)
	}
}

// TestReviewAbortRacingTheChainedStart: an abort lands just before the
// chained append. b's start is not recorded, b never runs, and a is
// compensated.
func TestReviewAbortRacingTheChainedStart(t *testing.T) {
	mem := memstore.New(nil)
	fx := newEffects()
	store := &rvConflictStore{Store: mem}
	store.inject = func(ctx context.Context, _ string) error {
		return saga.Abort(ctx, mem, "rv_chabort", "order-1", "customer called")
	}
	def := saga.Definition{Name: "rv_chabort", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "a", Action: fx.do("a"), Compensation: fx.do("undo_a")},
		{Name: "b", Action: fx.do("b"), Compensation: fx.do("undo_b")},
	}}
	r := startRunner(t, store, def, saga.Config{})
	place(t, store, "order-1")
	in := waitDone(t, r, "order-1")["order-1"]
	if in.Status != saga.Compensated || in.FailedReason != "aborted: customer called" {
		t.Fatalf("%s: %s", in.Status, in.FailedReason)
	}
	wantEffects(t, fx, "order-1", "a", "undo_a")
	if n := fx.callsOf("rv_chabort:order-1:a"); n != 1 {
		t.Errorf("a ran %d times, want once", n)
	}
}

// TestReviewLateSuccessAfterStepFailedForGood: a success answering the first
// attempt, arriving after the second failed permanently and the saga went
// on to compensate, is ignored.
func TestReviewLateSuccessAfterStepFailedForGood(t *testing.T) {
	fx := newEffects()
	def := saga.Definition{Name: "rv_late", StartedBy: "order_placed", StepTimeout: time.Second,
		Retry: saga.RetryPolicy{MaxAttempts: 3, Initial: time.Second},
		Steps: []saga.Step{
			{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
			{Name: "charge", Action: send("payments"), Compensation: send("refunds")},
		}}
	f := sagatest.New(t, def)
	f.Start("order-1", "order_placed", map[string]string{"order": "order-1"})
	first := f.LastCommand("charge")
	f.Advance(2500 * time.Millisecond) // the first attempt times out; the second is sent
	if second := f.LastCommand("charge"); second.Attempt != 2 {
		t.Fatalf("last charge attempt %d, want 2", second.Attempt)
	}
	f.ReplyError("charge", bus.Permanent(errors.New("declined")))
	f.Then(saga.Compensated)
	f.ReplyTo(first, []byte("charged late"))
	f.Then(saga.Compensated)
	in := f.Instance()
	if countType(in, "step_succeeded", "charge") != 0 {
		t.Fatalf("a late success was recorded after the step failed for good:\n%s", strings.Join(f.History(), "\n"))
	}
	wantEffects(t, fx, "order-1", "reserve", "release")
}
