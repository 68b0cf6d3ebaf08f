package bus_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/internal/wait"
)

// responder runs a router consuming "commands" with handle, on ps.
func responder(t *testing.T, ps *gochannel.GoChannel, handle func(msg *message.Message) error) {
	t.Helper()
	r, _ := newRouter(t, bus.RouterConfig{Retry: fastRetry})
	r.AddConsumerHandler("responder", "commands", ps, handle)
	run(t, r)
}

func newRequester(t *testing.T, ps *gochannel.GoChannel) *bus.Requester {
	t.Helper()
	req, err := bus.NewRequester(ps, ps, "replies")
	if err != nil {
		t.Fatalf("NewRequester: %v", err)
	}
	t.Cleanup(func() {
		if err := req.Close(); err != nil {
			t.Errorf("closing requester: %v", err)
		}
	})
	return req
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// echo answers every command with its payload in upper case.
func echo(ps message.Publisher) func(msg *message.Message) error {
	return func(msg *message.Message) error {
		return bus.Reply(ps, msg, message.NewMessage("", []byte(strings.ToUpper(string(msg.Payload)))))
	}
}

func TestRequestGetsItsReply(t *testing.T) {
	ps := newPubSub(t)
	responder(t, ps, echo(ps))
	req := newRequester(t, ps)

	msg := message.NewMessage("req-1", []byte("ship order 42"))
	reply, err := req.Request(ctxTimeout(t, wait.Timeout), "commands", msg)
	if err != nil {
		t.Fatalf("Request: %v", err)
	}
	if string(reply.Payload) != "SHIP ORDER 42" {
		t.Errorf("reply = %q, want the responder's answer", reply.Payload)
	}
	if got := reply.Metadata.Get(bus.KeyCorrelationID); got != "req-1" {
		t.Errorf("reply correlation id = %q, want the request's UUID req-1 (it had none of its own)", got)
	}
	if got := reply.Metadata.Get(bus.KeyCausationID); got != "req-1" {
		t.Errorf("reply causation id = %q, want the request's UUID req-1", got)
	}
	if reply.UUID == "" || reply.UUID == "req-1" {
		t.Errorf("reply UUID = %q, want a new one", reply.UUID)
	}
}

func TestRequestKeepsItsOwnCorrelationID(t *testing.T) {
	ps := newPubSub(t)
	var gotReplyTo string
	responder(t, ps, func(msg *message.Message) error {
		gotReplyTo = msg.Metadata.Get(bus.KeyReplyTo)
		return bus.Reply(ps, msg, message.NewMessage("", nil))
	})
	req := newRequester(t, ps)

	msg := message.NewMessage("req-2", nil)
	msg.Metadata.Set(bus.KeyCorrelationID, "checkout-7")
	reply, err := req.Request(ctxTimeout(t, wait.Timeout), "commands", msg)
	if err != nil {
		t.Fatalf("Request: %v", err)
	}
	if got := reply.Metadata.Get(bus.KeyCorrelationID); got != "checkout-7" {
		t.Errorf("reply correlation id = %q, want the request's own checkout-7", got)
	}
	if got := reply.Metadata.Get(bus.KeyCausationID); got != "req-2" {
		t.Errorf("reply causation id = %q, want the request's UUID req-2", got)
	}
	if gotReplyTo != "replies" {
		t.Errorf("the responder saw reply_to %q, want the requester's topic", gotReplyTo)
	}
}

// Messages built as struct literals, without message.NewMessage, have no
// UUID and no metadata map; Request and Reply fill them in.
func TestRequestAndReplyWithBareMessages(t *testing.T) {
	ps := newPubSub(t)
	responder(t, ps, func(msg *message.Message) error {
		return bus.Reply(ps, msg, &message.Message{Payload: []byte("bare reply")})
	})
	req := newRequester(t, ps)

	msg := &message.Message{Payload: []byte("x")}
	reply, err := req.Request(ctxTimeout(t, wait.Timeout), "commands", msg)
	if err != nil {
		t.Fatalf("Request: %v", err)
	}
	if msg.UUID == "" || reply.Metadata.Get(bus.KeyCausationID) != msg.UUID || reply.Metadata.Get(bus.KeyCorrelationID) != msg.UUID {
		t.Errorf("request UUID %q, reply metadata %v: want a new UUID used as correlation and causation id", msg.UUID, reply.Metadata)
	}
	if string(reply.Payload) != "bare reply" || reply.UUID == "" {
		t.Errorf("reply = %s %q, want the bare reply with a UUID", reply.UUID, reply.Payload)
	}
}

func TestReplyErrorBecomesRemoteError(t *testing.T) {
	ps := newPubSub(t)
	responder(t, ps, func(msg *message.Message) error {
		return bus.ReplyError(ps, msg, errors.New("insufficient stock for sku-9"))
	})
	req := newRequester(t, ps)

	reply, err := req.Request(ctxTimeout(t, wait.Timeout), "commands", message.NewMessage("req-1", nil))
	var remote *bus.RemoteError
	if !errors.As(err, &remote) {
		t.Fatalf("err = %v (%T), want a *bus.RemoteError", err, err)
	}
	if remote.Message != "insufficient stock for sku-9" {
		t.Errorf("RemoteError.Message = %q, want the responder's error text", remote.Message)
	}
	if errors.Is(err, bus.ErrRequestTimeout) {
		t.Error("a remote failure must not look like a timeout")
	}
	if reply == nil || reply.Metadata.Get(bus.KeyCorrelationID) != "req-1" {
		t.Errorf("reply = %v, want the failure reply itself alongside the error", reply)
	}
}

func TestRequestWithoutResponderTimesOut(t *testing.T) {
	ps := newPubSub(t)
	req := newRequester(t, ps)

	const deadline = 100 * time.Millisecond
	start := time.Now()
	_, err := req.Request(ctxTimeout(t, deadline), "nobody-listens", message.NewMessage("req-1", nil))
	elapsed := time.Since(start)
	if !errors.Is(err, bus.ErrRequestTimeout) {
		t.Fatalf("err = %v, want one matching ErrRequestTimeout", err)
	}
	if elapsed < deadline-5*time.Millisecond || elapsed > deadline+5*time.Second {
		t.Errorf("Request returned after %v, want at the %v deadline", elapsed, deadline)
	}
	if !strings.Contains(err.Error(), "req-1") || !strings.Contains(err.Error(), "nobody-listens") {
		t.Errorf("error %q should name the request and the topic", err)
	}
}

func TestRequestCancelledIsNotATimeout(t *testing.T) {
	ps := newPubSub(t)
	req := newRequester(t, ps)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(20*time.Millisecond, cancel)
	_, err := req.Request(ctx, "nobody-listens", message.NewMessage("req-1", nil))
	if !errors.Is(err, context.Canceled) || errors.Is(err, bus.ErrRequestTimeout) {
		t.Fatalf("err = %v, want context.Canceled and not ErrRequestTimeout", err)
	}
}

func TestConcurrentRequestsGetTheirOwnReplies(t *testing.T) {
	ps := newPubSub(t)
	responder(t, ps, func(msg *message.Message) error {
		// Answer out of order: later requests may be answered first.
		time.Sleep(time.Duration(len(msg.Payload)%7) * time.Millisecond)
		return bus.Reply(ps, msg, message.NewMessage("", []byte("re: "+string(msg.Payload))))
	})
	req := newRequester(t, ps)

	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := fmt.Sprintf("request %d %s", i, strings.Repeat(".", i))
			reply, err := req.Request(ctxTimeout(t, wait.Timeout), "commands", message.NewMessage(fmt.Sprintf("req-%d", i), []byte(body)))
			switch {
			case err != nil:
				errs <- fmt.Errorf("request %d: %w", i, err)
			case string(reply.Payload) != "re: "+body:
				errs <- fmt.Errorf("request %d got reply %q, meant for another", i, reply.Payload)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestDuplicateCorrelationIDIsRefused(t *testing.T) {
	ps := newPubSub(t)
	holding, release := make(chan struct{}), make(chan struct{})
	responder(t, ps, func(msg *message.Message) error {
		if string(msg.Payload) == "first" {
			close(holding)
			<-release
		}
		return bus.Reply(ps, msg, message.NewMessage("", msg.Payload))
	})
	req := newRequester(t, ps)

	first := make(chan error, 1)
	go func() {
		msg := message.NewMessage("req-1", []byte("first"))
		msg.Metadata.Set(bus.KeyCorrelationID, "same")
		_, err := req.Request(ctxTimeout(t, wait.Timeout), "commands", msg)
		first <- err
	}()
	<-holding // the first request is registered before it is published
	msg := message.NewMessage("req-2", []byte("second"))
	msg.Metadata.Set(bus.KeyCorrelationID, "same")
	_, err := req.Request(ctxTimeout(t, 50*time.Millisecond), "commands", msg)
	if err == nil || errors.Is(err, bus.ErrRequestTimeout) || !strings.Contains(err.Error(), "already waiting") {
		t.Errorf("second request with the same correlation id: err = %v, want it refused", err)
	}
	close(release)
	if err := <-first; err != nil {
		t.Errorf("first request: %v", err)
	}
}

func TestLateReplyIsDropped(t *testing.T) {
	ps := newPubSub(t)
	timedOut := make(chan struct{})
	replied := make(chan error, 1)
	responder(t, ps, func(msg *message.Message) error {
		if string(msg.Payload) == "slow" {
			// Ack now, answer only after the caller gave up.
			go func() {
				<-timedOut
				replied <- bus.Reply(ps, msg, message.NewMessage("late-reply", []byte("too late")))
			}()
			return nil
		}
		return bus.Reply(ps, msg, message.NewMessage("", []byte("on time")))
	})
	req := newRequester(t, ps)

	_, err := req.Request(ctxTimeout(t, 50*time.Millisecond), "commands", message.NewMessage("req-slow", []byte("slow")))
	if !errors.Is(err, bus.ErrRequestTimeout) {
		t.Fatalf("slow request: err = %v, want ErrRequestTimeout", err)
	}
	close(timedOut)
	select {
	case err := <-replied:
		if err != nil {
			t.Fatalf("the late Reply failed: %v", err)
		}
	case <-time.After(wait.Timeout):
		t.Fatal("the late Reply blocked: the requester must drop replies nobody waits for")
	}

	reply, err := req.Request(ctxTimeout(t, wait.Timeout), "commands", message.NewMessage("req-next", []byte("next")))
	if err != nil {
		t.Fatalf("next request: %v", err)
	}
	if reply.UUID == "late-reply" || string(reply.Payload) != "on time" {
		t.Errorf("next request got %s %q, want its own reply, not the late one", reply.UUID, reply.Payload)
	}
}

func TestReplyToAMessageThatAskedForNone(t *testing.T) {
	ps := newPubSub(t)
	err := bus.Reply(ps, message.NewMessage("evt-1", nil), message.NewMessage("", nil))
	if err == nil || !bus.IsPermanent(err) {
		t.Fatalf("Reply to a message without reply_to = %v, want a permanent error (retrying will not add one)", err)
	}
}

func TestRequesterCloseReturns(t *testing.T) {
	ps := newPubSub(t)
	req, err := bus.NewRequester(ps, ps, "replies")
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- req.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(wait.Timeout):
		t.Fatal("Close did not return")
	}
	if err := req.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestNewRequesterOnAClosedSubscriber(t *testing.T) {
	ps := newPubSub(t)
	if err := ps.Close(); err != nil {
		t.Fatal(err)
	}
	if req, err := bus.NewRequester(ps, ps, "replies"); err == nil {
		_ = req.Close()
		t.Fatal("NewRequester on a closed subscriber succeeded")
	}
}
