package saga_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/saga/sagatest"
)

// These tests run sagas on sagatest's virtual clock: nothing waits in real
// time, and every deadline and retry fires exactly when it is due.

// entries returns the history entries of type typ ("step_failed") for step.
func entries(in *saga.Instance, typ, step string, compensating bool) []saga.HistoryEntry {
	var out []saga.HistoryEntry
	for _, h := range in.History {
		if h.Type == typ && h.Step == step && h.Compensating == compensating {
			out = append(out, h)
		}
	}
	return out
}

// TestRetriesWithBackoffThenSucceeds: a step that fails three times, then
// succeeds, is attempted four times with the same key; each wait is the
// backoff (Initial, times Multiplier, capped at Max) within its jitter, so
// the waits grow, and they are not all alike.
func TestRetriesWithBackoffThenSucceeds(t *testing.T) {
	policy := saga.RetryPolicy{MaxAttempts: 5, Initial: 100 * time.Millisecond, Max: 350 * time.Millisecond, Multiplier: 2, Jitter: 0.2}
	var mu sync.Mutex
	attempts := map[string][]int{}
	keys := map[string][]string{}
	def := saga.Definition{Name: "pay", StartedBy: "order_placed", Retry: policy, Steps: []saga.Step{
		{Name: "charge", Action: saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
			mu.Lock()
			defer mu.Unlock()
			attempts[sc.SagaID] = append(attempts[sc.SagaID], sc.Attempt)
			keys[sc.SagaID] = append(keys[sc.SagaID], sc.Key)
			if sc.Attempt <= 3 {
				return nil, fmt.Errorf("gateway busy (attempt %d)", sc.Attempt)
			}
			return []byte("ch_1"), nil
		})},
	}}
	f := sagatest.New(t, def)
	const sagas = 25
	for i := range sagas {
		f.Start(fmt.Sprintf("order-%d", i), "order_placed", `{}`)
	}
	f.Advance(time.Minute)

	base := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 350 * time.Millisecond} // the third capped at Max
	firstWaits := map[time.Duration]bool{}
	for i := range sagas {
		id := fmt.Sprintf("order-%d", i)
		in, err := saga.Load(context.Background(), f.Store(), "pay", id)
		if err != nil {
			t.Fatal(err)
		}
		if in.Status != saga.Completed || string(in.Outputs[0]) != "ch_1" {
			t.Fatalf("%s: %s, output %q", id, in.Status, in.Outputs[0])
		}
		if want := []int{1, 2, 3, 4}; !slices.Equal(attempts[id], want) {
			t.Fatalf("%s: attempts %v, want %v", id, attempts[id], want)
		}
		if slices.Compact(slices.Clone(keys[id]))[0] != "pay:"+id+":charge" || len(slices.Compact(slices.Clone(keys[id]))) != 1 {
			t.Fatalf("%s: keys %q, want the same key for every attempt", id, keys[id])
		}
		started := entries(in, "step_started", "charge", false)
		failed := entries(in, "step_failed", "charge", false)
		if len(started) != 4 || len(failed) != 3 {
			t.Fatalf("%s: %d starts and %d failures recorded, want 4 and 3", id, len(started), len(failed))
		}
		var prev time.Duration
		for n, fl := range failed {
			if fl.Attempt != n+1 || !strings.Contains(fl.Detail, "gateway busy") {
				t.Fatalf("%s: failure %d recorded as attempt %d: %q", id, n+1, fl.Attempt, fl.Detail)
			}
			wait := started[n+1].At.Sub(fl.At)
			lo := time.Duration(float64(base[n]) * (1 - policy.Jitter))
			hi := time.Duration(float64(base[n]) * (1 + policy.Jitter))
			if wait < lo-time.Nanosecond || wait > hi+time.Nanosecond {
				t.Fatalf("%s: wait before attempt %d is %s, want %s to %s", id, n+2, wait, lo, hi)
			}
			if wait <= prev {
				t.Fatalf("%s: wait before attempt %d is %s, not longer than the one before (%s)", id, n+2, wait, prev)
			}
			prev = wait
			if n == 0 {
				firstWaits[wait] = true
			}
		}
	}
	if len(firstWaits) < 2 {
		t.Fatalf("all %d sagas waited exactly %v before their second attempt: no jitter", sagas, firstWaits)
	}
}

// TestTransientFailuresExhaustAttemptsThenCompensate: a step failing every
// attempt is tried MaxAttempts times, then the steps done before it are
// undone; its own compensation does not run, for it never succeeded.
func TestTransientFailuresExhaustAttemptsThenCompensate(t *testing.T) {
	fx := newEffects()
	charges := 0
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 3}, Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) {
			charges++
			return nil, errors.New("gateway timeout")
		}), Compensation: fx.do("refund")},
		{Name: "ship", Action: fx.do("ship")},
	}}
	f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
	f.Then(saga.Running) // waiting to retry
	f.Advance(time.Minute)
	f.Then(saga.Compensated).ThenSteps("do:reserve", "undo:reserve")
	if charges != 3 {
		t.Fatalf("charge attempted %d times, want 3", charges)
	}
	in := f.Instance()
	if want := "step charge failed 3 times: gateway timeout"; in.FailedReason != want {
		t.Fatalf("failed reason %q, want %q", in.FailedReason, want)
	}
	wantEffects(t, fx, "order-1", "reserve", "release")
}

// TestSendDeadlinePassesWithoutReply: a command nobody answers fails its
// attempt at the deadline recorded in the stream; the retry sends it again
// with the same key and correlation id, and after the last attempt the saga
// compensates. All on the virtual clock.
func TestSendDeadlinePassesWithoutReply(t *testing.T) {
	began := time.Now()
	fx := newEffects()
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 3}, Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: send("payments.charge"), Timeout: 10 * time.Minute},
	}}
	f := sagatest.New(t, def).Start("order-1", "order_placed", `{"cents":100}`)
	if n := len(f.Sent()); n != 1 {
		t.Fatalf("%d commands sent, want 1", n)
	}
	f.Advance(10*time.Minute - time.Nanosecond)
	f.Then(saga.Running)
	if n := len(f.Sent()); n != 1 {
		t.Fatalf("%d commands sent before the deadline, want 1", n)
	}
	f.Advance(time.Hour)
	f.Then(saga.Compensated).ThenSteps("do:reserve", "undo:reserve")

	sent := f.Sent()
	if len(sent) != 3 {
		t.Fatalf("%d commands sent, want 3: %v", len(sent), sent)
	}
	for i, c := range sent {
		if c.Attempt != i+1 || c.Topic != "payments.charge" || c.Key != "order:order-1:charge" ||
			c.Metadata.Get(bus.KeyCorrelationID) != sent[0].Metadata.Get(bus.KeyCorrelationID) ||
			c.Metadata.Get(bus.KeyReplyTo) != "saga.order.replies" || string(c.Payload) != `{"cents":100}` {
			t.Fatalf("command %d: %v, metadata %v", i+1, c, c.Metadata)
		}
	}
	in := f.Instance()
	started := entries(in, "step_started", "charge", false)
	failed := entries(in, "step_failed", "charge", false)
	for n, c := range sent { // the receiver can tell a command that came too late
		if d, err := time.Parse(time.RFC3339Nano, c.Metadata.Get(bus.KeyDeadline)); err != nil || !d.Equal(started[n].At.Add(10*time.Minute)) {
			t.Fatalf("command %d: deadline %q (%v), want 10m after its start at %s", n+1, c.Metadata.Get(bus.KeyDeadline), err, started[n].At)
		}
	}
	for n, fl := range failed {
		if took := fl.At.Sub(started[n].At); took != 10*time.Minute || fl.Detail != "deadline passed (10m0s)" {
			t.Fatalf("attempt %d failed after %s with %q, want after 10m0s with the deadline", n+1, took, fl.Detail)
		}
	}
	if in.FailedReason != "step charge failed 3 times: deadline passed (10m0s)" {
		t.Fatalf("failed reason %q", in.FailedReason)
	}
	if took := time.Since(began); took > 5*time.Second {
		t.Fatalf("took %s of real time for an hour of virtual time", took)
	}
}

// TestTimedOutStepIsCompensated: a step whose last attempt timed out may
// have acted (the service charged the card, its reply was lost), so it is
// compensated too, before the completed steps, and its compensation is told
// the outcome is unknown. A step that answered with a failure is not.
func TestTimedOutStepIsCompensated(t *testing.T) {
	refund := saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
		msg := message.NewMessage(uuid.NewString(), sc.Input)
		msg.Metadata.Set("uncertain", strconv.FormatBool(sc.Uncertain))
		return "payments.refund", msg, nil
	})
	for _, tc := range []struct {
		name  string
		fail  func(f *sagatest.Fixture)
		steps []string
	}{
		{"no reply by the deadline", func(f *sagatest.Fixture) { f.Advance(10 * time.Minute) },
			[]string{"do:reserve", "undo:charge", "undo:reserve"}},
		{"refused", func(f *sagatest.Fixture) { f.ReplyError("charge", bus.Permanent(errors.New("declined"))) },
			[]string{"do:reserve", "undo:reserve"}},
		{"failed on its last attempt", func(f *sagatest.Fixture) { f.ReplyError("charge", errors.New("gateway busy")) },
			[]string{"do:reserve", "undo:reserve"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newEffects()
			def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 1}, Steps: []saga.Step{
				{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
				{Name: "charge", Action: send("payments.charge"), Compensation: refund, Timeout: 10 * time.Minute},
				{Name: "ship", Action: send("shipping.ship")},
			}}
			f := sagatest.New(t, def).Start("order-1", "order_placed", `{"cents":100}`)
			tc.fail(f)
			if len(tc.steps) == 3 {
				f.Then(saga.Compensating)
				cmd := f.LastCommand("undo:charge")
				if cmd.Topic != "payments.refund" || cmd.Metadata.Get("uncertain") != "true" {
					t.Fatalf("the refund went to %s with uncertain=%q, want payments.refund, true", cmd.Topic, cmd.Metadata.Get("uncertain"))
				}
				if in := f.Instance(); in.Uncertain != 1 {
					t.Fatalf("Instance.Uncertain = %d, want the charge step (1)", in.Uncertain)
				}
				f.Reply("undo:charge", nil)
			}
			f.Then(saga.Compensated).ThenSteps(tc.steps...)
			wantEffects(t, fx, "order-1", "reserve", "release")
			for _, c := range f.Sent() {
				if c.Topic == "payments.refund" && len(tc.steps) != 3 {
					t.Fatalf("a refund was sent for a charge the service answered: %v", c)
				}
			}
		})
	}
}

// TestLocalActionPastItsDeadline: a local action that blocks is given a
// context whose deadline is the attempt's; when it gives up there, the
// attempt fails and is retried, then the saga compensates.
func TestLocalActionPastItsDeadline(t *testing.T) {
	fx := newEffects()
	var deadlines []time.Duration
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 2}, Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Timeout: 20 * time.Millisecond, Action: saga.Do(func(ctx context.Context, _ saga.StepContext) ([]byte, error) {
			if d, ok := ctx.Deadline(); ok {
				deadlines = append(deadlines, time.Until(d))
			}
			<-ctx.Done() // hangs until the deadline
			return nil, ctx.Err()
		})},
	}}
	f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
	f.Advance(time.Second)
	f.Then(saga.Compensated).ThenSteps("do:reserve", "undo:reserve")
	if len(deadlines) != 2 {
		t.Fatalf("the action ran %d times with a deadline, want 2", len(deadlines))
	}
	for _, d := range deadlines {
		if d > 20*time.Millisecond { // (it can be past already, on a loaded machine)
			t.Fatalf("the action's context deadline was %s away, want at most the step's 20ms", d)
		}
	}
	for _, fl := range entries(f.Instance(), "step_failed", "charge", false) {
		if fl.Detail != context.DeadlineExceeded.Error() {
			t.Fatalf("attempt %d failed with %q", fl.Attempt, fl.Detail)
		}
	}
}

// TestCompensationFailingNeedsAttention: a compensation that fails for good
// leaves the saga needing attention, not compensated, and the earlier
// compensations not run (they wait for it). Time does not move it. An
// operator's retry compensates it, and the rest, to the end.
func TestCompensationFailingNeedsAttention(t *testing.T) {
	for _, permanent := range []bool{true, false} {
		t.Run(fmt.Sprintf("permanent=%v", permanent), func(t *testing.T) {
			fx := newEffects()
			broken := true
			refunds := 0
			def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 3}, Steps: []saga.Step{
				{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
				{Name: "charge", Action: fx.do("charge"), Compensation: saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
					refunds++
					if broken {
						err := errors.New("card closed")
						if permanent {
							err = bus.Permanent(err)
						}
						return nil, err
					}
					fx.apply(sc.SagaID, "refund", sc.Key)
					return nil, nil
				})},
				{Name: "ship", Action: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) {
					return nil, bus.Permanent(errors.New("no courier"))
				})},
			}}
			f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
			f.Advance(time.Hour)
			f.Then(saga.NeedsAttention).ThenSteps("do:reserve", "do:charge")
			wantAttempts := 3
			wantReason := "compensation of step charge failed 3 times: card closed"
			if permanent {
				wantAttempts = 1
				wantReason = "compensation of step charge failed permanently: card closed"
			}
			if refunds != wantAttempts {
				t.Fatalf("refund attempted %d times, want %d", refunds, wantAttempts)
			}
			if in := f.Instance(); in.AttentionReason != wantReason {
				t.Fatalf("reason %q, want %q", in.AttentionReason, wantReason)
			}
			f.Advance(24 * time.Hour)
			f.Then(saga.NeedsAttention)
			var se *saga.StateError
			if err := saga.Abort(context.Background(), f.Store(), "order", "order-1", "stop"); !errors.As(err, &se) || se.Status != saga.NeedsAttention {
				t.Fatalf("Abort of a saga needing attention: %v, want a *StateError", err)
			}

			broken = false
			f.RequestRetry("card reopened")
			f.Then(saga.Compensated).ThenSteps("do:reserve", "do:charge", "undo:charge", "undo:reserve")
			wantEffects(t, fx, "order-1", "reserve", "charge", "refund", "release")
			if h := f.History(); !slices.Contains(h, "retry_requested: card reopened") {
				t.Fatalf("history has no retry request:\n%s", strings.Join(h, "\n"))
			}
			if err := saga.RequestRetry(context.Background(), f.Store(), "order", "order-1", "again"); !errors.As(err, &se) || se.Status != saga.Compensated {
				t.Fatalf("RequestRetry of a compensated saga: %v, want a *StateError", err)
			}
		})
	}
}

// TestOperatorRequestsNeedTheRightState: RequestRetry is only for a saga
// that needs attention, Abort only for a running one; an unknown saga is
// ErrNoSaga. A refused request leaves the stream alone.
func TestOperatorRequestsNeedTheRightState(t *testing.T) {
	ctx := context.Background()
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "charge", Action: send("payments.charge")},
	}}
	f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
	f.Then(saga.Running)
	before := f.Instance().Version

	err := saga.RequestRetry(ctx, f.Store(), "order", "order-1", "why not")
	var se *saga.StateError
	if !errors.As(err, &se) || se.ID != "order-1" || se.Status != saga.Running {
		t.Fatalf("RequestRetry of a running saga: %v, want a *StateError", err)
	}
	if !strings.Contains(err.Error(), "only a saga that needs attention can be retried") {
		t.Fatalf("error %q says nothing of why", err)
	}
	if v := f.Instance().Version; v != before {
		t.Fatalf("a refused request moved the stream from %d to %d", before, v)
	}
	if err := saga.Abort(ctx, f.Store(), "order", "order-9", ""); !errors.Is(err, saga.ErrNoSaga) {
		t.Fatalf("Abort of an unknown saga: %v, want ErrNoSaga", err)
	}
	f.Reply("charge", nil).Then(saga.Completed)
	if err := saga.Abort(ctx, f.Store(), "order", "order-1", ""); !errors.As(err, &se) || se.Status != saga.Completed {
		t.Fatalf("Abort of a completed saga: %v, want a *StateError", err)
	}
}

// TestAbortCompensatesInReverse: an abort while a command is in flight
// lets that step finish (its effect may have happened), then undoes it and
// the steps before it, last first; the steps after it never run.
func TestAbortCompensatesInReverse(t *testing.T) {
	fx := newEffects()
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: fx.do("charge"), Compensation: fx.do("refund")},
		{Name: "ship", Action: send("shipping.ship"), Compensation: send("shipping.recall")},
		{Name: "notify", Action: fx.do("notify")},
	}}

	t.Run("in flight", func(t *testing.T) {
		f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
		f.Abort("customer cancelled")
		f.Then(saga.Running) // the shipment is under way
		if in := f.Instance(); in.AbortReason != "aborted: customer cancelled" || !in.InFlight {
			t.Fatalf("after the abort: reason %q, in flight %v", in.AbortReason, in.InFlight)
		}
		f.Reply("ship", []byte("parcel 7"))
		f.Then(saga.Compensating)
		f.Reply("undo:ship", nil)
		f.Then(saga.Compensated).ThenSteps("do:reserve", "do:charge", "do:ship", "undo:ship", "undo:charge", "undo:reserve")
		wantEffects(t, fx, "order-1", "reserve", "charge", "refund", "release")
		if in := f.Instance(); in.FailedReason != "aborted: customer cancelled" {
			t.Fatalf("reason %q", in.FailedReason)
		}
	})
	t.Run("in flight, no reply", func(t *testing.T) {
		f := sagatest.New(t, def).Start("order-2", "order_placed", `{}`)
		f.Abort("")
		f.Advance(31 * time.Second) // the attempt's deadline: no retry after an abort
		// The shipment timed out on what the abort made its last attempt:
		// it may have gone out, so it is recalled first.
		f.Then(saga.Compensating).Reply("undo:ship", nil)
		f.Then(saga.Compensated).ThenSteps("do:reserve", "do:charge", "undo:ship", "undo:charge", "undo:reserve")
		if n := len(f.Sent()); n != 2 {
			t.Fatalf("%d commands sent, want the one ship attempt and its recall: %v", n, f.Sent())
		}
		if in := f.Instance(); in.FailedReason != "aborted" {
			t.Fatalf("reason %q", in.FailedReason)
		}
	})
}

// TestReplies: a duplicate or late reply, once the step moved on, changes
// nothing; an error answering an earlier attempt does not fail the attempt
// in flight, while a success to it completes the step.
func TestReplies(t *testing.T) {
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 3}, Steps: []saga.Step{
		{Name: "charge", Action: send("payments.charge"), Timeout: time.Minute},
		{Name: "ship", Action: send("shipping.ship")},
	}}

	t.Run("late", func(t *testing.T) {
		f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
		f.Reply("charge", []byte("ch_1"))
		in := f.Instance()
		f.Reply("charge", []byte("ch_2"))                                // a duplicate, answered again
		f.ReplyError("charge", bus.Permanent(errors.New("card stolen"))) // late and wrong
		if after := f.Instance(); after.Version != in.Version || string(after.Outputs[0]) != "ch_1" {
			t.Fatalf("late replies moved the saga from v%d to v%d (output %q)", in.Version, after.Version, after.Outputs[0])
		}
		f.Reply("ship", nil).Then(saga.Completed).ThenSteps("do:charge", "do:ship")
		v := f.Instance().Version
		f.ReplyError("ship", errors.New("too late"))
		if after := f.Instance(); after.Version != v || after.Status != saga.Completed {
			t.Fatalf("a reply to a completed saga moved it: v%d -> v%d, %s", v, after.Version, after.Status)
		}
	})
	t.Run("earlier attempt", func(t *testing.T) {
		f := sagatest.New(t, def).Start("order-2", "order_placed", `{}`)
		f.Advance(time.Minute + time.Second) // attempt 1 timed out, attempt 2 sent
		sent := f.Sent()
		if len(sent) != 2 || sent[0].Attempt != 1 || sent[1].Attempt != 2 {
			t.Fatalf("sent %v, want two attempts of charge", sent)
		}
		f.ReplyErrorTo(sent[0], errors.New("declined, long ago"))
		if in := f.Instance(); !in.InFlight || in.Attempt != 2 || in.LastError != "deadline passed (1m0s)" {
			t.Fatalf("an error to attempt 1 changed attempt 2: in flight %v, attempt %d, error %q", in.InFlight, in.Attempt, in.LastError)
		}
		f.ReplyErrorTo(sent[1], errors.New("declined"))
		if in := f.Instance(); in.InFlight || in.LastError != "bus: the responder failed: declined" {
			t.Fatalf("an error to attempt 2 did not fail it: in flight %v, error %q", in.InFlight, in.LastError)
		}
		f.Advance(time.Second) // attempt 3 sent
		f.ReplyTo(sent[0], []byte("ch_9"))
		f.Then(saga.Running).ThenSteps("do:charge")
		if in := f.Instance(); string(in.Outputs[0]) != "ch_9" {
			t.Fatalf("output %q, want the reply to attempt 1", in.Outputs[0])
		}
	})
	t.Run("permanent", func(t *testing.T) {
		f := sagatest.New(t, def).Start("order-3", "order_placed", `{}`)
		f.ReplyError("charge", bus.Permanent(errors.New("card stolen")))
		f.Then(saga.Compensated).ThenSteps()
		if in := f.Instance(); in.FailedReason != "step charge failed permanently: bus: the responder failed: card stolen" {
			t.Fatalf("reason %q", in.FailedReason)
		}
		if n := len(f.Sent()); n != 1 {
			t.Fatalf("a permanent failure was retried: %d commands", n)
		}
	})
}

// TestInputAndOutputs: every step sees the starting event's data as it was
// (JSON or not) and the outputs of the steps before it.
func TestInputAndOutputs(t *testing.T) {
	for _, input := range []string{`{"sku": "book"}`, "plain text, not JSON", ""} {
		var seen [][]byte
		var outs map[string][]byte
		def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
			{Name: "a", Action: saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
				seen = append(seen, sc.Input)
				return []byte("from a"), nil
			})},
			{Name: "b", Action: saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
				seen = append(seen, sc.Input)
				outs = sc.Outputs
				return nil, nil
			})},
		}}
		f := sagatest.New(t, def).Start("order-1", "order_placed", []byte(input))
		f.Then(saga.Completed)
		want := input
		if input == `{"sku": "book"}` {
			want = `{"sku":"book"}` // kept as JSON, compacted
		}
		for _, s := range seen {
			if string(s) != want {
				t.Fatalf("input %q reached a step as %q", input, s)
			}
		}
		if string(outs["a"]) != "from a" {
			t.Fatalf("step b saw outputs %q", outs)
		}
	}
}

// TestSendWithoutMessageFailsForGood: a Send function that returns no
// message or no topic is a bug no retry fixes: the step fails at once.
func TestSendWithoutMessageFailsForGood(t *testing.T) {
	fx := newEffects()
	for name, fn := range map[string]func(saga.StepContext) (string, *message.Message, error){
		"no message": func(saga.StepContext) (string, *message.Message, error) { return "payments.charge", nil, nil },
		"no topic": func(saga.StepContext) (string, *message.Message, error) {
			return "", message.NewMessage(uuid.NewString(), nil), nil
		},
	} {
		def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
			{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
			{Name: "charge", Action: saga.Send(fn)},
		}}
		f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
		f.Then(saga.Compensated).ThenSteps("do:reserve", "undo:reserve")
		if in := f.Instance(); in.FailedReason != "step charge failed permanently: building the command: "+name {
			t.Fatalf("%s: reason %q", name, in.FailedReason)
		}
	}
}

// TestStartedOncePerStartingEvent: a saga's id comes from Definition.ID,
// and a second starting event for the same id starts nothing new; events of
// another category or type start nothing.
func TestStartedOncePerStartingEvent(t *testing.T) {
	runs := 0
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Category: "order",
		ID: func(e eventstore.Event) string { return strings.ToUpper(e.StreamID) },
		Steps: []saga.Step{{Name: "a", Action: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) {
			runs++
			return nil, nil
		})}},
	}
	f := sagatest.New(t, def)
	f.Given("order-1", eventstore.EventData{Type: "order_placed", Data: []byte(`{}`)}, eventstore.EventData{Type: "order_placed", Data: []byte(`{}`)})
	f.Given("basket-1", eventstore.EventData{Type: "order_placed", Data: []byte(`{}`)})
	f.Given("order-2", eventstore.EventData{Type: "order_paid", Data: []byte(`{}`)})
	if f.ID() != "ORDER-1" {
		t.Fatalf("saga under test %q, want ORDER-1", f.ID())
	}
	f.Then(saga.Completed)
	all, err := saga.List(context.Background(), f.Store(), "", "")
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all[0].ID != "ORDER-1" || runs != 1 {
		t.Fatalf("%d sagas, step ran %d times; want ORDER-1 alone, once", len(all), runs)
	}
}
