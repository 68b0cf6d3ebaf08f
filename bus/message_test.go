package bus_test

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

// fullEvent has every field ToMessage carries set to a non-zero value.
func fullEvent() eventstore.Event {
	return eventstore.Event{
		StreamID:    "order-42",
		Version:     7,
		Position:    eventstore.Position{TxID: 1234567, GlobalPosition: 89},
		ID:          uuid.MustParse("0b6f4f0e-3f7a-4a37-9a0e-6c1f8f0c2a11"),
		Type:        "OrderPlaced",
		Data:        []byte(`{"total":12.5}`),
		ContentType: "application/json",
		Metadata: eventstore.Metadata{
			CorrelationID: "corr-1",
			CausationID:   "cause-1",
			TraceParent:   "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
			TraceState:    "vendor=opaque",
			Keys:          map[string]string{"tenant": "acme", "user": "u-9"},
		},
		// Not UTC, and with nanoseconds: the message must keep the instant.
		RecordedAt: time.Date(2025, 3, 4, 5, 6, 7, 123456789, time.FixedZone("CET", 3600)),
	}
}

func TestToMessageSetsEveryKey(t *testing.T) {
	e := fullEvent()
	msg := bus.ToMessage(e)
	if msg.UUID != e.ID.String() {
		t.Errorf("UUID = %q, want the event id %s", msg.UUID, e.ID)
	}
	if !bytes.Equal(msg.Payload, e.Data) {
		t.Errorf("payload = %q, want the stored data %q", msg.Payload, e.Data)
	}
	want := map[string]string{
		bus.KeyEventType:      "OrderPlaced",
		bus.KeyStreamID:       "order-42",
		bus.KeyPartition:      "order-42",
		bus.KeyStreamVersion:  "7",
		bus.KeyGlobalPosition: "89",
		bus.KeyTransactionID:  "1234567",
		bus.KeyPosition:       "1234567/89",
		bus.KeyContentType:    "application/json",
		bus.KeyRecordedAt:     "2025-03-04T04:06:07.123456789Z",
		bus.KeyCorrelationID:  "corr-1",
		bus.KeyCausationID:    "cause-1",
		bus.KeyTraceParent:    e.Metadata.TraceParent,
		bus.KeyTraceState:     "vendor=opaque",
		"x-tenant":            "acme",
		"x-user":              "u-9",
	}
	if got := map[string]string(msg.Metadata); !maps.Equal(got, want) {
		t.Errorf("metadata:\n got %v\nwant %v", got, want)
	}
}

func TestToMessageLeavesEmptyFieldsOut(t *testing.T) {
	e := eventstore.Event{StreamID: "s", Version: 1, ID: uuid.New(), Type: "T"}
	msg := bus.ToMessage(e)
	for _, k := range []string{bus.KeyContentType, bus.KeyRecordedAt, bus.KeyCorrelationID, bus.KeyCausationID, bus.KeyTraceParent, bus.KeyTraceState} {
		if v, ok := msg.Metadata[k]; ok {
			t.Errorf("metadata %s = %q, want it absent for an empty field", k, v)
		}
	}
	got, err := bus.FromMessage(msg)
	if err != nil {
		t.Fatalf("FromMessage: %v", err)
	}
	if !got.RecordedAt.IsZero() || got.ContentType != "" || !got.Metadata.IsZero() {
		t.Errorf("FromMessage invented fields: %+v", got)
	}
}

func TestMessageRoundTrip(t *testing.T) {
	e := fullEvent()
	msg := bus.ToMessage(e)

	// Through a copy, as every broker delivers one.
	got, err := bus.FromMessage(msg.Copy())
	if err != nil {
		t.Fatalf("FromMessage: %v", err)
	}
	if !got.RecordedAt.Equal(e.RecordedAt) {
		t.Errorf("RecordedAt = %v, want the instant %v", got.RecordedAt, e.RecordedAt)
	}
	got.RecordedAt, e.RecordedAt = time.Time{}, time.Time{}
	if !reflect.DeepEqual(got, e) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, e)
	}
}

func TestFromMessageIgnoresForeignKeys(t *testing.T) {
	msg := bus.ToMessage(fullEvent())
	msg.Metadata.Set("reason_poisoned", "boom") // added by the poison queue
	msg.Metadata.Set("_watermill_x", "y")
	got, err := bus.FromMessage(msg)
	if err != nil {
		t.Fatalf("FromMessage: %v", err)
	}
	want := map[string]string{"tenant": "acme", "user": "u-9"}
	if !maps.Equal(got.Metadata.Keys, want) {
		t.Errorf("Keys = %v, want only the x- keys %v", got.Metadata.Keys, want)
	}
}

func TestFromMessageMalformed(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*message.Message)
		wantKey string
	}{
		{"uuid missing", func(m *message.Message) { m.UUID = "" }, "uuid"},
		{"uuid not a uuid", func(m *message.Message) { m.UUID = "order-42/7" }, "uuid"},
		{"type missing", func(m *message.Message) { delete(m.Metadata, bus.KeyEventType) }, bus.KeyEventType},
		{"stream missing", func(m *message.Message) { delete(m.Metadata, bus.KeyStreamID) }, bus.KeyStreamID},
		{"version missing", func(m *message.Message) { delete(m.Metadata, bus.KeyStreamVersion) }, bus.KeyStreamVersion},
		{"version not a number", func(m *message.Message) { m.Metadata.Set(bus.KeyStreamVersion, "seven") }, bus.KeyStreamVersion},
		{"version zero", func(m *message.Message) { m.Metadata.Set(bus.KeyStreamVersion, "0") }, bus.KeyStreamVersion},
		{"version negative", func(m *message.Message) { m.Metadata.Set(bus.KeyStreamVersion, "-3") }, bus.KeyStreamVersion},
		{"position without slash", func(m *message.Message) { m.Metadata.Set(bus.KeyPosition, "89") }, bus.KeyPosition},
		{"position negative", func(m *message.Message) { m.Metadata.Set(bus.KeyPosition, "1/-1") }, bus.KeyPosition},
		{"position txid bad", func(m *message.Message) { m.Metadata.Set(bus.KeyPosition, "x/1") }, bus.KeyPosition},
		{"recorded_at not RFC 3339", func(m *message.Message) { m.Metadata.Set(bus.KeyRecordedAt, "04/03/2025") }, bus.KeyRecordedAt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg := bus.ToMessage(fullEvent())
			tt.mutate(msg)
			_, err := bus.FromMessage(msg)
			var me *bus.MessageError
			if !errors.As(err, &me) {
				t.Fatalf("err = %v (%T), want *bus.MessageError", err, err)
			}
			if me.Key != tt.wantKey {
				t.Errorf("Key = %q, want %q", me.Key, tt.wantKey)
			}
			if me.UUID != msg.UUID {
				t.Errorf("UUID = %q, want the message's %q", me.UUID, msg.UUID)
			}
			if me.Reason == "" || !strings.Contains(err.Error(), tt.wantKey) {
				t.Errorf("error %q should name the key and say why", err)
			}
			if !bus.IsPermanent(err) || !bus.IsPermanent(fmt.Errorf("handler: %w", err)) {
				t.Error("a malformed message must be permanent, even wrapped: retrying cannot fix it")
			}
		})
	}
}

func TestFromMessageWithoutMetadata(t *testing.T) {
	_, err := bus.FromMessage(&message.Message{UUID: uuid.NewString()})
	var me *bus.MessageError
	if !errors.As(err, &me) || me.Key != bus.KeyEventType {
		t.Fatalf("err = %v, want a *MessageError for %s", err, bus.KeyEventType)
	}
}

func TestStamp(t *testing.T) {
	e := fullEvent()
	t.Run("keeps the mapped message's own keys and UUID", func(t *testing.T) {
		msg := message.NewMessage("integration-1", []byte(`<order/>`))
		msg.Metadata.Set(bus.KeyEventType, "orders.v1.Placed")
		msg.Metadata.Set("x-tenant", "other")
		msg.Metadata.Set(bus.KeyContentType, "application/xml")
		bus.Stamp(msg, e)

		if msg.UUID != "integration-1" {
			t.Errorf("UUID = %q, want the mapped message's own", msg.UUID)
		}
		if string(msg.Payload) != `<order/>` {
			t.Errorf("payload changed to %q", msg.Payload)
		}
		want := bus.ToMessage(e).Metadata
		want[bus.KeyEventType] = "orders.v1.Placed"
		want["x-tenant"] = "other"
		want[bus.KeyContentType] = "application/xml"
		if !maps.Equal(msg.Metadata, want) {
			t.Errorf("metadata:\n got %v\nwant %v", msg.Metadata, want)
		}
	})
	t.Run("fills the rest but never content type", func(t *testing.T) {
		msg := &message.Message{Payload: []byte("x")} // no UUID, nil metadata
		bus.Stamp(msg, e)
		if msg.UUID != e.ID.String() {
			t.Errorf("UUID = %q, want the event id %s", msg.UUID, e.ID)
		}
		if v, ok := msg.Metadata[bus.KeyContentType]; ok {
			t.Errorf("content type %q copied from the event; the mapped payload has its own encoding", v)
		}
		for _, k := range []string{bus.KeyStreamID, bus.KeyPartition, bus.KeyStreamVersion, bus.KeyPosition, bus.KeyCorrelationID, bus.KeyTraceParent, "x-user"} {
			if got, want := msg.Metadata.Get(k), bus.ToMessage(e).Metadata.Get(k); got != want {
				t.Errorf("%s = %q, want %q", k, got, want)
			}
		}
	})
}

func TestIsPermanent(t *testing.T) {
	transient := errors.New("connection reset")
	tests := []struct {
		err  error
		want bool
	}{
		{nil, false},
		{transient, false},
		{bus.Permanent(transient), true},
		{fmt.Errorf("wrapped: %w", bus.Permanent(transient)), true},
		{&eventstore.ValidationError{Field: "stream id", Reason: "empty", Err: eventstore.ErrInvalidStreamID}, true},
		{fmt.Errorf("append: %w", &eventstore.ValidationError{Field: "f", Reason: "r", Err: eventstore.ErrInvalidStreamID}), true},
		{&codec.DecodeError{StreamID: "s", Version: 1, Type: "T", Err: transient}, true},
		{&bus.MessageError{UUID: "u", Key: "k", Reason: "r"}, true},
		{selfClassified(true), true},
		{selfClassified(false), false},
	}
	for _, tt := range tests {
		if got := bus.IsPermanent(tt.err); got != tt.want {
			t.Errorf("IsPermanent(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
	if bus.Permanent(nil) != nil {
		t.Error("Permanent(nil) != nil")
	}
	p := bus.Permanent(transient)
	if !errors.Is(p, transient) || !errors.Is(p, bus.ErrPermanent) || p.Error() != transient.Error() {
		t.Errorf("Permanent must wrap the error unchanged and match ErrPermanent: %v", p)
	}
}

type selfClassified bool

func (s selfClassified) Error() string   { return fmt.Sprintf("self-classified permanent=%v", bool(s)) }
func (s selfClassified) Permanent() bool { return bool(s) }

// FuzzFromMessage feeds FromMessage arbitrary messages: it must never panic,
// must return a *MessageError whenever it fails, and whatever it accepts
// must survive ToMessage and FromMessage again unchanged.
func FuzzFromMessage(f *testing.F) {
	seed := bus.ToMessage(fullEvent())
	md := seed.Metadata
	f.Add(seed.UUID, md[bus.KeyEventType], md[bus.KeyStreamID], md[bus.KeyStreamVersion], md[bus.KeyPosition], md[bus.KeyRecordedAt], "x-tenant", "acme", []byte(seed.Payload))
	f.Add("", "", "", "", "", "", "", "", []byte(nil))
	f.Add(uuid.NewString(), "T", "s", "+1", "0/0", "2006-01-02T15:04:05+07:00", "x-", "", []byte{0})
	f.Add("urn:uuid:"+uuid.NewString(), "T", "s", "9223372036854775807", "18446744073709551615/9223372036854775807", "", "x-x-", "\xff", []byte("{}"))
	f.Add(uuid.NewString(), "T", "s", "1", "/", "2006-01-02T15:04:05Z", "y", "z", []byte("{}"))
	// Accepted once, its UTC form (year 10000) could not be read back.
	f.Add(uuid.NewString(), "T", "s", "1", "1/1", "9999-12-31T23:59:59-01:00", "", "", []byte(nil))
	f.Add(uuid.NewString(), "T", "s", "1", "1/1", "0000-01-01T00:00:00+01:00", "", "", []byte(nil))
	f.Fuzz(func(t *testing.T, id, typ, stream, version, position, recordedAt, key, value string, payload []byte) {
		msg := message.NewMessage(id, payload)
		for k, v := range map[string]string{bus.KeyEventType: typ, bus.KeyStreamID: stream, bus.KeyStreamVersion: version,
			bus.KeyPosition: position, bus.KeyRecordedAt: recordedAt} {
			if v != "" {
				msg.Metadata.Set(k, v)
			}
		}
		msg.Metadata.Set(key, value)

		e, err := bus.FromMessage(msg)
		if err != nil {
			var me *bus.MessageError
			if !errors.As(err, &me) || !bus.IsPermanent(err) {
				t.Fatalf("err = %v (%T), want a permanent *MessageError", err, err)
			}
			return
		}
		again, err := bus.FromMessage(bus.ToMessage(e))
		if err != nil {
			t.Fatalf("FromMessage accepted %v but not ToMessage of its result: %v", msg.Metadata, err)
		}
		if !again.RecordedAt.Equal(e.RecordedAt) || !bytes.Equal(again.Data, e.Data) {
			t.Fatalf("second round trip changed time or data: %v / %v", again.RecordedAt, e.RecordedAt)
		}
		again.RecordedAt, e.RecordedAt, again.Data, e.Data = time.Time{}, time.Time{}, nil, nil
		if !reflect.DeepEqual(again, e) {
			t.Fatalf("second round trip:\n got %+v\nwant %+v", again, e)
		}
	})
}

func TestFromMessageRefusesTimesToMessageCannotWrite(t *testing.T) {
	for _, at := range []string{"9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00+01:00"} {
		msg := bus.ToMessage(fullEvent())
		msg.Metadata.Set(bus.KeyRecordedAt, at)
		_, err := bus.FromMessage(msg)
		var me *bus.MessageError
		if !errors.As(err, &me) || me.Key != bus.KeyRecordedAt {
			t.Errorf("recorded_at %s: err = %v, want a *MessageError for %s (in UTC it leaves years 0000-9999)", at, err, bus.KeyRecordedAt)
		}
	}
}
