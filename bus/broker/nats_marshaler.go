package broker

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"

	wnats "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/nats"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/nats-io/nats.go"
)

// natsEncodedHeader carries the metadata entries that cannot travel as NATS
// headers as they are: a JSON array of [key, value] pairs, each a base64
// string (so any bytes survive).
const natsEncodedHeader = "Stele-Metadata"

// natsMarshaler is watermill-nats' NATSMarshaler (payload as the message
// data, the UUID in the "_watermill_message_uuid" header, each metadata entry
// a header, so other NATS clients can read traceparent and friends) made
// loss-free. NATS headers are written like HTTP headers: an entry whose key
// is not an HTTP token (a space, a colon, empty) is dropped, a value loses
// its leading and trailing spaces and has its line breaks turned into
// spaces, and a key starting with "Nats-" is an instruction to the server
// (Nats-Rollup purges the stream). Such entries travel encoded in the
// Stele-Metadata header instead, and come back unchanged.
type natsMarshaler struct{}

var (
	_ wnats.Marshaler   = natsMarshaler{}
	_ wnats.Unmarshaler = natsMarshaler{}
)

func (natsMarshaler) Marshal(topic string, msg *message.Message) (*nats.Msg, error) {
	if !natsHeaderValue(msg.UUID) {
		return nil, fmt.Errorf("message UUID %q cannot be a NATS header value", msg.UUID)
	}
	h := make(nats.Header, len(msg.Metadata)+1)
	h.Set(wnats.WatermillUUIDHdr, msg.UUID)
	var encoded [][2][]byte
	for k, v := range msg.Metadata {
		if natsHeaderKey(k) && natsHeaderValue(v) {
			h.Set(k, v)
		} else {
			encoded = append(encoded, [2][]byte{[]byte(k), []byte(v)})
		}
	}
	if len(encoded) > 0 {
		b, err := json.Marshal(encoded) // [][]byte → base64 strings
		if err != nil {
			return nil, err
		}
		h.Set(natsEncodedHeader, string(b))
	}
	return &nats.Msg{Subject: topic, Data: msg.Payload, Header: h}, nil
}

func (natsMarshaler) Unmarshal(m *nats.Msg) (*message.Message, error) {
	md := make(message.Metadata, len(m.Header))
	for k, vs := range m.Header {
		switch {
		case k == wnats.WatermillUUIDHdr || k == natsEncodedHeader:
		case len(k) >= 5 && strings.EqualFold(k[:5], "Nats-"): // set by nats.go or the server
		case len(vs) != 1:
			return nil, fmt.Errorf("NATS header %q has %d values", k, len(vs))
		default:
			md[k] = vs[0]
		}
	}
	if e := m.Header.Get(natsEncodedHeader); e != "" {
		var encoded [][2][]byte
		if err := json.Unmarshal([]byte(e), &encoded); err != nil {
			return nil, fmt.Errorf("NATS header %s: %w", natsEncodedHeader, err)
		}
		for _, kv := range encoded {
			md[string(kv[0])] = string(kv[1])
		}
	}
	msg := message.NewMessage(m.Header.Get(wnats.WatermillUUIDHdr), m.Data)
	msg.Metadata = md
	return msg, nil
}

// natsHeaderKey reports whether k travels as a NATS header key unchanged: an
// HTTP token, not one of the keys NATS or this marshaler use.
func natsHeaderKey(k string) bool {
	if k == "" || k == wnats.WatermillUUIDHdr || k == natsEncodedHeader ||
		(len(k) >= 5 && strings.EqualFold(k[:5], "Nats-")) {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// natsHeaderValue reports whether v travels as a NATS header value
// unchanged: valid UTF-8, no control characters but tab, no leading or
// trailing space or tab.
func natsHeaderValue(v string) bool {
	if !utf8.ValidString(v) {
		return false
	}
	if v != strings.Trim(v, " \t") {
		return false
	}
	for _, r := range v {
		if r < 0x20 && r != '\t' || r == 0x7f {
			return false
		}
	}
	return true
}
