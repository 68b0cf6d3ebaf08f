package sagatest_test

import (
	"context"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/saga/sagatest"
)

// A test of an order saga: stock is reserved locally, the card is charged by
// the payments service, and the courier never answers, so the saga undoes
// the charge and the reservation.
func Example() {
	var t sagatest.TB = exampleT{} // in a test: t *testing.T

	send := func(topic string) func(saga.StepContext) (string, *message.Message, error) {
		return func(sc saga.StepContext) (string, *message.Message, error) {
			return topic, message.NewMessage(uuid.NewString(), sc.Input), nil
		}
	}
	local := func(context.Context, saga.StepContext) ([]byte, error) { return nil, nil }
	def := saga.Definition{
		Name: "order", StartedBy: "order_placed",
		Retry: saga.RetryPolicy{MaxAttempts: 2},
		Steps: []saga.Step{
			{Name: "reserve", Action: saga.Do(local), Compensation: saga.Do(local)},
			{Name: "charge", Action: saga.Send(send("payments.charge")), Compensation: saga.Send(send("payments.refund"))},
			{Name: "ship", Action: saga.Send(send("shipping.ship")), Timeout: time.Hour},
		},
	}

	f := sagatest.New(t, def).Start("order-7", "order_placed", `{"sku":"book","cents":1200}`)
	charge := f.LastCommand("charge")
	fmt.Println(charge.Topic, string(charge.Payload), "key", charge.Key)

	f.Reply("charge", []byte(`{"charge":"ch_1"}`))
	f.Advance(2*time.Hour + time.Second) // two attempts to ship, an hour each, unanswered
	f.Then(saga.Compensating)
	f.Reply("undo:charge", nil)

	f.Then(saga.Compensated).ThenSteps("do:reserve", "do:charge", "undo:charge", "undo:reserve")
	for _, c := range f.Sent() {
		fmt.Println("sent", c)
	}
	for _, line := range f.History() {
		fmt.Println(line)
	}
	// Output:
	// payments.charge {"sku":"book","cents":1200} key order:order-7:charge
	// sent order-7 do:charge #1 to payments.charge
	// sent order-7 do:ship #1 to shipping.ship
	// sent order-7 do:ship #2 to shipping.ship
	// sent order-7 undo:charge #1 to payments.refund
	// started
	// step_started do:reserve #1
	// step_succeeded do:reserve #1
	// step_started do:charge #1
	// step_succeeded do:charge #1: {"charge":"ch_1"}
	// step_started do:ship #1
	// step_failed do:ship #1: deadline passed (1h0m0s)
	// step_started do:ship #2
	// step_failed do:ship #2: deadline passed (1h0m0s)
	// compensating: step ship failed 2 times: deadline passed (1h0m0s)
	// step_started undo:charge #1
	// step_succeeded undo:charge #1
	// step_started undo:reserve #1
	// step_succeeded undo:reserve #1
	// compensated
}

// exampleT stands in for the *testing.T of a test.
type exampleT struct{}

func (exampleT) Helper()                           {}
func (exampleT) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }
