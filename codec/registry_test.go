package codec_test

import (
	"bytes"
	"encoding/gob"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

func TestRegisterRefuses(t *testing.T) {
	type Other struct{ A int }
	type Fresh struct{ B int }
	cases := []struct {
		name     string
		register func(r *codec.Registry) error
	}{
		{"empty name", func(r *codec.Registry) error { return codec.Register[Fresh](r, "", 1) }},
		{"space in name", func(r *codec.Registry) error { return codec.Register[Fresh](r, "order placed", 1) }},
		{"control character", func(r *codec.Registry) error { return codec.Register[Fresh](r, "order\n", 1) }},
		{"invalid UTF-8", func(r *codec.Registry) error { return codec.Register[Fresh](r, "order\xff", 1) }},
		{"name too long", func(r *codec.Registry) error { return codec.Register[Fresh](r, strings.Repeat("x", 256), 1) }},
		{"version 0", func(r *codec.Registry) error { return codec.Register[Fresh](r, "fresh", 0) }},
		{"negative version", func(r *codec.Registry) error { return codec.Register[Fresh](r, "fresh", -2) }},
		{"name twice", func(r *codec.Registry) error { return codec.Register[Fresh](r, "order.placed", 1) }},
		{"type twice", func(r *codec.Registry) error { return codec.Register[OrderPlaced](r, "order.placed.again", 1) }},
		{"pointer type", func(r *codec.Registry) error { return codec.Register[*Fresh](r, "fresh", 1) }},
		{"interface type", func(r *codec.Registry) error { return codec.Register[any](r, "fresh", 1) }},
		{"renamed name", func(r *codec.Registry) error { return codec.Register[Fresh](r, "payment.taken", 1) }},
		{"version not above an upcaster", func(r *codec.Registry) error {
			must(r.Upcast("other", 2, func(b []byte) ([]byte, error) { return b, nil }))
			return codec.Register[Other](r, "other", 2)
		}},
		{"nil registry", func(*codec.Registry) error { return codec.Register[Fresh](nil, "fresh", 1) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.register(newTestRegistry())
			var re *codec.RegistrationError
			if !errors.Is(err, codec.ErrInvalidRegistration) || !errors.As(err, &re) {
				t.Fatalf("got %v, want a *RegistrationError over ErrInvalidRegistration", err)
			}
		})
	}
}

func TestRegisterAccepts(t *testing.T) {
	r := newTestRegistry()
	type Fresh struct{ B int }
	// Upcasters may come before their type: package init order is not ours.
	must(r.Upcast("fresh", 1, func(b []byte) ([]byte, error) { return b, nil }))
	if err := codec.Register[Fresh](r, "fresh", 2); err != nil {
		t.Fatal(err)
	}
	// Non-ASCII names are fine; they are stored as they are.
	if err := codec.Register[struct{ C int }](r, "commande.passée", 1); err != nil {
		t.Fatal(err)
	}
}

func TestMustRegisterPanics(t *testing.T) {
	defer func() {
		err, _ := recover().(error)
		if !errors.Is(err, codec.ErrInvalidRegistration) {
			t.Fatalf("recovered %v, want ErrInvalidRegistration", err)
		}
	}()
	codec.MustRegister[OrderPlaced](newTestRegistry(), "order.placed", 1)
	t.Fatal("MustRegister did not panic")
}

func TestUpcastAndRenameRefuse(t *testing.T) {
	nop := func(b []byte) ([]byte, error) { return b, nil }
	cases := []struct {
		name string
		call func(r *codec.Registry) error
	}{
		{"upcast empty name", func(r *codec.Registry) error { return r.Upcast("", 1, nop) }},
		{"upcast from 0", func(r *codec.Registry) error { return r.Upcast("x", 0, nop) }},
		{"upcast nil func", func(r *codec.Registry) error { return r.Upcast("x", 1, nil) }},
		{"upcast twice", func(r *codec.Registry) error { return r.Upcast("payment.received", 1, nop) }},
		{"upcast past current", func(r *codec.Registry) error { return r.Upcast("payment.received", 3, nop) }},
		{"upcast an old name", func(r *codec.Registry) error { return r.Upcast("payment.taken", 1, nop) }},
		{"rename to itself", func(r *codec.Registry) error { return r.Rename("a", "a") }},
		{"rename empty old", func(r *codec.Registry) error { return r.Rename("", "a") }},
		{"rename to invalid", func(r *codec.Registry) error { return r.Rename("a", "b c") }},
		{"rename a current name", func(r *codec.Registry) error { return r.Rename("order.placed", "order.created") }},
		{"rename twice", func(r *codec.Registry) error { return r.Rename("payment.taken", "order.placed") }},
		{"rename cycle", func(r *codec.Registry) error { return r.Rename("payment.received", "payment") }},
		{"rename a name with upcasters", func(r *codec.Registry) error {
			must(r.Upcast("legacy", 1, nop))
			return r.Rename("legacy", "order.placed")
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(newTestRegistry())
			var re *codec.RegistrationError
			if !errors.Is(err, codec.ErrInvalidRegistration) || !errors.As(err, &re) {
				t.Fatalf("got %v, want a *RegistrationError over ErrInvalidRegistration", err)
			}
		})
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	r := newTestRegistry()
	cases := []struct {
		name     string
		in       any
		want     any // what Decode returns: always the value
		wantType string
		wantCT   string
		wantData string
	}{
		{"value", OrderPlaced{SKU: "tea", Qty: 2}, OrderPlaced{SKU: "tea", Qty: 2},
			"order.placed", "application/json; v=1", `{"sku":"tea","qty":2}`},
		{"pointer", &OrderPlaced{SKU: "tea", Qty: 2, Tags: []string{"gift"}}, OrderPlaced{SKU: "tea", Qty: 2, Tags: []string{"gift"}},
			"order.placed", "application/json; v=1", `{"sku":"tea","qty":2,"tags":["gift"]}`},
		{"zero value", OrderPlaced{}, OrderPlaced{},
			"order.placed", "application/json; v=1", `{"sku":"","qty":0}`},
		{"current version is explicit", PaymentReceived{AmountCents: 1250, Currency: "USD"}, PaymentReceived{AmountCents: 1250, Currency: "USD"},
			"payment.received", "application/json; v=3", `{"amount_cents":1250,"currency":"USD"}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := r.Encode(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if d.Type != tc.wantType || d.ContentType != tc.wantCT || string(d.Data) != tc.wantData {
				t.Errorf("Encode = {Type %q, ContentType %q, Data %s}, want {%q, %q, %s}",
					d.Type, d.ContentType, d.Data, tc.wantType, tc.wantCT, tc.wantData)
			}
			if d.ID != (eventstore.EventData{}).ID || !d.Metadata.IsZero() {
				t.Errorf("Encode filled ID or Metadata: %+v", d)
			}
			got, err := r.Decode(stored(d))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Decode = %#v, want %#v", got, tc.want)
			}
			if name, ok := r.Name(tc.in); !ok || name != tc.wantType {
				t.Errorf("Name = %q, %v; want %q", name, ok, tc.wantType)
			}
		})
	}
}

// TestDecode covers what a store can hand back: current and old versions,
// renames, and every way decoding fails.
func TestDecode(t *testing.T) {
	r := newTestRegistry()
	euros := PaymentReceived{AmountCents: 1000, Currency: "EUR"}
	cases := []struct {
		name    string
		typ, ct string
		data    string
		want    any
		wantErr error
		wantAs  any // a pointer to an error type the chain must also hold
	}{
		{name: "current version", typ: "payment.received", ct: "application/json; v=3",
			data: `{"amount_cents":1000,"currency":"EUR"}`, want: euros},
		{name: "v1 through the chain", typ: "payment.received", ct: "application/json; v=1",
			data: `{"amount":10}`, want: euros},
		{name: "v2 through one step", typ: "payment.received", ct: "application/json; v=2",
			data: `{"amount":10,"currency":"GBP"}`, want: PaymentReceived{AmountCents: 1000, Currency: "GBP"}},
		{name: "no v= means v1", typ: "payment.received", ct: "application/json",
			data: `{"amount":10}`, want: euros},
		{name: "empty content type means v1", typ: "payment.received", ct: "",
			data: `{"amount":10}`, want: euros},
		{name: "content type is case-insensitive", typ: "payment.received", ct: "Application/JSON;V=2",
			data: `{"amount":10,"currency":"EUR"}`, want: euros},
		{name: "other parameters are ignored", typ: "payment.received", ct: `application/json; charset=utf-8; v="3"`,
			data: `{"amount_cents":1000,"currency":"EUR"}`, want: euros},
		{name: "renamed", typ: "payment.taken", ct: "application/json; v=1",
			data: `{"amount":10}`, want: euros},
		{name: "renamed twice", typ: "payment", ct: "application/json",
			data: `{"amount":10}`, want: euros},
		{name: "renamed at a later version", typ: "payment.taken", ct: "application/json; v=2",
			data: `{"amount":1,"currency":"EUR"}`, want: PaymentReceived{AmountCents: 100, Currency: "EUR"}},
		{name: "unknown fields are ignored", typ: "order.placed", ct: "application/json; v=1",
			data: `{"sku":"tea","qty":1,"gift_wrap":true}`, want: OrderPlaced{SKU: "tea", Qty: 1}},

		{name: "unknown type", typ: "order.teleported", ct: "application/json; v=1",
			data: `{}`, wantErr: codec.ErrUnknownType},
		{name: "renamed to an unregistered name", typ: "ghost", ct: "application/json",
			data: `{}`, wantErr: codec.ErrUnknownType},
		{name: "undecodable payload", typ: "order.placed", ct: "application/json; v=1",
			data: `{"sku":`, wantErr: codec.ErrUndecodable, wantAs: new(*json.SyntaxError)},
		{name: "payload of the wrong shape", typ: "order.placed", ct: "application/json; v=1",
			data: `{"qty":"two"}`, wantErr: codec.ErrUndecodable, wantAs: new(*json.UnmarshalTypeError)},
		{name: "upcaster refuses", typ: "payment.received", ct: "application/json; v=1",
			data: `null`, wantErr: codec.ErrUndecodable},
		{name: "upcaster refuses bad amount", typ: "payment.received", ct: "application/json; v=2",
			data: `{"amount":"ten"}`, wantErr: codec.ErrUndecodable, wantAs: new(*json.UnmarshalTypeError)},
		{name: "missing upcaster step", typ: "order.shipped", ct: "application/json; v=1",
			data: `{"carrier":"dhl"}`, wantErr: codec.ErrNoUpcaster},
		{name: "future version", typ: "payment.received", ct: "application/json; v=4",
			data: `{"amount_cents":1000,"currency":"EUR","fx":1.1}`, wantErr: codec.ErrFutureVersion},
		{name: "huge version", typ: "order.placed", ct: "application/json; v=9223372036854775807",
			data: `{}`, wantErr: codec.ErrFutureVersion},
		{name: "version overflows", typ: "order.placed", ct: "application/json; v=99999999999999999999",
			data: `{}`, wantErr: codec.ErrUndecodable},
		{name: "version 0", typ: "order.placed", ct: "application/json; v=0",
			data: `{}`, wantErr: codec.ErrUndecodable},
		{name: "negative version", typ: "order.placed", ct: "application/json; v=-1",
			data: `{}`, wantErr: codec.ErrUndecodable},
		{name: "version not a number", typ: "order.placed", ct: "application/json; v=two",
			data: `{}`, wantErr: codec.ErrUndecodable},
		{name: "empty version", typ: "order.placed", ct: `application/json; v=""`,
			data: `{}`, wantErr: codec.ErrUndecodable},
		{name: "malformed content type", typ: "order.placed", ct: "application/json; v=1; v=2",
			data: `{}`, wantErr: codec.ErrUndecodable},
		// Even when the bytes happen to parse as JSON: a payload of another
		// format must not decode into zero values.
		{name: "another codec's content type", typ: "order.placed", ct: "application/protobuf; v=1",
			data: `{"sku":"tea"}`, wantErr: codec.ErrUndecodable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := eventstore.Event{StreamID: "order-42", Version: 7, Type: tc.typ, ContentType: tc.ct, Data: []byte(tc.data)}
			got, err := r.Decode(e)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, tc.want) {
					t.Fatalf("Decode = %#v, want %#v", got, tc.want)
				}
				return
			}
			if got != nil {
				t.Errorf("Decode returned %#v with its error", got)
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Decode error %v, want %v", err, tc.wantErr)
			}
			var de *codec.DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("Decode error %T is not a *DecodeError", err)
			}
			if de.StreamID != "order-42" || de.Version != 7 || de.Type != tc.typ {
				t.Errorf("DecodeError names %q v%d %q", de.StreamID, de.Version, de.Type)
			}
			for _, part := range []string{`"order-42"`, "version 7", fmt.Sprintf("%q", tc.typ)} {
				if !strings.Contains(err.Error(), part) {
					t.Errorf("message %q does not name %s", err, part)
				}
			}
			if tc.wantAs != nil && !errors.As(err, tc.wantAs) {
				t.Errorf("Decode error %v does not hold a %T", err, tc.wantAs)
			}
		})
	}
}

func TestDecodeErrorMessage(t *testing.T) {
	_, err := newTestRegistry().Decode(eventstore.Event{StreamID: "order-42", Version: 3, Type: "order.shipped",
		ContentType: "application/json; v=1", Data: []byte(`{}`)})
	want := `codec: decoding stream "order-42" version 3, type "order.shipped" schema v1: ` +
		`missing upcaster: no step of "order.shipped" from v1 to v2`
	if err == nil || err.Error() != want {
		t.Fatalf("got  %v\nwant %s", err, want)
	}
	var de *codec.DecodeError
	if !errors.As(err, &de) || de.SchemaVersion != 1 {
		t.Fatalf("SchemaVersion not recorded: %#v", de)
	}
}

func TestEncodeRefuses(t *testing.T) {
	r := newTestRegistry()
	type Unregistered struct{}
	type WithChan struct{ C chan int }
	codec.MustRegister[WithChan](r, "with.chan", 1)
	for name, tc := range map[string]struct {
		v       any
		wantErr error
	}{
		"unregistered":            {Unregistered{}, codec.ErrNotRegistered},
		"pointer to unregistered": {&Unregistered{}, codec.ErrNotRegistered},
		"pointer to pointer":      {new(*OrderPlaced), codec.ErrNotRegistered},
		"nil":                     {nil, codec.ErrNotRegistered},
		"nil pointer":             {(*OrderPlaced)(nil), nil},
		"codec refuses":           {WithChan{}, nil},
	} {
		t.Run(name, func(t *testing.T) {
			d, err := r.Encode(tc.v)
			if err == nil {
				t.Fatalf("Encode(%#v) = %+v, want an error", tc.v, d)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("Encode error %v, want %v", err, tc.wantErr)
			}
			if _, ok := r.Name(tc.v); ok && tc.wantErr != nil {
				t.Errorf("Name found a name for %#v", tc.v)
			}
		})
	}
}

// An upcaster that edits its input in place must not change the event the
// store handed out.
func TestDecodeLeavesStoredDataAlone(t *testing.T) {
	r := codec.NewRegistry(nil)
	codec.MustRegister[OrderShipped](r, "order.shipped", 2)
	must(r.Upcast("order.shipped", 1, func(b []byte) ([]byte, error) {
		copy(b[bytes.Index(b, []byte("ups")):], "UPS")
		return b, nil
	}))
	e := eventstore.Event{Type: "order.shipped", ContentType: "application/json; v=1", Data: []byte(`{"carrier":"ups"}`)}
	got, err := r.Decode(e)
	if err != nil {
		t.Fatal(err)
	}
	if got != (OrderShipped{Carrier: "UPS"}) {
		t.Fatalf("Decode = %#v", got)
	}
	if string(e.Data) != `{"carrier":"ups"}` {
		t.Fatalf("stored data changed to %s", e.Data)
	}
}

// gobCodec shows that a non-JSON codec fits: the version rides on its own
// content type.
type gobCodec struct{}

func (gobCodec) ContentType() string { return "application/x-gob" }
func (gobCodec) Marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	err := gob.NewEncoder(&b).Encode(v)
	return b.Bytes(), err
}
func (gobCodec) Unmarshal(data []byte, v any) error {
	return gob.NewDecoder(bytes.NewReader(data)).Decode(v)
}

func TestOtherCodec(t *testing.T) {
	r := codec.NewRegistry(gobCodec{})
	codec.MustRegister[OrderPlaced](r, "order.placed", 2)
	d, err := r.Encode(OrderPlaced{SKU: "tea", Qty: 2})
	if err != nil {
		t.Fatal(err)
	}
	if d.ContentType != "application/x-gob; v=2" {
		t.Errorf("ContentType = %q", d.ContentType)
	}
	got, err := r.Decode(stored(d))
	if err != nil || !reflect.DeepEqual(got, OrderPlaced{SKU: "tea", Qty: 2}) {
		t.Fatalf("Decode = %#v, %v", got, err)
	}
	// A JSON event must not be fed to the gob decoder.
	_, err = r.Decode(eventstore.Event{Type: "order.placed", ContentType: "application/json; v=2", Data: []byte(`{}`)})
	if !errors.Is(err, codec.ErrUndecodable) {
		t.Fatalf("JSON event through gob: %v, want ErrUndecodable", err)
	}
}

// Readers share a Registry; run with -race.
func TestConcurrentUse(t *testing.T) {
	r := newTestRegistry()
	old := eventstore.Event{Type: "payment.taken", ContentType: "application/json; v=1", Data: []byte(`{"amount":3}`)}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Go(func() {
			for i := range 200 {
				in := OrderPlaced{SKU: "tea", Qty: g*1000 + i}
				d, err := r.Encode(&in)
				if err != nil {
					errs <- err
					return
				}
				got, err := r.Decode(stored(d))
				if err != nil || !reflect.DeepEqual(got, in) {
					errs <- fmt.Errorf("round trip of %+v: %#v, %v", in, got, err)
					return
				}
				got, err = r.Decode(old)
				if err != nil || got != (PaymentReceived{AmountCents: 300, Currency: "EUR"}) {
					errs <- fmt.Errorf("upcast: %#v, %v", got, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
