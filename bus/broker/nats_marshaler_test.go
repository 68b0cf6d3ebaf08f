package broker_test

import (
	"bytes"
	"maps"
	"net/http"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/nats-io/nats.go"

	"github.com/stele-dev/stele/bus/broker"
)

// TestNATSMarshaler checks, without a server, that plain metadata travels as
// plain headers (other NATS clients read traceparent as is) and the rest,
// including keys NATS would act on, travels encoded and comes back as it
// was, also after the headers went through NATS' wire encoding.
func TestNATSMarshaler(t *testing.T) {
	m := message.NewMessage("3f1c7b8e-0000-4000-8000-000000000001", []byte{0, 0xff})
	m.Metadata = message.Metadata{
		"traceparent":  "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		"unicode":      "Grüße ✓",
		"inner spaces": "x",
		"padded":       " x ",
		"lines":        "a\r\nb",
		"Nats-Rollup":  "all",
		"nats-ttl":     "1s",
		"":             "empty key",
		"latin1":       "\xe9t\xe9",
	}
	nm, err := broker.NATSMarshaler{}.Marshal("stele.events", m)
	if err != nil {
		t.Fatal(err)
	}
	if nm.Header.Get("traceparent") != m.Metadata["traceparent"] || nm.Header.Get("unicode") != "Grüße ✓" {
		t.Errorf("plain entries are not plain headers: %q", nm.Header)
	}
	for k := range nm.Header {
		if k == "Nats-Rollup" || k == "nats-ttl" || k == "padded" || k == "lines" {
			t.Errorf("header %q sent as is, NATS would change it or act on it", k)
		}
	}

	// Through the wire encoding, as a subscriber would get it.
	wire, err := nats.DecodeHeadersMsg(encodeHeaders(t, nm.Header))
	if err != nil {
		t.Fatal(err)
	}
	nm.Header = wire
	got, err := broker.NATSMarshaler{}.Unmarshal(nm)
	if err != nil {
		t.Fatal(err)
	}
	if got.UUID != m.UUID || string(got.Payload) != string(m.Payload) || !maps.Equal(got.Metadata, m.Metadata) {
		t.Errorf("round trip: %q %q %q, want %q %q %q", got.UUID, got.Payload, got.Metadata, m.UUID, m.Payload, m.Metadata)
	}

	m.UUID = "bad\r\nuuid"
	if _, err := (broker.NATSMarshaler{}).Marshal("t", m); err == nil {
		t.Error("a UUID with a line break was accepted")
	}
}

// encodeHeaders is NATS' header block for h, written the way nats.go
// writes it (Msg.headerBytes: a status line, then net/http's Header.Write).
func encodeHeaders(t *testing.T, h nats.Header) []byte {
	t.Helper()
	var b bytes.Buffer
	b.WriteString("NATS/1.0\r\n")
	if err := http.Header(h).Write(&b); err != nil {
		t.Fatal(err)
	}
	b.WriteString("\r\n")
	return b.Bytes()
}
