package codec_test

import (
	"bytes"
	"errors"
	"strconv"
	"testing"

	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

// FuzzDecode: whatever a store hands back (any type name, content type and
// payload), Decode never panics; it either fails with a *DecodeError that
// matches exactly one sentinel, or returns a registered type whose encoding
// decodes and encodes to the same bytes.
func FuzzDecode(f *testing.F) {
	f.Add("order.placed", "application/json; v=1", []byte(`{"sku":"tea","qty":2,"price":1.5,"tags":["a"]}`))
	f.Add("payment", "application/json", []byte(`{"amount":10}`))
	f.Add("payment.taken", "application/json; v=2", []byte(`{"amount":-3,"currency":"GBP"}`))
	f.Add("payment.received", "application/json; v=3", []byte(`{"amount_cents":1,"currency":"EUR"}`))
	f.Add("order.shipped", "application/json; v=1", []byte(`{"carrier":"ups"}`))
	f.Add("order.shipped", "application/json; v=2", []byte(`null`))
	f.Add("order.placed", "application/json; v=4", []byte(`{}`))
	f.Add("order.placed", "application/json; v=0", []byte(`{}`))
	f.Add("order.placed", "text/plain; v=1", []byte(`{}`))
	f.Add("order.placed", "application/json; v*=utf-8''%32", []byte(`{}`))
	f.Add("", "", []byte(nil))
	f.Add("ghost", ";;;", []byte{0xff, 0x00})

	r := newTestRegistry()
	sentinels := []error{codec.ErrUnknownType, codec.ErrUndecodable, codec.ErrNoUpcaster, codec.ErrFutureVersion}
	f.Fuzz(func(t *testing.T, typ, contentType string, data []byte) {
		e := eventstore.Event{StreamID: "s-1", Version: 4, Type: typ, ContentType: contentType, Data: data}
		v, err := r.Decode(e)
		if err != nil {
			var de *codec.DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("error %T is not a *DecodeError: %v", err, err)
			}
			if de.StreamID != "s-1" || de.Version != 4 || de.Type != typ {
				t.Fatalf("DecodeError names the wrong event: %#v", de)
			}
			matched := 0
			for _, s := range sentinels {
				if errors.Is(err, s) {
					matched++
				}
			}
			if matched != 1 {
				t.Fatalf("error matches %d sentinels: %v", matched, err)
			}
			if v != nil {
				t.Fatalf("Decode returned %#v with its error", v)
			}
			return
		}
		name, ok := r.Name(v)
		if !ok {
			t.Fatalf("Decode returned an unregistered %T", v)
		}
		d, err := r.Encode(v)
		if err != nil {
			t.Fatalf("decoded %#v does not encode: %v", v, err)
		}
		if d.Type != name {
			t.Fatalf("encoded as %q, want %q", d.Type, name)
		}
		// Compare encodings, not values: omitempty turns an empty slice
		// into nil, and both mean the same event.
		back, err := r.Decode(stored(d))
		if err != nil {
			t.Fatalf("re-decoding %#v: %v", v, err)
		}
		d2, err := r.Encode(back)
		if err != nil || d2.Type != d.Type || d2.ContentType != d.ContentType || !bytes.Equal(d2.Data, d.Data) {
			t.Fatalf("encoding is not stable: %s %s then %s %s (%v)", d.ContentType, d.Data, d2.ContentType, d2.Data, err)
		}
	})
}

// FuzzUpcastChain: any payload stored at any version of payment.received goes
// through the v1 → v2 → v3 chain without a panic. It either decodes to a
// PaymentReceived, or fails with ErrUndecodable. A payload that decodes once
// is stable: upcasting is done, so encoding and decoding again change nothing.
func FuzzUpcastChain(f *testing.F) {
	f.Add([]byte(`{"amount":10}`), uint8(1))
	f.Add([]byte(`{"amount":10,"currency":"GBP"}`), uint8(2))
	f.Add([]byte(`{"amount":92233720368547758}`), uint8(1))
	f.Add([]byte(`{"amount":1e3}`), uint8(2))
	f.Add([]byte(`{"amount":null,"amount_cents":7}`), uint8(1))
	f.Add([]byte(`{"amount_cents":5,"currency":"EUR"}`), uint8(3))
	f.Add([]byte(`null`), uint8(1))
	f.Add([]byte(`[1,2]`), uint8(2))
	f.Add([]byte(`"x"`), uint8(0))
	f.Add([]byte(`{"amount":1,"amount":2}`), uint8(1))

	r := newTestRegistry()
	f.Fuzz(func(t *testing.T, data []byte, version uint8) {
		ct := "application/json" // version 0: no v=, which means v1
		if v := version % 4; v > 0 {
			ct += "; v=" + strconv.Itoa(int(v))
		}
		orig := string(data)
		v, err := r.Decode(eventstore.Event{StreamID: "payment-1", Version: 1, Type: "payment.received", ContentType: ct, Data: data})
		if string(data) != orig {
			t.Fatalf("the chain changed the stored bytes")
		}
		if err != nil {
			var de *codec.DecodeError
			if !errors.As(err, &de) || !errors.Is(err, codec.ErrUndecodable) {
				t.Fatalf("error is not a *DecodeError over ErrUndecodable: %v", err)
			}
			return
		}
		p, ok := v.(PaymentReceived)
		if !ok {
			t.Fatalf("decoded a %T", v)
		}
		d, err := r.Encode(p)
		if err != nil {
			t.Fatal(err)
		}
		again, err := r.Decode(stored(d))
		if err != nil || again != p {
			t.Fatalf("re-decoding %+v gave %#v, %v", p, again, err)
		}
	})
}
