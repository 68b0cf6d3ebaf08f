package codec_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"

	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

// Test events. PaymentReceived has three schema versions:
//
//	v1 {"amount": 10}                          whole euros, no currency
//	v2 {"amount": 10, "currency": "EUR"}       currency added; v1 was always euros
//	v3 {"amount_cents": 1000, "currency": "EUR"} amount renamed and now in cents
type (
	OrderPlaced struct {
		SKU   string   `json:"sku"`
		Qty   int      `json:"qty"`
		Price float64  `json:"price,omitempty"`
		Tags  []string `json:"tags,omitempty"`
	}
	PaymentReceived struct {
		AmountCents int64  `json:"amount_cents"`
		Currency    string `json:"currency"`
	}
	OrderShipped struct {
		Carrier string `json:"carrier"`
	}
)

// jsonObject reads a payload that must be a JSON object. It refuses null:
// unmarshalling null into a map leaves it nil, and writing to it would panic.
func jsonObject(data []byte) (map[string]json.RawMessage, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, errors.New("payload is null, want an object")
	}
	return m, nil
}

// paymentV1toV2: v1 recorded no currency because every payment was in euros.
func paymentV1toV2(data []byte) ([]byte, error) {
	m, err := jsonObject(data)
	if err != nil {
		return nil, err
	}
	if _, ok := m["currency"]; !ok {
		m["currency"] = json.RawMessage(`"EUR"`)
	}
	return json.Marshal(m)
}

// paymentV2toV3: "amount" in whole units became "amount_cents".
func paymentV2toV3(data []byte) ([]byte, error) {
	m, err := jsonObject(data)
	if err != nil {
		return nil, err
	}
	raw, ok := m["amount"]
	if !ok {
		return nil, errors.New(`no "amount"`)
	}
	var units int64
	if err := json.Unmarshal(raw, &units); err != nil {
		return nil, fmt.Errorf("amount: %w", err)
	}
	if units > math.MaxInt64/100 || units < math.MinInt64/100 {
		return nil, fmt.Errorf("amount %d overflows in cents", units)
	}
	delete(m, "amount")
	m["amount_cents"] = json.RawMessage(strconv.FormatInt(units*100, 10))
	return json.Marshal(m)
}

// newTestRegistry registers the test events:
//   - "order.placed" v1;
//   - "payment.received" v3 with both upcasters; it was once called
//     "payment.taken", and before that "payment";
//   - "order.shipped" v3 with only the step from v2, so v1 has a gap.
func newTestRegistry() *codec.Registry {
	r := codec.NewRegistry(nil)
	codec.MustRegister[OrderPlaced](r, "order.placed", 1)
	codec.MustRegister[PaymentReceived](r, "payment.received", 3)
	codec.MustRegister[OrderShipped](r, "order.shipped", 3)
	must(r.Upcast("payment.received", 1, paymentV1toV2))
	must(r.Upcast("payment.received", 2, paymentV2toV3))
	must(r.Rename("payment.taken", "payment.received"))
	must(r.Rename("payment", "payment.taken"))
	must(r.Upcast("order.shipped", 2, func(b []byte) ([]byte, error) { return b, nil }))
	return r
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

// stored is what a store would hand back for d.
func stored(d eventstore.EventData) eventstore.Event {
	return eventstore.Event{StreamID: "order-42", Version: 7, Type: d.Type, Data: d.Data, ContentType: d.ContentType}
}
