package bus

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
)

// Requester sends commands and waits for their replies. Each request gets a
// correlation id (the message's own, or its UUID); the responder copies it
// onto its reply with Reply, and the reply is routed back to the caller that
// waits for it. The reply topic is the requester's own: give each process
// its own (for example "orders.replies."+hostname), or replies meant for one
// process are consumed by another.
type Requester struct {
	pub        message.Publisher
	replyTopic string
	cancel     context.CancelFunc
	done       chan struct{}

	mu      sync.Mutex
	waiting map[string]chan *message.Message
}

// ErrRequestTimeout is matched by errors.Is when no reply came in time.
var ErrRequestTimeout = errors.New("bus: no reply before the deadline")

// RemoteError is the error a responder sent back with ReplyError.
// Permanent is true when that error was permanent (see IsPermanent); the
// error Request returns then also matches ErrPermanent.
type RemoteError struct {
	Message   string
	Permanent bool
}

func (e *RemoteError) Error() string { return "bus: the responder failed: " + e.Message }

// NewRequester subscribes to replyTopic through sub and returns a requester
// that publishes through pub. Close it to stop listening.
func NewRequester(pub message.Publisher, sub message.Subscriber, replyTopic string) (*Requester, error) {
	ctx, cancel := context.WithCancel(context.Background())
	replies, err := sub.Subscribe(ctx, replyTopic)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("bus: subscribing to replies on %s: %w", replyTopic, err)
	}
	r := &Requester{pub: pub, replyTopic: replyTopic, cancel: cancel, done: make(chan struct{}),
		waiting: map[string]chan *message.Message{}}
	go r.route(replies)
	return r, nil
}

func (r *Requester) route(replies <-chan *message.Message) {
	defer close(r.done)
	for msg := range replies {
		id := msg.Metadata.Get(KeyCorrelationID)
		r.mu.Lock()
		ch := r.waiting[id]
		delete(r.waiting, id)
		r.mu.Unlock()
		if ch != nil {
			ch <- msg // buffered: never blocks
		}
		msg.Ack() // a late reply, after its caller gave up, is dropped
	}
}

// Request publishes msg to topic and waits for its reply until ctx ends.
// Give ctx a deadline: that is the request's timeout, and the error then
// matches ErrRequestTimeout. A reply sent with ReplyError comes back as a
// *RemoteError.
func (r *Requester) Request(ctx context.Context, topic string, msg *message.Message) (*message.Message, error) {
	if msg.UUID == "" {
		msg.UUID = uuid.NewString()
	}
	if msg.Metadata == nil {
		msg.Metadata = message.Metadata{} // a struct literal; Set would panic
	}
	id := msg.Metadata.Get(KeyCorrelationID)
	if id == "" {
		id = msg.UUID
		msg.Metadata.Set(KeyCorrelationID, id)
	}
	msg.Metadata.Set(KeyReplyTo, r.replyTopic)
	ch := make(chan *message.Message, 1)
	r.mu.Lock()
	if _, dup := r.waiting[id]; dup {
		r.mu.Unlock()
		return nil, fmt.Errorf("bus: a request with correlation id %s is already waiting", id)
	}
	r.waiting[id] = ch
	r.mu.Unlock()
	forget := func() {
		r.mu.Lock()
		delete(r.waiting, id)
		r.mu.Unlock()
	}
	if err := r.pub.Publish(topic, msg); err != nil {
		forget()
		return nil, fmt.Errorf("bus: sending request to %s: %w", topic, err)
	}
	select {
	case reply := <-ch:
		if e := reply.Metadata.Get(KeyError); e != "" {
			return reply, ReplyErr(reply)
		}
		return reply, nil
	case <-ctx.Done():
		forget()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("bus: request %s to %s: %w", id, topic, ErrRequestTimeout)
		}
		return nil, ctx.Err()
	}
}

// Close stops listening for replies; waiting requests run into their deadline.
func (r *Requester) Close() error {
	r.cancel()
	<-r.done
	return nil
}

// Reply publishes reply to the topic req asked for, tagged with req's
// correlation id and caused by req.
func Reply(pub message.Publisher, req, reply *message.Message) error {
	to := req.Metadata.Get(KeyReplyTo)
	if to == "" {
		return Permanent(fmt.Errorf("bus: message %s asks for no reply (no %s)", req.UUID, KeyReplyTo))
	}
	if reply.UUID == "" {
		reply.UUID = uuid.NewString()
	}
	if reply.Metadata == nil {
		reply.Metadata = message.Metadata{}
	}
	reply.Metadata.Set(KeyCorrelationID, req.Metadata.Get(KeyCorrelationID))
	reply.Metadata.Set(KeyCausationID, req.UUID)
	// The reply is published in the request's context (which holds the
	// handler's span when it is traced), so it continues the request's trace.
	if reply.Context() == context.Background() {
		reply.SetContext(req.Context())
	}
	return pub.Publish(to, reply)
}

// ReplyError answers req with a failure; the requester gets a *RemoteError.
func ReplyError(pub message.Publisher, req *message.Message, failure error) error {
	reply := message.NewMessage(uuid.NewString(), nil)
	reply.Metadata.Set(KeyError, failure.Error())
	if IsPermanent(failure) {
		reply.Metadata.Set(KeyErrorPermanent, "true")
	}
	return Reply(pub, req, reply)
}

// ReplyErr returns the *RemoteError a reply carries, or nil for a success.
func ReplyErr(reply *message.Message) error {
	e := reply.Metadata.Get(KeyError)
	if e == "" {
		return nil
	}
	rerr := &RemoteError{Message: e, Permanent: reply.Metadata.Get(KeyErrorPermanent) == "true"}
	if rerr.Permanent {
		return Permanent(rerr)
	}
	return rerr
}
