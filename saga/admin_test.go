package saga_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/saga"
	"github.com/stele-dev/stele/saga/sagatest"
)

// TestDefinitionErrors: NewRunner refuses a definition it cannot run, and
// says which field is wrong.
func TestDefinitionErrors(t *testing.T) {
	ok := []saga.Step{{Name: "a", Action: noop}}
	cases := []struct {
		name  string
		def   saga.Definition
		cfg   saga.Config
		field string
	}{
		{"no name", saga.Definition{StartedBy: "x", Steps: ok}, saga.Config{}, "Name"},
		{"bad name", saga.Definition{Name: "Order-Saga", StartedBy: "x", Steps: ok}, saga.Config{}, "Name"},
		{"long name", saga.Definition{Name: strings.Repeat("a", 51), StartedBy: "x", Steps: ok}, saga.Config{}, "Name"},
		{"no start", saga.Definition{Name: "order", Steps: ok}, saga.Config{}, "StartedBy"},
		{"no steps", saga.Definition{Name: "order", StartedBy: "x"}, saga.Config{}, "Steps"},
		{"unnamed step", saga.Definition{Name: "order", StartedBy: "x", Steps: []saga.Step{{Action: noop}}}, saga.Config{}, "Steps[0].Name"},
		{"same name twice", saga.Definition{Name: "order", StartedBy: "x", Steps: []saga.Step{
			{Name: "a", Action: noop}, {Name: "a", Action: noop}}}, saga.Config{}, "Steps[1].Name"},
		{"no action", saga.Definition{Name: "order", StartedBy: "x", Steps: []saga.Step{
			{Name: "a", Action: noop}, {Name: "b", Compensation: noop}}}, saga.Config{}, "Steps[1].Action"},
		{"send without a bus", saga.Definition{Name: "order", StartedBy: "x", Steps: []saga.Step{
			{Name: "a", Action: send("t")}}}, saga.Config{}, "Steps"},
		{"compensation sends without a bus", saga.Definition{Name: "order", StartedBy: "x", Steps: []saga.Step{
			{Name: "a", Action: noop, Compensation: send("t")}}}, saga.Config{Publisher: nopPublisher{}}, "Steps"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := saga.NewRunner(memstore.New(nil), tc.def, tc.cfg)
			var de *saga.DefinitionError
			if !errors.As(err, &de) || de.Field != tc.field {
				t.Fatalf("NewRunner: %v, want a *DefinitionError on %s", err, tc.field)
			}
			if !strings.HasPrefix(err.Error(), "saga: Definition."+tc.field+": ") {
				t.Fatalf("message %q does not name the field", err)
			}
		})
	}
	if _, err := saga.NewRunner(memstore.New(nil), saga.Definition{Name: "order_2", StartedBy: "x", Steps: ok}, saga.Config{}); err != nil {
		t.Fatalf("a valid definition: %v", err)
	}
}

type nopPublisher struct{}

func (nopPublisher) Publish(string, ...*message.Message) error { return nil }
func (nopPublisher) Close() error                              { return nil }

// TestLoadAndList: Load tells a saga's history, entry by entry, in order,
// and List finds sagas by definition and status, oldest first.
func TestLoadAndList(t *testing.T) {
	ctx := context.Background()
	fx := newEffects()
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Retry: saga.RetryPolicy{MaxAttempts: 2}, Steps: []saga.Step{
		{Name: "reserve", Action: fx.do("reserve"), Compensation: fx.do("release")},
		{Name: "charge", Action: send("payments.charge"), Timeout: time.Minute},
		{Name: "ship", Action: fx.do("ship")},
	}}
	f := sagatest.New(t, def)
	f.Start("order-1", "order_placed", `{"n":1}`).Reply("charge", []byte("ch_1")).Then(saga.Completed)
	f.Advance(time.Second)
	f.Start("order-2", "order_placed", `{"n":2}`).ReplyError("charge", errors.New("declined"))

	in, err := saga.Load(ctx, f.Store(), "order", "order-2")
	if err != nil {
		t.Fatal(err)
	}
	if in.Definition != "order" || in.ID != "order-2" || in.Status != saga.Running || string(in.Input) != `{"n":2}` ||
		!slices.Equal(in.Completed, []int{0}) || in.Current != 1 || in.Attempt != 1 || in.InFlight ||
		in.LastError != "bus: the responder failed: declined" || !in.StartedAt.Equal(sagatest.Epoch.Add(time.Second)) {
		t.Fatalf("order-2 loaded as %+v", in)
	}
	if want := sagatest.Epoch.Add(time.Second); in.RetryAt.Before(want.Add(80*time.Millisecond)) || in.RetryAt.After(want.Add(120*time.Millisecond)) {
		t.Fatalf("order-2 retries at %s, want 100ms after its failure at %s, give or take 20%%", in.RetryAt, want)
	}
	type entry struct {
		typ, step string
		comp      bool
		attempt   int
		detail    string
	}
	var got []entry
	for _, h := range in.History {
		if h.Type == "step_started" && !strings.HasPrefix(h.Detail, "deadline 2030-01-01T00:") {
			t.Fatalf("a start's detail is %q, want its deadline", h.Detail)
		}
		if h.Type != "step_started" {
			got = append(got, entry{h.Type, h.Step, h.Compensating, h.Attempt, h.Detail})
		} else {
			got = append(got, entry{h.Type, h.Step, h.Compensating, h.Attempt, ""})
		}
	}
	want := []entry{
		{"started", "", false, 0, ""},
		{"step_started", "reserve", false, 1, ""},
		{"step_succeeded", "reserve", false, 1, "reserve"}, // its output
		{"step_started", "charge", false, 1, ""},
		{"step_failed", "charge", false, 1, "bus: the responder failed: declined"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("order-2's history:\n got  %+v\n want %+v", got, want)
	}
	for i := 1; i < len(in.History); i++ {
		if in.History[i].At.Before(in.History[i-1].At) {
			t.Fatalf("history out of order at %d: %+v", i, in.History)
		}
	}
	if in.Version != eventstore.Version(len(in.History)) {
		t.Fatalf("version %d for %d events", in.Version, len(in.History))
	}

	f.Advance(time.Second) // order-2's second attempt is under way
	f.Start("order-3", "order_placed", `{"n":3}`).ReplyError("charge", bus.Permanent(errors.New("card stolen")))

	// Another definition's saga in the same store.
	if _, err := f.Store().Append(ctx, saga.StreamID("refund", "r-1"), eventstore.NoStream,
		[]eventstore.EventData{{Type: saga.TypeStarted, Data: []byte(`{"input":{}}`)}}); err != nil {
		t.Fatal(err)
	}
	ids := func(status saga.Status, definition string) []string {
		all, err := saga.List(ctx, f.Store(), definition, status)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, in := range all {
			out = append(out, in.Definition+"/"+in.ID+"="+string(in.Status))
		}
		return out
	}
	for _, c := range []struct {
		definition string
		status     saga.Status
		want       []string
	}{
		{"order", "", []string{"order/order-1=completed", "order/order-2=running", "order/order-3=compensated"}},
		{"order", saga.Compensated, []string{"order/order-3=compensated"}},
		{"order", saga.NeedsAttention, nil},
		{"", saga.Running, []string{"order/order-2=running", "refund/r-1=running"}},
		{"refund", "", []string{"refund/r-1=running"}},
		{"nothing", "", nil},
	} {
		if got := ids(c.status, c.definition); !slices.Equal(got, c.want) {
			t.Fatalf("List(%q, %q) = %q, want %q", c.definition, c.status, got, c.want)
		}
	}
	if _, err := saga.Load(ctx, f.Store(), "order", "order-9"); !errors.Is(err, saga.ErrNoSaga) {
		t.Fatalf("Load of an unknown saga: %v", err)
	}
}
