package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/saga/sagatest"
)

// TestSagaShowsUncertainStep: a saga whose charge timed out for good says,
// in show and in --json, that the charge may have acted and is compensated
// first, so an operator knows why a refund went out for an unanswered charge.
func TestSagaShowsUncertainStep(t *testing.T) {
	send := func(topic string) saga.Action {
		return saga.Send(func(sc saga.StepContext) (string, *message.Message, error) {
			return topic, message.NewMessage(uuid.NewString(), sc.Input), nil
		})
	}
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 1},
		Steps: []saga.Step{
			{Name: "charge", Action: send("payments.charge"), Compensation: send("payments.refund"), Timeout: time.Minute},
		}}
	f := sagatest.New(t, def).Start("order-1", "order_placed", `{}`)
	f.Advance(time.Minute).Then(saga.Compensating)

	d := sagaDetailOf(f.Instance())
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"uncertain":"charge"`) {
		t.Errorf("show --json lacks the uncertain step: %s", b)
	}
	var out bytes.Buffer
	if err := writeSagaDetail(&out, d); err != nil {
		t.Fatal(err)
	}
	if line := lineStarting(out.String(), "Uncertain:"); !strings.HasSuffix(line, " charge (timed out for good, so it may have acted: compensated first)") {
		t.Errorf("show does not name the uncertain step:\n%s", out.String())
	}

	// A saga with no such step says nothing of it.
	f = sagatest.New(t, def).Start("order-2", "order_placed", `{}`)
	f.Reply("charge", nil).Then(saga.Completed)
	if b, _ := json.Marshal(sagaDetailOf(f.Instance())); strings.Contains(string(b), "uncertain") {
		t.Errorf("a completed saga reports an uncertain step: %s", b)
	}
}

func lineStarting(text, prefix string) string {
	for l := range strings.Lines(text) {
		if strings.HasPrefix(l, prefix) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}
