package saga_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/saga/sagatest"
)

// byOrder names the saga of an event carrying {"order": "..."}.
func byOrder(e eventstore.Event) string {
	var v struct{ Order string }
	_ = json.Unmarshal(e.Data, &v)
	return v.Order
}

func awaitDef() saga.Definition {
	return saga.Definition{Name: "pay", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "reserve", Action: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) { return []byte("ok"), nil }),
			Compensation: saga.Do(func(context.Context, saga.StepContext) ([]byte, error) { return nil, nil })},
		{Name: "paid", Action: saga.Await("payment_received", byOrder), Timeout: time.Hour,
			Retry: &saga.RetryPolicy{MaxAttempts: 2, Initial: time.Minute}},
		{Name: "ship", Action: saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
			return append([]byte("shipped after "), sc.Outputs["paid"]...), nil
		})},
	}}
}

func paid(order string) eventstore.EventData {
	return eventstore.EventData{Type: "payment_received", Data: []byte(`{"order":"` + order + `"}`)}
}

// TestAwaitedEventCompletesTheStep: a step that waits for an event another
// service appends completes when it arrives, with the event's data as output.
func TestAwaitedEventCompletesTheStep(t *testing.T) {
	f := sagatest.New(t, awaitDef()).Start("order-1", "order_placed", `{}`)
	f.Then(saga.Running)
	f.Advance(30 * time.Minute).Then(saga.Running) // still waiting, before its deadline
	f.Given("payment-9", paid("order-1"))
	f.Then(saga.Completed).ThenSteps("do:reserve", "do:paid", "do:ship")
	if out := f.Instance().Outputs[2]; string(out) != `shipped after {"order":"order-1"}` {
		t.Fatalf("ship's output %q", out)
	}
}

// TestAwaitedEventBeforeTheStep: an event that comes before the saga reaches
// the step is kept, and completes the step when it starts; an event for
// another saga, or a repeat, changes nothing.
func TestAwaitedEventBeforeTheStep(t *testing.T) {
	def := awaitDef()
	def.Steps[0].Action = saga.Send(func(saga.StepContext) (string, *message.Message, error) {
		return "stock", message.NewMessage("", []byte(`{}`)), nil
	})
	f := sagatest.New(t, def).Start("order-2", "order_placed", `{}`)
	f.Given("payment-1", paid("order-2"), paid("order-2"), paid("order-77"))
	f.Then(saga.Running) // still reserving
	f.Reply("reserve", []byte("reserved"))
	f.Then(saga.Completed).ThenSteps("do:reserve", "do:paid", "do:ship")
	received := 0
	for _, h := range f.Instance().History {
		if h.Type == "event_received" {
			received++
		}
	}
	if received != 1 {
		t.Fatalf("recorded %d received events, want 1:\n%v", received, f.History())
	}
}

// TestAwaitedEventThatNeverComes: the wait has the step's deadline and
// retries; then the saga compensates.
func TestAwaitedEventThatNeverComes(t *testing.T) {
	f := sagatest.New(t, awaitDef()).Start("order-3", "order_placed", `{}`)
	f.Advance(3 * time.Hour)
	f.Then(saga.Compensated).ThenSteps("do:reserve", "undo:reserve")
}

func TestAwaitNeedsATypeAndAnID(t *testing.T) {
	def := awaitDef()
	def.Steps[1].Action = saga.Await("", byOrder)
	if _, err := saga.NewRunner(nil, def, saga.Config{}); err == nil {
		t.Fatal("an Await without an event type was accepted")
	}
}

// TestSendUntilAnEvent: a command whose service answers with an event in
// the shared store rather than a reply.
func TestSendUntilAnEvent(t *testing.T) {
	def := awaitDef()
	def.Steps[1].Action = saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
		return "payments", message.NewMessage("", []byte(`{"order":"`+sc.SagaID+`"}`)), nil
	}).Until("payment_received", byOrder)
	f := sagatest.New(t, def).Start("order-4", "order_placed", `{}`)
	if cmd := f.LastCommand("paid"); cmd.Topic != "payments" {
		t.Fatalf("command %+v", cmd)
	}
	f.Then(saga.Running)
	f.Given("payment-4", paid("order-4"))
	f.Then(saga.Completed).ThenSteps("do:reserve", "do:paid", "do:ship")
}
