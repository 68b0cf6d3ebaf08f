package bus_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"github.com/stele-dev/stele/bus"
)

// A handler that cannot cope with a message marks its error permanent: the
// router does not retry it but moves the message to the poison box and goes
// on with the next one.
func ExampleNewRouter() {
	// In-process bus; Publish returns once the message was handled.
	pubsub := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, watermill.NopLogger{})
	defer pubsub.Close()

	router, poison, err := bus.NewRouter(bus.RouterConfig{
		Retry:  bus.RetryPolicy{MaxRetries: 3, Initial: 10 * time.Millisecond},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		panic(err)
	}
	router.AddConsumerHandler("billing", "orders", pubsub, func(msg *message.Message) error {
		if string(msg.Payload) != `{"currency":"EUR"}` {
			return bus.Permanent(errors.New("unsupported currency"))
		}
		fmt.Println("billed", msg.UUID)
		return nil
	})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		_ = router.Run(context.Background())
	}()
	<-router.Running()

	_ = pubsub.Publish("orders", message.NewMessage("order-1", []byte(`{"currency":"XYZ"}`)))
	_ = pubsub.Publish("orders", message.NewMessage("order-2", []byte(`{"currency":"EUR"}`)))

	pending, _ := poison.List(context.Background(), true, 10)
	for _, p := range pending {
		fmt.Printf("poisoned %s from %s by %s: %s\n", p.UUID, p.Topic, p.Handler, p.Reason)
	}

	_ = router.Close()
	<-stopped
	// Output:
	// billed order-2
	// poisoned order-1 from orders by billing: unsupported currency
}

// A requester sends a command and waits for the reply, which a handler on
// the other side sends with bus.Reply.
func ExampleRequester() {
	pubsub := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, watermill.NopLogger{})
	defer pubsub.Close()

	router, _, err := bus.NewRouter(bus.RouterConfig{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		panic(err)
	}
	router.AddConsumerHandler("stock", "stock.commands", pubsub, func(msg *message.Message) error {
		if string(msg.Payload) == "reserve sku-404" {
			return bus.ReplyError(pubsub, msg, errors.New("unknown sku"))
		}
		return bus.Reply(pubsub, msg, message.NewMessage("", []byte("reserved")))
	})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		_ = router.Run(context.Background())
	}()
	<-router.Running()

	requester, err := bus.NewRequester(pubsub, pubsub, "stock.replies.example")
	if err != nil {
		panic(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := requester.Request(ctx, "stock.commands", message.NewMessage("cmd-1", []byte("reserve sku-1")))
	if err != nil {
		panic(err)
	}
	fmt.Printf("%s (correlation %s, caused by %s)\n", reply.Payload,
		reply.Metadata.Get(bus.KeyCorrelationID), reply.Metadata.Get(bus.KeyCausationID))

	_, err = requester.Request(ctx, "stock.commands", message.NewMessage("cmd-2", []byte("reserve sku-404")))
	var remote *bus.RemoteError
	fmt.Println(errors.As(err, &remote), err)

	_ = requester.Close()
	_ = router.Close()
	<-stopped
	// Output:
	// reserved (correlation cmd-1, caused by cmd-1)
	// true bus: the responder failed: unknown sku
}
