package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// amqpPublishTimeout bounds one Publish call: the publishes and the wait for
// their confirms.
const amqpPublishTimeout = 30 * time.Second

// amqpPublisher publishes with publisher confirms like watermill-amqp's
// publisher (same exchange, same message format, so watermill-amqp's
// subscriber reads it), but sends all messages of a Publish call before
// waiting for their confirms, instead of waiting after each one. RabbitMQ
// confirms a batch in one go, which lifts a relay's batch from one confirm
// round trip per message to about one per batch.
type amqpPublisher struct {
	url       string
	config    amqp091.Config
	marshaler wamqp.DefaultMarshaler

	mu       sync.Mutex
	conn     *amqp091.Connection
	channels chan *amqp091.Channel // idle confirm-mode channels
	declared map[string]bool       // exchanges declared on this connection
	closed   bool
}

func newAMQPPublisher(url string, config amqp091.Config) (*amqpPublisher, error) {
	p := &amqpPublisher{url: url, config: config, channels: make(chan *amqp091.Channel, amqpChannels), declared: map[string]bool{}}
	if _, err := p.connection(); err != nil {
		return nil, err
	}
	return p, nil
}

// connection returns the open connection, dialling again after a loss.
func (p *amqpPublisher) connection() (*amqp091.Connection, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, ErrClosed
	}
	if p.conn != nil && !p.conn.IsClosed() {
		return p.conn, nil
	}
	conn, err := amqp091.DialConfig(p.url, p.config)
	if err != nil {
		return nil, err
	}
	p.conn, p.declared = conn, map[string]bool{}
	return conn, nil
}

// channel takes an idle channel of the current connection, or opens one in
// confirm mode.
func (p *amqpPublisher) channel() (*amqp091.Channel, error) {
	for {
		select {
		case ch := <-p.channels:
			if !ch.IsClosed() {
				return ch, nil
			}
			continue
		default:
		}
		conn, err := p.connection()
		if err != nil {
			return nil, err
		}
		ch, err := conn.Channel()
		if err != nil {
			return nil, err
		}
		if err := ch.Confirm(false); err != nil {
			_ = ch.Close()
			return nil, err
		}
		return ch, nil
	}
}

func (p *amqpPublisher) release(ch *amqp091.Channel, healthy bool) {
	if healthy && !ch.IsClosed() {
		select {
		case p.channels <- ch:
			return
		default:
		}
	}
	_ = ch.Close()
}

func (p *amqpPublisher) declare(ch *amqp091.Channel, topic string) error {
	p.mu.Lock()
	done := p.declared[topic]
	p.mu.Unlock()
	if done {
		return nil
	}
	// The durable fanout exchange watermill-amqp's pub/sub config declares.
	if err := ch.ExchangeDeclare(topic, "fanout", true, false, false, false, nil); err != nil {
		return err
	}
	p.mu.Lock()
	p.declared[topic] = true
	p.mu.Unlock()
	return nil
}

// Publish sends msgs to topic's exchange and returns once RabbitMQ has
// confirmed every one of them.
func (p *amqpPublisher) Publish(topic string, msgs ...*message.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), amqpPublishTimeout)
	defer cancel()
	ch, err := p.channel()
	if err != nil {
		return fmt.Errorf("amqp: publishing to %s: %w", topic, err)
	}
	healthy := false
	defer func() { p.release(ch, healthy) }()
	if err := p.declare(ch, topic); err != nil {
		return fmt.Errorf("amqp: declaring exchange %s: %w", topic, err)
	}
	confirms := make([]*amqp091.DeferredConfirmation, len(msgs))
	for i, m := range msgs {
		pub, err := p.marshaler.Marshal(m)
		if err != nil {
			return fmt.Errorf("amqp: message %s: %w", m.UUID, err)
		}
		if confirms[i], err = ch.PublishWithDeferredConfirmWithContext(ctx, topic, "", false, false, pub); err != nil {
			return fmt.Errorf("amqp: publishing %s to %s: %w", m.UUID, topic, err)
		}
	}
	for i, c := range confirms {
		acked, err := c.WaitContext(ctx)
		if err != nil {
			return fmt.Errorf("amqp: waiting for the confirm of %s: %w", msgs[i].UUID, err)
		}
		if !acked {
			return fmt.Errorf("amqp: RabbitMQ refused %s (nack)", msgs[i].UUID)
		}
	}
	healthy = true
	return nil
}

// Close closes the channels and the connection.
func (p *amqpPublisher) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	conn := p.conn
	p.mu.Unlock()
	for {
		select {
		case ch := <-p.channels:
			_ = ch.Close()
			continue
		default:
		}
		break
	}
	if conn == nil || conn.IsClosed() {
		return nil
	}
	if err := conn.Close(); err != nil && !errors.Is(err, amqp091.ErrClosed) {
		return err
	}
	return nil
}
