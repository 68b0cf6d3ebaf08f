package codec_test

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

// Register an event type under a stable name, encode a value for the store,
// and decode what the store hands back.
func Example() {
	type OrderPlaced struct {
		SKU string `json:"sku"`
		Qty int    `json:"qty"`
	}
	reg := codec.NewRegistry(nil) // nil: JSON
	codec.MustRegister[OrderPlaced](reg, "order.placed", 1)

	data, err := reg.Encode(OrderPlaced{SKU: "tea", Qty: 2})
	if err != nil {
		panic(err)
	}
	fmt.Println(data.Type)
	fmt.Println(data.ContentType)
	fmt.Println(string(data.Data))

	// store.Append(ctx, "order-42", eventstore.NoStream, []eventstore.EventData{data}) ...
	// ... and later, reading it back:
	stored := eventstore.Event{StreamID: "order-42", Version: 1, Type: data.Type, ContentType: data.ContentType, Data: data.Data}
	v, err := reg.Decode(stored)
	if err != nil {
		panic(err)
	}
	placed := v.(OrderPlaced) // a value, not a pointer
	fmt.Printf("%+v\n", placed)
	// Output:
	// order.placed
	// application/json; v=1
	// {"sku":"tea","qty":2}
	// {SKU:tea Qty:2}
}

// An upcaster rewrites stored bytes one schema version up, so the Go type of
// the old shape can be deleted. Here v1 had no currency (it was always euros)
// and v2 adds one.
func ExampleRegistry_Upcast() {
	type PaymentReceived struct { // v2
		Amount   int    `json:"amount"`
		Currency string `json:"currency"`
	}
	reg := codec.NewRegistry(nil)
	codec.MustRegister[PaymentReceived](reg, "payment.received", 2)
	err := reg.Upcast("payment.received", 1, func(data []byte) ([]byte, error) {
		// RawMessage leaves the other fields' bytes as they were; a
		// map[string]any would turn large integers into float64.
		var m map[string]json.RawMessage
		if err := json.Unmarshal(data, &m); err != nil {
			return nil, err
		}
		if m == nil { // the payload was null
			return nil, errors.New("payload is not an object")
		}
		m["currency"] = json.RawMessage(`"EUR"`)
		return json.Marshal(m)
	})
	if err != nil {
		panic(err)
	}

	// Written years ago, before the currency existed.
	old := eventstore.Event{StreamID: "order-42", Version: 3, Type: "payment.received",
		ContentType: "application/json; v=1", Data: []byte(`{"amount":10}`)}
	v, err := reg.Decode(old)
	fmt.Printf("%+v %v\n", v, err)

	// Written by a newer program that knows a v3 this one does not.
	newer := old
	newer.ContentType = "application/json; v=3"
	_, err = reg.Decode(newer)
	fmt.Println(errors.Is(err, codec.ErrFutureVersion))
	fmt.Println(err)
	// Output:
	// {Amount:10 Currency:EUR} <nil>
	// true
	// codec: decoding stream "order-42" version 3, type "payment.received" schema v3: event schema version is newer than the registered one: "payment.received" is registered at v2
}

// Rename an event: events stored under the old name decode as the new one.
func ExampleRegistry_Rename() {
	type PaymentReceived struct {
		Amount int `json:"amount"`
	}
	reg := codec.NewRegistry(nil)
	codec.MustRegister[PaymentReceived](reg, "payment.received", 1)
	if err := reg.Rename("payment.taken", "payment.received"); err != nil {
		panic(err)
	}

	v, err := reg.Decode(eventstore.Event{Type: "payment.taken", ContentType: "application/json", Data: []byte(`{"amount":10}`)})
	fmt.Printf("%T %+v %v\n", v, v, err)
	// Output:
	// codec_test.PaymentReceived {Amount:10} <nil>
}
