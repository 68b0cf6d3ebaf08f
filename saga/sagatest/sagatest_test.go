package sagatest_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/saga/sagatest"
)

// recorder is a TB that keeps the failure instead of ending a test.
type recorder struct{ failed string }

type stop struct{}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
	panic(stop{})
}

// fails runs fn and returns the failure it reported.
func fails(fn func(t sagatest.TB)) (msg string) {
	r := &recorder{}
	defer func() {
		if p := recover(); p != nil {
			if _, ok := p.(stop); !ok {
				panic(p)
			}
		}
		msg = r.failed
	}()
	fn(r)
	return ""
}

func orderDef() saga.Definition {
	ok := saga.Do(func(context.Context, saga.StepContext) ([]byte, error) { return nil, nil })
	return saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 3}, Steps: []saga.Step{
		{Name: "reserve", Action: ok, Compensation: ok},
		{Name: "charge", Action: saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
			return "payments.charge", message.NewMessage(uuid.NewString(), sc.Input), nil
		}), Timeout: time.Minute},
	}}
}

func TestFailuresSayWhat(t *testing.T) {
	for _, c := range []struct {
		name string
		fn   func(t sagatest.TB)
		want string
	}{
		{"status", func(t sagatest.TB) {
			sagatest.New(t, orderDef()).Start("order-1", "order_placed", `{}`).Then(saga.Completed)
		}, "saga order-1 is running, want completed (no error)\nhistory:\n  started\n  step_started do:reserve #1"},
		{"steps", func(t sagatest.TB) {
			sagatest.New(t, orderDef()).Start("order-1", "order_placed", `{}`).ThenSteps("do:reserve", "do:charge")
		}, `steps done:` + "\n" + `  got  ["do:reserve"]` + "\n" + `  want ["do:reserve" "do:charge"]`},
		{"no command", func(t sagatest.TB) {
			sagatest.New(t, orderDef()).Start("order-1", "order_placed", `{}`).Reply("undo:charge", nil)
		}, "sagatest: saga order-1 sent no command for undo:charge"},
		{"no saga", func(t sagatest.TB) {
			sagatest.New(t, orderDef()).Start("basket-1", "basket_filled", `{}`).Then(saga.Running)
		}, "sagatest: no saga started (give a order_placed event)"},
		{"bad definition", func(t sagatest.TB) { sagatest.New(t, saga.Definition{Name: "order"}) },
			"sagatest: saga: Definition.StartedBy: required"},
		{"refused request", func(t sagatest.TB) {
			sagatest.New(t, orderDef()).Start("order-1", "order_placed", `{}`).RequestRetry("")
		}, "sagatest: saga order order-1 is running; only a saga that needs attention can be retried"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := fails(c.fn); !strings.HasPrefix(got, c.want) {
				t.Fatalf("failure:\n%s\nwant it to start with:\n%s", got, c.want)
			}
		})
	}
}

// TestAdvanceFiresTimersOnTime: Advance moves through the timers in order,
// at their own times, however far it goes in one call.
func TestAdvanceFiresTimersOnTime(t *testing.T) {
	f := sagatest.New(t, orderDef()).Start("order-1", "order_placed", `{}`)
	f.Advance(time.Hour)
	f.Then(saga.Compensated).ThenSteps("do:reserve", "undo:reserve")
	sent := f.Sent()
	if len(sent) != 3 {
		t.Fatalf("sent %v, want 3 attempts", sent)
	}
	in := f.Instance()
	var starts, fails []time.Time
	for _, h := range in.History {
		if h.Step == "charge" && h.Type == "step_started" {
			starts = append(starts, h.At)
		}
		if h.Step == "charge" && h.Type == "step_failed" {
			fails = append(fails, h.At)
		}
	}
	for i := range fails {
		if got := fails[i].Sub(starts[i]); got != time.Minute {
			t.Fatalf("attempt %d failed %s after it started, want at its 1m deadline", i+1, got)
		}
		if i > 0 && (starts[i].Sub(fails[i-1]) < 80*time.Millisecond || starts[i].Sub(fails[i-1]) > 480*time.Millisecond) {
			t.Fatalf("attempt %d started %s after the failure before it", i+1, starts[i].Sub(fails[i-1]))
		}
	}
	if !f.Now().Equal(sagatest.Epoch.Add(time.Hour)) {
		t.Fatalf("clock at %s, want an hour after the epoch", f.Now())
	}
}

// TestCommandsCarryTheirKeys: a command names its saga, step and attempt,
// and carries the idempotency key, correlation id and reply topic.
func TestCommandsCarryTheirKeys(t *testing.T) {
	f := sagatest.New(t, orderDef()).Start("order-1", "order_placed", `{"cents":5}`)
	c := f.LastCommand("charge")
	if c.SagaID != "order-1" || c.Step != "charge" || c.Compensating || c.Attempt != 1 || c.Topic != "payments.charge" ||
		c.Key != "order:order-1:charge" || c.Metadata.Get(bus.KeyIdempotency) != c.Key ||
		c.Metadata.Get(bus.KeyReplyTo) != "saga.order.replies" || c.Metadata.Get(bus.KeyCorrelationID) == "" ||
		string(c.Payload) != `{"cents":5}` || c.Message == nil || c.Message.UUID == "" {
		t.Fatalf("command %+v", c)
	}
	f.ReplyError("charge", bus.Permanent(errors.New("no")))
	f.Then(saga.Compensated)
}
