package telemetry_test

import (
	"context"
	"errors"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/internal/wait"
)

// TestMiddlewareAttempts: a handler that always fails gets a span per
// attempt, numbered, each continuing the publish span; the retries are
// counted; and the message the poison box keeps carries nothing the
// middleware used for counting (a re-published message must start again at
// attempt 1). A handler that panics still ends its span.
func TestMiddlewareAttempts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	o := newObserved(t)
	b, err := broker.Open(ctx, broker.Config{Kind: broker.GoChannel, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	poison := bus.NewMemoryPoisonBox()
	router, _, err := bus.NewRouter(bus.RouterConfig{Poison: poison, Logger: quiet,
		Retry: bus.RetryPolicy{MaxRetries: 2, Initial: time.Millisecond, Max: 2 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	router.AddMiddleware(o.tel.Middleware)
	for _, name := range []string{"failing", "panicking"} {
		sub, err := b.Subscriber(name)
		if err != nil {
			t.Fatal(err)
		}
		router.AddConsumerHandler(name, name, sub, func(msg *message.Message) error {
			if name == "panicking" {
				panic("boom")
			}
			return errors.New("always")
		})
	}
	var wg sync.WaitGroup
	rctx, stop := context.WithCancel(ctx)
	wg.Go(func() { _ = router.Run(rctx) })
	<-router.Running()

	pub := o.tel.Publisher(b.Publisher(), "test")
	sent := map[string]message.Metadata{}
	for _, topic := range []string{"failing", "panicking"} {
		msg := message.NewMessage(topic+"-1", []byte("{}"))
		msg.Metadata.Set("k", "v")
		if err := pub.Publish(topic, msg); err != nil {
			t.Fatal(err)
		}
		sent[topic] = maps.Clone(msg.Metadata)
	}
	wait.Until(t, "both messages poisoned", func() bool {
		got, _ := poison.List(ctx, false, 10)
		return len(got) == 2
	})
	stop()
	_ = router.Close()
	wg.Wait()

	spans := o.ended()
	publish := one(t, spans, "stele.publish failing", nil)
	if sent["failing"].Get("traceparent") == "" {
		t.Fatal("the publisher put no traceparent on the message")
	}
	handles := find(spans, "stele.handle failing", nil)
	attempts := map[string]bool{}
	for _, h := range handles {
		attempts[attr(h, "stele.attempt")] = true
		if h.Parent().SpanID() != publish.SpanContext().SpanID() || h.Status().Code != codes.Error {
			t.Errorf("attempt %s: parent %s, status %v; want the publish span, an error", attr(h, "stele.attempt"), h.Parent().SpanID(), h.Status())
		}
	}
	if len(handles) != 3 || !attempts["1"] || !attempts["2"] || !attempts["3"] {
		t.Errorf("%d handle spans with attempts %v, want attempts 1, 2 and 3", len(handles), attempts)
	}
	panicked := find(spans, "stele.handle panicking", nil)
	if len(panicked) != 1 || panicked[0].Status().Code != codes.Error || panicked[0].Status().Description != "the handler panicked" {
		t.Errorf("panicking handler spans %v", statuses(panicked))
	}

	poisoned, err := poison.List(ctx, false, 10)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range poisoned {
		if !maps.Equal(p.Metadata, map[string]string(sent[p.Topic])) {
			t.Errorf("poisoned %s keeps metadata %v, want what was sent: %v", p.Topic, p.Metadata, sent[p.Topic])
		}
	}

	got := metrics(o.collect(t))
	count := func(name string, attrs map[string]string) float64 {
		var sum float64
	next:
		for _, p := range points(got[name]) {
			for k, v := range attrs {
				if p.attrs[k] != v {
					continue next
				}
			}
			sum += p.value
		}
		return sum
	}
	if n := count("stele.bus.retries", map[string]string{"stele.handler": "failing"}); n != 2 {
		t.Errorf("%v retries counted for failing, want 2", n)
	}
	if n := count("stele.bus.handled", map[string]string{"stele.handler": "failing", "stele.outcome": "error"}); n != 3 {
		t.Errorf("%v failed attempts counted, want 3", n)
	}
	if n := count("stele.bus.handled", map[string]string{"stele.handler": "panicking", "stele.outcome": "error"}); n != 1 {
		t.Errorf("%v panicked attempts counted, want 1", n)
	}
}

func statuses(spans []sdktrace.ReadOnlySpan) []sdktrace.Status {
	var out []sdktrace.Status
	for _, s := range spans {
		out = append(out, s.Status())
	}
	return out
}
