package saga_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/saga"
)

func TestMain(m *testing.M) { testdb.VerifyMain(m) }

// journal records the effects of actions, once per idempotency key.
type journal struct {
	mu   sync.Mutex
	keys map[string]int
	log  []string
}

func (j *journal) do(name string) saga.Action {
	return saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
		j.mu.Lock()
		defer j.mu.Unlock()
		if j.keys[sc.Key]++; j.keys[sc.Key] == 1 {
			j.log = append(j.log, sc.SagaID+":"+name)
		}
		return []byte(name), nil
	})
}

// TestCompensatesCompletedStepsInReverse: when the third step fails for good,
// the first two are undone, last first, and the saga ends compensated.
func TestCompensatesCompletedStepsInReverse(t *testing.T) {
	ctx := context.Background()
	store := memstore.New(nil)
	j := &journal{keys: map[string]int{}}
	def := saga.Definition{Name: "order", StartedBy: "order_placed", Steps: []saga.Step{
		{Name: "reserve", Action: j.do("reserve"), Compensation: j.do("release")},
		{Name: "charge", Action: j.do("charge"), Compensation: j.do("refund")},
		{Name: "ship", Action: saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
			if sc.SagaID == "order-2" {
				return nil, bus.Permanent(errors.New("no courier"))
			}
			return nil, nil
		})},
	}}
	r, err := saga.NewRunner(store, def, saga.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer r.Stop(ctx)
	for i := 1; i <= 2; i++ {
		if _, err := store.Append(ctx, fmt.Sprintf("order-%d", i), eventstore.NoStream,
			[]eventstore.EventData{{Type: "order_placed", Data: []byte(`{}`)}}); err != nil {
			t.Fatal(err)
		}
	}
	var one, two *saga.Instance
	wait.Until(t, "both sagas to end", func() bool {
		one, _ = r.Load(ctx, "order-1")
		two, _ = r.Load(ctx, "order-2")
		return one != nil && two != nil && one.Status.Done() && two.Status.Done()
	})
	if one.Status != saga.Completed || two.Status != saga.Compensated {
		t.Fatalf("statuses %s and %s", one.Status, two.Status)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	var got []string
	for _, l := range j.log {
		if l[:7] == "order-2" {
			got = append(got, l[8:])
		}
	}
	if want := []string{"reserve", "charge", "refund", "release"}; !slices.Equal(got, want) {
		t.Fatalf("order-2 ran %v, want %v", got, want)
	}
}
