package saga_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/saga/sagatest"
)

// uncertainDef: reserve (local, undone by release), charge (a command with a
// 10m deadline and 3 attempts, undone by a refund that says whether it was
// told the charge is uncertain), ship (a command).
func uncertainDef(fx *effects, refundAttempts int) saga.Definition {
	refund := saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
		msg := message.NewMessage(uuid.NewString(), sc.Input)
		msg.Metadata.Set("uncertain", strconv.FormatBool(sc.Uncertain))
		return "payments.refund", msg, nil
	})
	return saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 1}, Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: send("payments.charge"), Compensation: refund, Timeout: 10 * time.Minute,
			Retry: &saga.RetryPolicy{MaxAttempts: max(refundAttempts, 3), Initial: time.Minute}},
		{Name: "ship", Action: send("shipping.ship")},
	}}
}

// An operator aborts a saga whose charge went unanswered: the attempt timed
// out, and its retry is pending (or is the one in flight). The aborted
// attempt was the charge's last, and it may have acted, so it must be
// compensated, first, exactly as when it runs out of attempts.
func TestAbortAfterTimedOutAttemptCompensatesIt(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(f *sagatest.Fixture)
	}{
		{"abort while its retry waits", func(f *sagatest.Fixture) {
			f.Advance(10 * time.Minute) // attempt 1 times out; attempt 2 is a minute away
			f.Then(saga.Running).Abort("customer cancelled")
		}},
		{"abort while it is in flight, then it times out", func(f *sagatest.Fixture) {
			f.Abort("customer cancelled").Then(saga.Running) // waits for the charge to finish
			f.Advance(10 * time.Minute)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newEffects()
			f := sagatest.New(t, uncertainDef(fx, 1)).Start("order-1", "order_placed", `{}`)
			tc.setup(f)
			f.Then(saga.Compensating)
			in := f.Instance()
			if in.Uncertain != 1 {
				t.Fatalf("aborted after the charge timed out: Instance.Uncertain = %d, want 1 (the charge)\n%v", in.Uncertain, f.History())
			}
			if cmd := f.LastCommand("undo:charge"); cmd.Metadata.Get("uncertain") != "true" {
				t.Fatalf("refund sent with uncertain=%q", cmd.Metadata.Get("uncertain"))
			}
			f.Reply("undo:charge", nil).Then(saga.Compensated).ThenSteps("do:reserve", "undo:charge", "undo:reserve")
		})
	}
}

// An abort after the charge ANSWERED with a transient failure (its retry
// waiting) is not uncertain: the service said it did not act.
func TestAbortAfterAnsweredFailureIsNotUncertain(t *testing.T) {
	fx := newEffects()
	f := sagatest.New(t, uncertainDef(fx, 1)).Start("order-1", "order_placed", `{}`)
	f.ReplyError("charge", errors.New("gateway busy")).Then(saga.Running)
	f.Abort("customer cancelled").Then(saga.Compensated).ThenSteps("do:reserve", "undo:reserve")
	if in := f.Instance(); in.Uncertain != -1 {
		t.Fatalf("Uncertain = %d, want -1", in.Uncertain)
	}
}

// A late success reply to the timed-out charge, arriving while (and after)
// its compensation runs, is ignored: the charge is compensated once, first,
// and never enters Completed.
func TestLateReplyToUncertainStep(t *testing.T) {
	fx := newEffects()
	f := sagatest.New(t, uncertainDef(fx, 1)).Start("order-1", "order_placed", `{}`)
	f.Advance(40 * time.Minute).Then(saga.Compensating) // three attempts time out
	charges := 0
	for _, c := range f.Sent() {
		if c.Topic == "payments.charge" {
			charges++
			f.ReplyTo(c, []byte("ch_late")) // every attempt's late success
		}
	}
	if charges != 3 {
		t.Fatalf("%d charges sent, want 3", charges)
	}
	in := f.Instance()
	if len(in.Completed) != 1 || in.Uncertain != 1 {
		t.Fatalf("after late replies: completed %v, uncertain %d", in.Completed, in.Uncertain)
	}
	f.Reply("undo:charge", nil)
	for _, c := range f.Sent() {
		if c.Topic == "payments.charge" {
			f.ReplyTo(c, []byte("ch_later"))
		}
	}
	f.Then(saga.Compensated).ThenSteps("do:reserve", "undo:charge", "undo:reserve")
}

// The uncertain step's compensation fails for good: needs attention, never
// compensated; an operator's retry runs it again, then the others.
func TestUncertainCompensationFailsThenRetried(t *testing.T) {
	fx := newEffects()
	f := sagatest.New(t, uncertainDef(fx, 1)).Start("order-1", "order_placed", `{}`)
	f.Advance(40 * time.Minute).Then(saga.Compensating)
	f.ReplyError("undo:charge", bus.Permanent(errors.New("refund refused"))).Then(saga.NeedsAttention)
	wantEffects(t, fx, "order-1", "reserve") // release has not run
	f.RequestRetry("fixed the gateway").Then(saga.Compensating)
	if cmd := f.LastCommand("undo:charge"); cmd.Metadata.Get("uncertain") != "true" {
		t.Fatalf("retried refund uncertain=%q", cmd.Metadata.Get("uncertain"))
	}
	f.Reply("undo:charge", nil).Then(saga.Compensated).ThenSteps("do:reserve", "undo:charge", "undo:reserve")
	wantEffects(t, fx, "order-1", "reserve", "release")
}

// Earlier attempts timed out, the last one answered: not uncertain. A
// permanent error wrapping context.DeadlineExceeded is an answer too.
func TestOnlyTheLastAttemptCounts(t *testing.T) {
	fx := newEffects()
	f := sagatest.New(t, uncertainDef(fx, 1)).Start("order-1", "order_placed", `{}`)
	f.Advance(10 * time.Minute).Advance(time.Minute) // attempt 1 times out, attempt 2 starts
	f.Advance(10 * time.Minute).Advance(time.Minute) // attempt 2 times out, attempt 3 starts
	f.ReplyError("charge", errors.New("gateway busy")).Then(saga.Compensated).ThenSteps("do:reserve", "undo:reserve")
	if in := f.Instance(); in.Uncertain != -1 {
		t.Fatalf("Uncertain = %d, want -1", in.Uncertain)
	}

	for _, tc := range []struct {
		err       error
		uncertain int
	}{
		{bus.Permanent(fmt.Errorf("gave up: %w", context.DeadlineExceeded)), -1},
		{fmt.Errorf("gateway: %w", context.DeadlineExceeded), 1},
	} {
		fx := newEffects()
		def := uncertainDef(fx, 1)
		def.Steps[1].Action = saga.Do(func(context.Context, saga.StepContext) ([]byte, error) { return nil, tc.err })
		def.Steps[1].Compensation = fx.do("refund")
		def.Steps[1].Retry = &saga.RetryPolicy{MaxAttempts: 1}
		f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`).Then(saga.Compensated)
		if in := f.Instance(); in.Uncertain != tc.uncertain {
			t.Fatalf("%v: Uncertain = %d, want %d", tc.err, in.Uncertain, tc.uncertain)
		}
	}
}

// An awaited event for the uncertain step that arrives after compensating
// began does not complete it.
func TestLateAwaitedEvent(t *testing.T) {
	fx := newEffects()
	def := saga.Definition{Name: "pay", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 1}, Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "paid", Action: saga.Await("payment_received", byOrder), Compensation: fx.do("refund"), Timeout: time.Hour},
	}}
	f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
	f.Advance(time.Hour).Then(saga.Compensated).ThenSteps("do:reserve", "undo:paid", "undo:reserve")
	f.Given("payment-9", paid("order-1")).Then(saga.Compensated)
	if in := f.Instance(); len(in.Completed) != 1 {
		t.Fatalf("completed %v after a late event", in.Completed)
	}
}

// A Send action whose command builder fails (nothing was recorded or sent)
// with an error that wraps context.DeadlineExceeded: no command left, so
// the step cannot have acted.
func TestCommandNeverBuiltIsNotUncertain(t *testing.T) {
	fx := newEffects()
	def := uncertainDef(fx, 1)
	def.Steps[1].Action = saga.Send(func(saga.StepContext) (string, *message.Message, error) {
		return "", nil, fmt.Errorf("looking up the account: %w", context.DeadlineExceeded)
	})
	def.Steps[1].Retry = &saga.RetryPolicy{MaxAttempts: 1}
	f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
	if in := f.Instance(); in.Uncertain != -1 {
		t.Fatalf("no command was ever sent, yet the charge is uncertain (%d): %v", in.Uncertain, f.History())
	}
}
