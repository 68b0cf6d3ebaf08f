package bus_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/wait"
)

var errFlaky = errors.New("flaky dependency")

func TestNewRouterDefaultsToMemoryPoisonBox(t *testing.T) {
	r, box, err := bus.NewRouter(bus.RouterConfig{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := box.(*bus.MemoryPoisonBox); !ok || r == nil {
		t.Fatalf("NewRouter(zero config) = %v, %T; want a router and a *MemoryPoisonBox", r, box)
	}
	mine := bus.NewMemoryPoisonBox()
	if _, box, _ := bus.NewRouter(bus.RouterConfig{Poison: mine, Logger: quiet}); box != mine {
		t.Fatalf("NewRouter returned %p, want the configured poison box %p", box, mine)
	}
}

func TestRouterRetriesUntilSuccess(t *testing.T) {
	ps := newPubSub(t)
	r, box := newRouter(t, bus.RouterConfig{Retry: fastRetry})
	var c calls
	r.AddConsumerHandler("flaky", "orders", ps, func(msg *message.Message) error {
		if c.record(msg) <= 2 {
			return errFlaky
		}
		return nil
	})
	run(t, r)

	publish(t, ps, "orders", message.NewMessage("m-1", []byte("x")))
	wait.Until(t, "three attempts", func() bool { return c.n() >= 3 })

	if n := c.n(); n != 3 {
		t.Errorf("handler called %d times, want 3 (two failures, then success)", n)
	}
	if got := poisoned(t, box, false); len(got) != 0 {
		t.Errorf("a message that succeeded on retry was poisoned: %+v", got)
	}
}

func TestRouterPoisonsPermanentErrorsAtOnce(t *testing.T) {
	tests := []struct {
		name string
		err  error
	}{
		{"bus.Permanent", bus.Permanent(errors.New("customer does not exist"))},
		{"wrapped ValidationError", fmt.Errorf("appending: %w", &eventstore.ValidationError{Field: "stream id", Reason: "empty", Err: eventstore.ErrInvalidStreamID})},
		{"MessageError from FromMessage", func() error { _, err := bus.FromMessage(message.NewMessage("not-a-uuid", nil)); return err }()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ps := newPubSub(t)
			r, box := newRouter(t, bus.RouterConfig{Retry: fastRetry})
			var c calls
			r.AddConsumerHandler("billing", "orders", ps, func(msg *message.Message) error {
				c.record(msg)
				return tt.err
			})
			run(t, r)

			msg := message.NewMessage("m-perm", []byte(`{"id":1}`))
			msg.Metadata.Set("x-tenant", "acme")
			publish(t, ps, "orders", msg)
			wait.Until(t, "the message in the poison box", func() bool { return len(poisoned(t, box, true)) == 1 })

			if n := c.n(); n != 1 {
				t.Errorf("handler called %d times, want 1: a permanent error is not retried", n)
			}
			p := poisoned(t, box, true)[0]
			if p.Topic != "orders" || p.Handler != "billing" || p.UUID != "m-perm" || string(p.Payload) != `{"id":1}` {
				t.Errorf("poisoned = %+v, want topic orders, handler billing, the message's UUID and payload", p)
			}
			if p.Reason != tt.err.Error() {
				t.Errorf("reason = %q, want the handler's error %q", p.Reason, tt.err)
			}
			if want := map[string]string{"x-tenant": "acme"}; !maps.Equal(p.Metadata, want) {
				t.Errorf("metadata = %v, want the message's own %v without the poison notes", p.Metadata, want)
			}
		})
	}
}

func TestRouterPoisonsAfterMaxRetries(t *testing.T) {
	ps := newPubSub(t)
	policy := fastRetry
	policy.MaxRetries = 4
	r, box := newRouter(t, bus.RouterConfig{Retry: policy})
	var c calls
	r.AddConsumerHandler("always-fails", "orders", ps, func(msg *message.Message) error {
		c.record(msg)
		return fmt.Errorf("attempt %d: %w", c.n(), errFlaky)
	})
	run(t, r)

	publish(t, ps, "orders", message.NewMessage("m-1", nil))
	wait.Until(t, "the message in the poison box", func() bool { return len(poisoned(t, box, true)) == 1 })

	if n, want := c.n(), policy.MaxRetries+1; n != want {
		t.Errorf("handler called %d times, want MaxRetries+1 = %d", n, want)
	}
	if p := poisoned(t, box, true)[0]; p.Reason != "attempt 5: "+errFlaky.Error() || p.Topic != "orders" || p.Handler != "always-fails" {
		t.Errorf("poisoned = %+v, want the last attempt's error, topic and handler", p)
	}
}

func TestRouterNegativeMaxRetriesMeansNone(t *testing.T) {
	ps := newPubSub(t)
	r, box := newRouter(t, bus.RouterConfig{Retry: bus.RetryPolicy{MaxRetries: -1}})
	var c calls
	r.AddConsumerHandler("h", "orders", ps, func(msg *message.Message) error { c.record(msg); return errFlaky })
	run(t, r)

	publish(t, ps, "orders", message.NewMessage("m-1", nil))
	wait.Until(t, "the message in the poison box", func() bool { return len(poisoned(t, box, true)) == 1 })
	if n := c.n(); n != 1 {
		t.Errorf("handler called %d times, want 1", n)
	}
}

func TestRouterPoisonsPanicsWithoutRetry(t *testing.T) {
	ps := newPubSub(t)
	r, box := newRouter(t, bus.RouterConfig{Retry: fastRetry})
	var c calls
	r.AddConsumerHandler("panicky", "orders", ps, func(msg *message.Message) error {
		c.record(msg)
		var m map[string]int
		m["boom"]++ // assignment to entry in nil map
		return nil
	})
	run(t, r)

	publish(t, ps, "orders", message.NewMessage("m-1", nil))
	wait.Until(t, "the message in the poison box", func() bool { return len(poisoned(t, box, true)) == 1 })

	if n := c.n(); n != 1 {
		t.Errorf("handler called %d times, want 1: the same input would panic again", n)
	}
	p := poisoned(t, box, true)[0]
	if !strings.Contains(p.Reason, "panic") || !strings.Contains(p.Reason, "assignment to entry in nil map") {
		t.Errorf("reason = %q, want it to name the panic", p.Reason)
	}
	if !strings.Contains(p.Reason, "router_test.go") {
		t.Errorf("reason should carry the stack of the panic, got %q", p.Reason)
	}
}

// The waits between attempts follow the policy: about Initial before the
// first retry, times Multiplier after that. Only lower bounds (a timer never
// fires early) and one generous upper bound are checked.
func TestRouterBackoffGrows(t *testing.T) {
	ps := newPubSub(t)
	policy := bus.RetryPolicy{MaxRetries: 3, Initial: 20 * time.Millisecond, Multiplier: 4, Max: 2 * time.Second, Jitter: 0.1}
	r, box := newRouter(t, bus.RouterConfig{Retry: policy})
	var c calls
	r.AddConsumerHandler("h", "orders", ps, func(msg *message.Message) error { c.record(msg); return errFlaky })
	run(t, r)

	publish(t, ps, "orders", message.NewMessage("m-1", nil))
	wait.Until(t, "the message in the poison box", func() bool { return len(poisoned(t, box, true)) == 1 })

	at := c.times()
	if len(at) != 4 {
		t.Fatalf("handler called %d times, want 4", len(at))
	}
	gaps := []time.Duration{at[1].Sub(at[0]), at[2].Sub(at[1]), at[3].Sub(at[2])}
	interval := policy.Initial
	for i, g := range gaps {
		if low := time.Duration(float64(interval) * (1 - policy.Jitter)); g < low {
			t.Errorf("wait %d = %v, want at least %v (interval %v - jitter)", i+1, g, low, interval)
		}
		interval = time.Duration(float64(interval) * policy.Multiplier)
	}
	if low := time.Duration(float64(policy.Initial) * (1 - policy.Jitter)); gaps[1] <= low || gaps[2] <= gaps[0] {
		t.Errorf("waits %v do not grow", gaps)
	}
	// 20+80+320ms with ±10% jitter; a backoff that grew by Multiplier²
	// per attempt (or started at Initial×Multiplier) takes over 3s.
	if total := at[3].Sub(at[0]); total > 1500*time.Millisecond {
		t.Errorf("retries took %v (waits %v); the policy asks for about 420ms", total, gaps)
	}
}

func TestRouterBackoffIsCapped(t *testing.T) {
	ps := newPubSub(t)
	policy := bus.RetryPolicy{MaxRetries: 4, Initial: 10 * time.Millisecond, Multiplier: 10, Max: 20 * time.Millisecond, Jitter: 0.1}
	r, box := newRouter(t, bus.RouterConfig{Retry: policy})
	var c calls
	r.AddConsumerHandler("h", "orders", ps, func(msg *message.Message) error { c.record(msg); return errFlaky })
	run(t, r)

	publish(t, ps, "orders", message.NewMessage("m-1", nil))
	wait.Until(t, "the message in the poison box", func() bool { return len(poisoned(t, box, true)) == 1 })
	at := c.times()
	// Uncapped, the waits would be 10ms, 100ms, 1s, 10s.
	if total := at[len(at)-1].Sub(at[0]); total > 2*time.Second {
		t.Errorf("retries took %v, want about 70ms: waits are capped at Max = %v", total, policy.Max)
	}
}

func TestRouterKeepsGoingAfterPoisoning(t *testing.T) {
	ps := newPubSub(t)
	r, box := newRouter(t, bus.RouterConfig{Retry: fastRetry})
	var mu sync.Mutex
	var handled []string
	r.AddConsumerHandler("h", "orders", ps, func(msg *message.Message) error {
		switch string(msg.Payload) {
		case "bad":
			return bus.Permanent(errors.New("cannot parse"))
		case "flaky":
			return errFlaky // runs out of retries
		}
		mu.Lock()
		handled = append(handled, msg.UUID)
		mu.Unlock()
		return nil
	})
	run(t, r)

	// With BlockPublishUntilSubscriberAck, a held message would block the
	// next Publish for good.
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i, payload := range []string{"bad", "ok", "flaky", "ok"} {
			if err := ps.Publish("orders", message.NewMessage(fmt.Sprintf("m-%d", i), []byte(payload))); err != nil {
				t.Errorf("publish: %v", err)
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(wait.Timeout):
		t.Fatal("publishing blocked: a poisoned message holds up the ones behind it")
	}
	wait.Until(t, "both good messages handled", func() bool { mu.Lock(); defer mu.Unlock(); return len(handled) == 2 })
	if got := poisoned(t, box, true); len(got) != 2 || got[0].UUID != "m-0" || got[1].UUID != "m-2" {
		t.Errorf("poisoned = %+v, want m-0 then m-2", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if handled[0] != "m-1" || handled[1] != "m-3" {
		t.Errorf("handled %v, want [m-1 m-3]", handled)
	}
}

func TestRouterHandlerTimeoutGivesEachAttemptAFreshContext(t *testing.T) {
	ps := newPubSub(t)
	r, box := newRouter(t, bus.RouterConfig{Retry: fastRetry, HandlerTimeout: 50 * time.Millisecond})
	var c calls
	var firstErr, secondErrAtStart atomic.Value
	r.AddConsumerHandler("slow-then-fast", "orders", ps, func(msg *message.Message) error {
		ctx := msg.Context()
		if c.record(msg) == 1 {
			select {
			case <-ctx.Done():
				firstErr.Store(ctx.Err())
				return ctx.Err()
			case <-time.After(wait.Timeout):
				return errors.New("the attempt's context was never cancelled")
			}
		}
		secondErrAtStart.Store(fmt.Sprint(ctx.Err()))
		if _, ok := ctx.Deadline(); !ok {
			return bus.Permanent(errors.New("the retry has no deadline"))
		}
		return nil
	})
	run(t, r)

	publish(t, ps, "orders", message.NewMessage("m-1", nil))
	wait.Until(t, "two attempts", func() bool { return c.n() >= 2 })

	if err, _ := firstErr.Load().(error); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("first attempt's context ended with %v, want context.DeadlineExceeded", err)
	}
	if got := secondErrAtStart.Load(); got != "<nil>" {
		t.Errorf("retry started with a context already done (%v); each attempt needs a fresh one", got)
	}
	if n := c.n(); n != 2 {
		t.Errorf("handler called %d times, want 2", n)
	}
	if got := poisoned(t, box, false); len(got) != 0 {
		t.Errorf("poisoned %+v, want nothing: the retry succeeded", got)
	}
}

// A message still being retried when the router stops is not poisoned: it is
// nacked, so the broker delivers it again after the restart.
func TestRouterCloseDuringBackoffDoesNotPoison(t *testing.T) {
	ps := newPubSub(t)
	r, box := newRouter(t, bus.RouterConfig{Retry: bus.RetryPolicy{MaxRetries: 5, Initial: time.Minute}})
	var c calls
	r.AddConsumerHandler("h", "orders", ps, func(msg *message.Message) error { c.record(msg); return errFlaky })
	run(t, r)

	published := make(chan error, 1)
	go func() { published <- ps.Publish("orders", message.NewMessage("m-1", nil)) }()
	wait.Until(t, "the first attempt", func() bool { return c.n() == 1 })

	start := time.Now()
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close took %v: the backoff wait must end when the router stops", d)
	}
	if err := <-published; err != nil {
		t.Errorf("publish: %v", err)
	}
	if got := poisoned(t, box, false); len(got) != 0 {
		t.Errorf("poisoned on shutdown: %+v; the message was only waiting for a retry", got)
	}
}

// flakyBox fails its first failures publishes, like a database that is down.
type flakyBox struct {
	*bus.MemoryPoisonBox
	failures atomic.Int32
}

func (b *flakyBox) Publish(topic string, msgs ...*message.Message) error {
	if b.failures.Add(-1) >= 0 {
		return errBrokerDown
	}
	return b.MemoryPoisonBox.Publish(topic, msgs...)
}

func TestRouterDoesNotAckWhenPoisonBoxFails(t *testing.T) {
	ps := newPubSub(t)
	box := &flakyBox{MemoryPoisonBox: bus.NewMemoryPoisonBox()}
	box.failures.Store(2)
	r, _ := newRouter(t, bus.RouterConfig{Retry: fastRetry, Poison: box})
	var c calls
	r.AddConsumerHandler("h", "orders", ps, func(msg *message.Message) error {
		c.record(msg)
		return bus.Permanent(errors.New("bad input"))
	})
	run(t, r)

	publish(t, ps, "orders", message.NewMessage("m-1", nil))
	wait.Until(t, "the message in the poison box", func() bool { return len(poisoned(t, box, true)) == 1 })
	// Nacked twice while the box was down, redelivered, then poisoned.
	if n := c.n(); n != 3 {
		t.Errorf("handler called %d times, want 3: a message the box could not take must be redelivered, not lost", n)
	}
	if got := poisoned(t, box, true)[0]; got.UUID != "m-1" || got.Metadata[middleware.ReasonForPoisonedKey] != "" {
		t.Errorf("poisoned %+v", got)
	}
}
