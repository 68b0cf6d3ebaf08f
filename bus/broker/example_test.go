package broker_test

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/stele-dev/stele/bus/broker"
)

// Open the in-process bus, consume a topic with a Watermill router handler
// and publish to it. With another broker only the Config changes, e.g.
// broker.ParseURL("nats://127.0.0.1:4222").
func Example() {
	ctx := context.Background()
	b, err := broker.Open(ctx, broker.Config{
		Kind:   broker.GoChannel,
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		panic(err)
	}
	defer b.Close()

	sub, err := b.Subscriber("order-printer") // the consumer group (GoChannel has none)
	if err != nil {
		panic(err)
	}
	router, err := message.NewRouter(message.RouterConfig{}, watermill.NopLogger{})
	if err != nil {
		panic(err)
	}
	router.AddConsumerHandler("print-orders", "orders.events", sub, func(msg *message.Message) error {
		fmt.Printf("%s %s: %s\n", msg.Metadata.Get("event_type"), msg.Metadata.Get("stream_id"), msg.Payload)
		return nil // acks the message; an error would nack it
	})
	go func() { _ = router.Run(ctx) }()
	<-router.Running()

	for i, event := range []string{"OrderPlaced", "OrderPaid", "OrderShipped"} {
		msg := message.NewMessage(watermill.NewUUID(), fmt.Appendf(nil, `{"seq":%d}`, i+1))
		msg.Metadata.Set("event_type", event)
		msg.Metadata.Set("stream_id", "order-42")
		msg.Metadata.Set(broker.PartitionKey, "order-42") // Kafka: one stream, one partition
		// GoChannel returns once the handler has acked the message.
		if err := b.Publisher().Publish("orders.events", msg); err != nil {
			panic(err)
		}
	}
	if err := router.Close(); err != nil {
		panic(err)
	}
	// Output:
	// OrderPlaced order-42: {"seq":1}
	// OrderPaid order-42: {"seq":2}
	// OrderShipped order-42: {"seq":3}
}
