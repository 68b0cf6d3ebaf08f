// Package bustest is the conformance suite every broker kind of
// bus/broker runs: what stele relies on from a bus, asserted against a real
// broker.
//
//	func TestRabbitMQ(t *testing.T) {
//		bustest.Run(t, func(t *testing.T) *broker.Broker { ... }, bustest.Features{ConsumerGroups: true, Persistent: true})
//	}
//
// Every subtest opens its own Broker (open must fail or skip the test when it
// cannot), uses its own topic and groups, and closes the Broker at the end,
// checking that Close succeeds. Waiting is deadline-based (internal/wait),
// never a fixed sleep.
package bustest

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/internal/testsvc"
	"github.com/stele-dev/stele/internal/wait"
)

// Features says what the broker under test offers beyond the common
// contract.
type Features struct {
	// ConsumerGroups: every group receives every message, subscribers of
	// one group share them. False (GoChannel): every subscriber receives
	// every message.
	ConsumerGroups bool
	// Persistent: messages published while no subscriber of a group is
	// running are kept for it, once the group has been initialised
	// (SubscribeInitialize, or a subscription that has ended). False: a
	// message published while a topic has no subscriber is dropped.
	Persistent bool
	// Cleanup, when set, is called when a subtest ends (after its Broker was
	// closed) with the topic and the consumer groups it used, to delete what
	// the broker kept of them (queues, streams, keys).
	Cleanup func(t testing.TB, topic string, groups []string)
}

// Run runs the suite. open returns a new Broker of the kind under test; Run
// closes it.
func Run(t *testing.T, open func(t *testing.T) *broker.Broker, f Features) {
	s := suite{open: open, f: f}
	t.Run("RoundTrip", s.roundTrip)
	t.Run("Order", s.order)
	t.Run("Nack", s.nack)
	t.Run("Groups", s.groups)
	t.Run("Persistence", s.persistence)
	t.Run("Resume", s.resume)
	t.Run("Close", s.close)
}

type suite struct {
	open func(t *testing.T) *broker.Broker
	f    Features
}

// setup opens a Broker and names a topic and groups for the subtest, all
// cleaned up when it ends.
func (s suite) setup(t *testing.T, groups ...string) (*broker.Broker, string, []string) {
	t.Parallel()
	name := strings.ToLower(strings.ReplaceAll(t.Name(), "/", "."))
	name = name[strings.LastIndexByte(name, '.')+1:]
	topic := testsvc.Name("bustest." + name + ".") // dotted, as stele's topics are
	for i, g := range groups {
		groups[i] = testsvc.Name(g + "-")
	}
	b := s.open(t)
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Broker.Close: %v", err)
		}
		if s.f.Cleanup != nil {
			s.f.Cleanup(t, topic, groups)
		}
	})
	return b, topic, groups
}

func subscribe(t *testing.T, ctx context.Context, b *broker.Broker, group, topic string) <-chan *message.Message {
	t.Helper()
	sub, err := b.Subscriber(group)
	if err != nil {
		t.Fatalf("Subscriber(%q): %v", group, err)
	}
	ch, err := sub.Subscribe(ctx, topic)
	if err != nil {
		t.Fatalf("Subscribe(%q) in group %q: %v", topic, group, err)
	}
	return ch
}

func publish(t *testing.T, b *broker.Broker, topic string, msgs ...*message.Message) {
	t.Helper()
	if err := b.Publisher().Publish(topic, msgs...); err != nil {
		t.Fatalf("Publish(%q, %d messages): %v", topic, len(msgs), err)
	}
}

// collector reads a subscription's channel in the background, calling
// handle for each message (which acks or nacks it) and recording it.
type collector struct {
	mu     sync.Mutex
	got    []*message.Message // in arrival order, redeliveries included
	acked  map[string]int     // UUID → times acked
	closed chan struct{}      // the channel was closed
}

func collect(ch <-chan *message.Message, handle func(*message.Message) bool) *collector {
	c := &collector{acked: map[string]int{}, closed: make(chan struct{})}
	if handle == nil {
		handle = func(*message.Message) bool { return true }
	}
	go func() {
		defer close(c.closed)
		for m := range ch {
			c.mu.Lock()
			c.got = append(c.got, m)
			c.mu.Unlock()
			if handle(m) {
				m.Ack()
				c.mu.Lock()
				c.acked[m.UUID]++
				c.mu.Unlock()
			} else {
				m.Nack()
			}
		}
	}()
	return c
}

// ackedAll reports whether every UUID in ids was acked at least once.
func (c *collector) ackedAll(ids []string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, id := range ids {
		if c.acked[id] == 0 {
			return false
		}
	}
	return true
}

func (c *collector) received() []*message.Message {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.got)
}

func (c *collector) ackedSet() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.acked)
}

// waitClosed waits for the collector's channel to be closed.
func (c *collector) waitClosed(t *testing.T, what string) {
	t.Helper()
	wait.Until(t, what, func() bool {
		select {
		case <-c.closed:
			return true
		default:
			return false
		}
	})
}

func uuids(msgs []*message.Message) []string {
	ids := make([]string, len(msgs))
	for i, m := range msgs {
		ids[i] = m.UUID
	}
	return ids
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// sameMessage reports how got differs from want (UUID, payload, metadata),
// or "". Metadata entries an adapter adds with the "_watermill_" prefix (AMQP
// marks redeliveries) are allowed; a missing or changed entry is not.
func sameMessage(want, got *message.Message) string {
	if got.UUID != want.UUID {
		return fmt.Sprintf("UUID %q, want %q", got.UUID, want.UUID)
	}
	if !bytes.Equal(got.Payload, want.Payload) {
		return fmt.Sprintf("payload %q (%d bytes), want %q (%d bytes)", trim(got.Payload), len(got.Payload), trim(want.Payload), len(want.Payload))
	}
	for k, v := range want.Metadata {
		gv, ok := got.Metadata[k]
		if !ok {
			return fmt.Sprintf("metadata %q missing (all: %q)", k, got.Metadata)
		}
		if gv != v {
			return fmt.Sprintf("metadata %q = %q, want %q", k, gv, v)
		}
	}
	for k := range got.Metadata {
		if _, ok := want.Metadata[k]; !ok && !strings.HasPrefix(k, "_watermill_") {
			return fmt.Sprintf("metadata %q = %q added", k, got.Metadata[k])
		}
	}
	return ""
}

func trim(b []byte) []byte {
	if len(b) > 16 {
		return b[:16]
	}
	return b
}

// roundTrip: UUID, payload and metadata arrive unchanged.
func (s suite) roundTrip(t *testing.T) {
	b, topic, groups := s.setup(t, "rt")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := collect(subscribe(t, ctx, b, groups[0], topic), nil)

	md := message.Metadata{
		"traceparent":    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		"tracestate":     "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
		"correlation_id": watermill.NewUUID(),
		"causation_id":   watermill.NewUUID(),
		"event_type":     "orders.OrderPlaced",
		"stream_id":      "order-42",
		"stream_version": "7",
		"spaces":         "a value with  spaces inside",
		"unicode":        "Grüße, 世界 ✓ – ünïcødé",
		"Mixed-Case":     "Key-Case matters",
		"json":           `{"a":[1,2],"b":"c\"d"}`,
		// What a header-based transport would mangle.
		"empty":             "",
		"padded":            "  leading and trailing spaces\t ",
		"multi-line":        "line 1\nline 2\r\nline 3",
		"control":           "tab\tnul\x00bell\x07",
		"key with spaces":   "v",
		"k:v":               "a colon in the key",
		"Nats-Like-Key":     "a transport's reserved prefix",
		"":                  "the empty key",
		broker.PartitionKey: "order-42",
	}
	sent := []*message.Message{
		message.NewMessage(watermill.NewUUID(), []byte{0x00, 0xff, 0xfe, 'a', 0x80, 0xc3, 0x28, 0x00}), // not UTF-8, NUL bytes
		message.NewMessage(watermill.NewUUID(), []byte{}),                                              // empty
		message.NewMessage(watermill.NewUUID(), randomBytes(64<<10)),                                   // 64 KiB of random bytes
		message.NewMessage(watermill.NewUUID(), []byte(`{"order":"42","total":"9.99"}`)),
	}
	for _, m := range sent {
		m.Metadata = maps.Clone(md)
	}
	publish(t, b, topic, sent[0])
	publish(t, b, topic, sent[1:]...)

	wait.Until(t, "every message acked", func() bool { return c.ackedAll(uuids(sent)) })
	got := c.received()
	byID := map[string]*message.Message{}
	for _, m := range got {
		byID[m.UUID] = m
	}
	for i, want := range sent {
		m := byID[want.UUID]
		if m == nil {
			t.Fatalf("message %d (%s) not received; got UUIDs %q", i, want.UUID, uuids(got))
		}
		if d := sameMessage(want, m); d != "" {
			t.Errorf("message %d: %s", i, d)
		}
	}
	if len(got) != len(sent) {
		t.Errorf("received %d deliveries for %d messages", len(got), len(sent))
	}
}

// order: 1,000 messages, published one by one and in batches of various
// sizes, arrive at one subscriber in publish order, each acked once. They
// share a PartitionKey (Kafka keeps order per partition).
func (s suite) order(t *testing.T) {
	const n = 1000
	b, topic, groups := s.setup(t, "order")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := collect(subscribe(t, ctx, b, groups[0], topic), nil)

	sent := make([]*message.Message, n)
	for i := range sent {
		sent[i] = message.NewMessage(watermill.NewUUID(), []byte(strconv.Itoa(i)))
		sent[i].Metadata.Set("seq", strconv.Itoa(i))
		sent[i].Metadata.Set(broker.PartitionKey, "order-stream")
	}
	start := time.Now()
	sizes := []int{1, 1, 1, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 1, 7, 50, 100}
	for i, k := 0, 0; i < n; k++ {
		size := min(sizes[k%len(sizes)], n-i)
		publish(t, b, topic, sent[i:i+size]...)
		i += size
	}
	published := time.Since(start)
	wait.Until(t, "1,000 messages acked", func() bool { return c.ackedAll(uuids(sent)) })
	elapsed := time.Since(start)
	t.Logf("%d messages: published in %v, all acked after %v (%.0f msgs/s end to end)", n, published.Round(time.Millisecond), elapsed.Round(time.Millisecond), n/elapsed.Seconds())

	got := c.received()
	var seqs []int
	for _, m := range got {
		seq, err := strconv.Atoi(m.Metadata.Get("seq"))
		if err != nil {
			t.Fatalf("message %s has no seq metadata: %q", m.UUID, m.Metadata)
		}
		seqs = append(seqs, seq)
	}
	if len(seqs) != n {
		t.Errorf("received %d deliveries, want exactly %d (no redelivery without a nack)", len(seqs), n)
	}
	for i, seq := range seqs {
		if seq != i {
			t.Fatalf("delivery %d is message %d, want %d (first %d: %v)", i, seq, i, min(i+5, len(seqs)), seqs[:min(i+5, len(seqs))])
		}
	}
}

// nack: a message nacked twice comes back with the same UUID, payload and
// metadata and is then acked; the others are all acked too.
func (s suite) nack(t *testing.T) {
	b, topic, groups := s.setup(t, "nack")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()

	sent := make([]*message.Message, 5)
	for i := range sent {
		sent[i] = message.NewMessage(watermill.NewUUID(), []byte(fmt.Sprintf("message %d", i)))
		sent[i].Metadata.Set("n", strconv.Itoa(i))
		sent[i].Metadata.Set(broker.PartitionKey, "nack")
	}
	target := sent[2]
	var mu sync.Mutex
	deliveries := 0 // of target
	c := collect(subscribe(t, ctx, b, groups[0], topic), func(m *message.Message) bool {
		if m.UUID != target.UUID {
			return true
		}
		mu.Lock()
		defer mu.Unlock()
		deliveries++
		return deliveries > 2 // nack the first two deliveries
	})
	start := time.Now()
	publish(t, b, topic, sent...)

	wait.Until(t, "all 5 messages acked", func() bool { return c.ackedAll(uuids(sent)) })
	t.Logf("nacked twice, acked after %v", time.Since(start).Round(time.Millisecond))
	mu.Lock()
	if deliveries != 3 {
		t.Errorf("the nacked message was delivered %d times, want 3 (2 nacks, then the ack)", deliveries)
	}
	mu.Unlock()
	for _, m := range c.received() {
		if m.UUID == target.UUID {
			if d := sameMessage(target, m); d != "" {
				t.Errorf("redelivered message: %s", d)
			}
		}
	}
	for id, k := range c.ackedSet() {
		if k != 1 {
			t.Errorf("message %s acked %d times, want once", id, k)
		}
	}
}

// groups: with consumer groups, every group receives every message and two
// subscribers of one group together receive every message (each at least
// once). Without (GoChannel), every subscriber receives every message.
func (s suite) groups(t *testing.T) {
	const n = 100
	b, topic, groups := s.setup(t, "ga", "gb")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()

	a := collect(subscribe(t, ctx, b, groups[0], topic), nil)
	b1 := collect(subscribe(t, ctx, b, groups[1], topic), nil)
	b2 := collect(subscribe(t, ctx, b, groups[1], topic), nil)

	sent := make([]*message.Message, n)
	for i := range sent {
		sent[i] = message.NewMessage(watermill.NewUUID(), []byte(strconv.Itoa(i)))
		sent[i].Metadata.Set(broker.PartitionKey, "key-"+strconv.Itoa(i%10))
	}
	for i := 0; i < n; i += 10 {
		publish(t, b, topic, sent[i:i+10]...)
	}
	ids := uuids(sent)
	wait.Until(t, "group A acked every message", func() bool { return a.ackedAll(ids) })
	if !s.f.ConsumerGroups {
		wait.Until(t, "each subscriber of group B acked every message", func() bool { return b1.ackedAll(ids) && b2.ackedAll(ids) })
		return
	}
	wait.Until(t, "group B's two subscribers together acked every message", func() bool {
		s1, s2 := b1.ackedSet(), b2.ackedSet()
		for _, id := range ids {
			if s1[id] == 0 && s2[id] == 0 {
				return false
			}
		}
		return true
	})
	s1, s2 := b1.ackedSet(), b2.ackedSet()
	both := 0
	for _, id := range ids {
		if s1[id] > 0 && s2[id] > 0 {
			both++
		}
	}
	t.Logf("group B: subscriber 1 acked %d, subscriber 2 acked %d, %d by both", len(s1), len(s2), both)
}

// persistence: with Persistent, a group initialised with SubscribeInitialize,
// or by a subscription that has ended, receives what was published while
// none of its subscribers ran. Without, such messages are dropped.
func (s suite) persistence(t *testing.T) {
	const n = 20
	b, topic, groups := s.setup(t, "init", "ended")
	sent := make([]*message.Message, n)
	for i := range sent {
		sent[i] = message.NewMessage(watermill.NewUUID(), []byte(strconv.Itoa(i)))
		sent[i].Metadata.Set(broker.PartitionKey, "p")
	}

	if !s.f.Persistent {
		publish(t, b, topic, sent[:n-1]...) // no subscriber: dropped
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		c := collect(subscribe(t, ctx, b, groups[0], topic), nil)
		publish(t, b, topic, sent[n-1])
		wait.Until(t, "the message published after subscribing", func() bool { return c.ackedAll([]string{sent[n-1].UUID}) })
		if got := c.received(); len(got) != 1 {
			t.Errorf("received %d messages, want only the one published after subscribing (%q)", len(got), uuids(got))
		}
		return
	}

	// Group 1: SubscribeInitialize.
	sub, err := b.Subscriber(groups[0])
	if err != nil {
		t.Fatal(err)
	}
	init, ok := sub.(message.SubscribeInitializer)
	if !ok {
		t.Fatalf("%T does not implement message.SubscribeInitializer", sub)
	}
	if err := init.SubscribeInitialize(topic); err != nil {
		t.Fatalf("SubscribeInitialize: %v", err)
	}
	if err := sub.Close(); err != nil {
		t.Fatalf("closing the initialising subscriber: %v", err)
	}
	// Group 2: a subscription that ended before anything was published.
	ctx, cancel := context.WithCancel(t.Context())
	c := collect(subscribe(t, ctx, b, groups[1], topic), nil)
	cancel()
	c.waitClosed(t, "the first subscription of group 2 to close")

	publish(t, b, topic, sent[:n/2]...)
	publish(t, b, topic, sent[n/2:]...)

	ctx, cancel = context.WithCancel(t.Context())
	defer cancel()
	c1 := collect(subscribe(t, ctx, b, groups[0], topic), nil)
	c2 := collect(subscribe(t, ctx, b, groups[1], topic), nil)
	ids := uuids(sent)
	wait.Until(t, "both groups acked every message published while they had no subscriber", func() bool {
		return c1.ackedAll(ids) && c2.ackedAll(ids)
	})
	if got := c.received(); len(got) != 0 {
		t.Errorf("the ended subscription received %d messages", len(got))
	}
}

// resume: with Persistent, a group whose subscriber was closed after acking
// a first batch gets, on subscribing again, the messages published
// meanwhile (and the nacked sentinel) but none of the acked ones.
func (s suite) resume(t *testing.T) {
	if !s.f.Persistent {
		t.Skip("not persistent")
	}
	const n = 10
	b, topic, groups := s.setup(t, "resume")
	sent := make([]*message.Message, 2*n)
	for i := range sent {
		sent[i] = message.NewMessage(watermill.NewUUID(), []byte(strconv.Itoa(i)))
		sent[i].Metadata.Set(broker.PartitionKey, "r")
	}
	first, second := uuids(sent[:n]), uuids(sent[n:])

	sub, err := b.Subscriber(groups[0])
	if err != nil {
		t.Fatal(err)
	}
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	sentinel := message.NewMessage(watermill.NewUUID(), []byte("sentinel"))
	sentinel.Metadata.Set(broker.PartitionKey, "r")
	c := collect(ch, func(m *message.Message) bool { return m.UUID != sentinel.UUID }) // nack the sentinel
	publish(t, b, topic, sent[:n]...)
	wait.Until(t, "the first batch acked", func() bool { return c.ackedAll(first) })
	// The adapters send an ack to the broker before they hand out the next
	// message; an ack given right before Close may not have gone out (the
	// message is then delivered again: at least once). Receiving the
	// sentinel proves the first batch's acks went out.
	publish(t, b, topic, sentinel)
	wait.Until(t, "the sentinel delivered", func() bool {
		return slices.Contains(uuids(c.received()), sentinel.UUID)
	})
	if err := sub.Close(); err != nil {
		t.Fatalf("Subscriber.Close: %v", err)
	}
	c.waitClosed(t, "the first subscriber's channel to close")

	publish(t, b, topic, sent[n:]...)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c2 := collect(subscribe(t, ctx, b, groups[0], topic), nil)
	wait.Until(t, "the second batch acked after subscribing again", func() bool { return c2.ackedAll(second) })
	for _, m := range c2.received() {
		if slices.Contains(first, m.UUID) {
			t.Errorf("message %s (payload %q), acked before the subscriber closed, was delivered again", m.UUID, m.Payload)
		}
	}
}

// close: cancelling a subscription's context closes its channel, closing a
// subscriber closes its channels, Broker.Close returns, and nothing works
// after it.
func (s suite) close(t *testing.T) {
	b, topic, groups := s.setup(t, "cancel", "closed")

	// Cancel while messages are flowing and one is held un-acked.
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	held := make(chan *message.Message, 1)
	ch := subscribe(t, ctx, b, groups[0], topic)
	msgs := make([]*message.Message, 10)
	for i := range msgs {
		msgs[i] = message.NewMessage(watermill.NewUUID(), []byte(strconv.Itoa(i)))
		msgs[i].Metadata.Set(broker.PartitionKey, "c")
	}
	go func() {
		// GoChannel's Publish waits for the ack of the held message: it
		// returns once the subscription is cancelled. Errors do not matter.
		_ = b.Publisher().Publish(topic, msgs...)
	}()
	select {
	case m := <-ch:
		held <- m // neither acked nor nacked
	case <-time.After(wait.Timeout):
		t.Fatal("no message arrived")
	}
	cancel()
	c := collect(ch, func(*message.Message) bool { return false })
	c.waitClosed(t, "the channel to close after the context was cancelled")

	// Close the subscriber while its subscription is running.
	sub, err := b.Subscriber(groups[1])
	if err != nil {
		t.Fatal(err)
	}
	ch2, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	c2 := collect(ch2, nil)
	closed := make(chan error, 1)
	go func() { closed <- sub.Close() }()
	c2.waitClosed(t, "the channel to close after the subscriber was closed")
	var closeErr error
	wait.Until(t, "Subscriber.Close to return", func() bool {
		select {
		case closeErr = <-closed:
			return true
		default:
			return false
		}
	})
	if closeErr != nil {
		t.Errorf("Subscriber.Close: %v", closeErr)
	}
	if _, err := sub.Subscribe(t.Context(), topic); err == nil {
		t.Error("Subscribe on a closed subscriber succeeded")
	}

	done := make(chan error, 1)
	go func() { done <- b.Close() }()
	var err2 error
	wait.Until(t, "Broker.Close to return", func() bool {
		select {
		case err2 = <-done:
			return true
		default:
			return false
		}
	})
	if err2 != nil {
		t.Errorf("Broker.Close: %v", err2)
	}
	<-held // the held message's fate is the adapter's: redelivered to the group later
	if _, err := b.Subscriber("after-close"); err == nil {
		t.Error("Subscriber after Broker.Close succeeded")
	}
	if err := b.Publisher().Publish(topic, message.NewMessage(watermill.NewUUID(), nil)); err == nil {
		t.Error("Publish after Broker.Close succeeded")
	}
}
