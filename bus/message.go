// Package bus connects stele to a Watermill message bus: it turns stored
// events into messages and back, names topics, and builds the router stele's
// consumers run on (recover, retry with backoff, poison queue). It also holds
// the poison box, where messages a handler gave up on wait to be inspected and
// re-published, and request-reply over any publisher and subscriber.
//
// The broker itself is chosen in package bus/broker; this package depends on
// Watermill's message package only, so every adapter plugs in unchanged.
package bus

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

// Metadata keys stele sets on every message it publishes for an event. The
// message's UUID is the event id.
const (
	KeyEventType     = "event_type"
	KeyStreamID      = "stream_id"
	KeyStreamVersion = "stream_version"
	// KeyGlobalPosition and KeyTransactionID together are the event's
	// eventstore.Position; KeyPosition carries both as "txid/position".
	KeyGlobalPosition = "global_position"
	KeyTransactionID  = "transaction_id"
	KeyPosition       = "position"
	KeyContentType    = "content_type"
	KeyRecordedAt     = "recorded_at" // RFC 3339, nanoseconds
	KeyCorrelationID  = "correlation_id"
	KeyCausationID    = "causation_id"
	KeyTraceParent    = "traceparent"
	KeyTraceState     = "tracestate"
	// KeyPartition is the ordering key: the stream id. Brokers that
	// partition (Kafka) route on it, so one stream's messages stay in order.
	KeyPartition = "partition_key"
	// KeyReplyTo and KeyError are used by request-reply.
	KeyReplyTo        = "reply_to"
	KeyError          = "error"
	KeyErrorPermanent = "error_permanent"
	// KeyIdempotency carries a command's idempotency key: the receiver
	// treats a repeated key as the same command (sagas set it).
	KeyIdempotency = "idempotency_key"
	// KeyDeadline carries when a command's attempt times out (RFC 3339,
	// UTC): past it, the sender treats the attempt as failed and may undo
	// it, so a receiver should refuse the command (sagas set it).
	KeyDeadline = "deadline"
)

// UserKeyPrefix is put before the event's own metadata keys
// (eventstore.Metadata.Keys) on the message, so they can never collide with
// the keys above: key "tenant" travels as "x-tenant".
const UserKeyPrefix = "x-"

// ToMessage makes the message stele publishes for a stored event: the payload
// is the event's data as stored (already encoded by its codec), the UUID is
// the event id, and the metadata says what the event is and where it sits.
func ToMessage(e eventstore.Event) *message.Message {
	msg := message.NewMessage(e.ID.String(), e.Data)
	md := msg.Metadata
	md[KeyEventType] = e.Type
	md[KeyStreamID] = e.StreamID
	md[KeyPartition] = e.StreamID
	md[KeyStreamVersion] = strconv.FormatInt(int64(e.Version), 10)
	md[KeyGlobalPosition] = strconv.FormatInt(e.Position.GlobalPosition, 10)
	md[KeyTransactionID] = strconv.FormatUint(e.Position.TxID, 10)
	md[KeyPosition] = e.Position.String()
	if e.ContentType != "" {
		md[KeyContentType] = e.ContentType
	}
	if !e.RecordedAt.IsZero() {
		md[KeyRecordedAt] = e.RecordedAt.UTC().Format(time.RFC3339Nano)
	}
	setIf(md, KeyCorrelationID, e.Metadata.CorrelationID)
	setIf(md, KeyCausationID, e.Metadata.CausationID)
	setIf(md, KeyTraceParent, e.Metadata.TraceParent)
	setIf(md, KeyTraceState, e.Metadata.TraceState)
	for k, v := range e.Metadata.Keys {
		md[UserKeyPrefix+k] = v
	}
	return msg
}

// Stamp copies onto msg the metadata ToMessage would set for e, leaving keys
// msg already has alone, and gives msg the event id as UUID when it has none.
// The relay stamps the integration messages a mapping function returns, so
// they keep their origin, order key and trace context.
func Stamp(msg *message.Message, e eventstore.Event) {
	if msg.UUID == "" {
		msg.UUID = e.ID.String()
	}
	if msg.Metadata == nil {
		msg.Metadata = message.Metadata{}
	}
	for k, v := range ToMessage(e).Metadata {
		if k == KeyContentType {
			continue // the mapped payload has its own encoding
		}
		if _, ok := msg.Metadata[k]; !ok {
			msg.Metadata[k] = v
		}
	}
}

func setIf(md message.Metadata, k, v string) {
	if v != "" {
		md[k] = v
	}
}

// MessageError says a message is not a stele event message: a key is missing
// or malformed. It is permanent: retrying cannot fix it.
type MessageError struct {
	UUID   string
	Key    string
	Reason string
}

func (e *MessageError) Error() string {
	return fmt.Sprintf("bus: message %s: %s: %s", e.UUID, e.Key, e.Reason)
}

// Permanent marks MessageError as not worth a retry.
func (e *MessageError) Permanent() bool { return true }

// FromMessage reads back the event ToMessage made. Consumers use it to get
// the stream, version and position of what they received.
func FromMessage(msg *message.Message) (eventstore.Event, error) {
	bad := func(key, reason string) (eventstore.Event, error) {
		return eventstore.Event{}, &MessageError{UUID: msg.UUID, Key: key, Reason: reason}
	}
	md := msg.Metadata
	id, err := uuid.Parse(msg.UUID)
	if err != nil {
		return bad("uuid", "want the event id, a UUID")
	}
	e := eventstore.Event{ID: id, Data: msg.Payload, Type: md.Get(KeyEventType), StreamID: md.Get(KeyStreamID),
		ContentType: md.Get(KeyContentType)}
	if e.Type == "" {
		return bad(KeyEventType, "missing")
	}
	if e.StreamID == "" {
		return bad(KeyStreamID, "missing")
	}
	v, err := strconv.ParseInt(md.Get(KeyStreamVersion), 10, 64)
	if err != nil || v < 1 {
		return bad(KeyStreamVersion, "want a version >= 1")
	}
	e.Version = eventstore.Version(v)
	if p := md.Get(KeyPosition); p != "" {
		if e.Position, err = eventstore.ParsePosition(p); err != nil {
			return bad(KeyPosition, err.Error())
		}
	}
	if at := md.Get(KeyRecordedAt); at != "" {
		if e.RecordedAt, err = time.Parse(time.RFC3339Nano, at); err != nil {
			return bad(KeyRecordedAt, "want RFC 3339")
		}
		// ToMessage writes the time in UTC; an offset that moves it out of
		// years 0000-9999 would give a message nobody can read back.
		if y := e.RecordedAt.UTC().Year(); y < 0 || y > 9999 {
			return bad(KeyRecordedAt, "want a time in years 0000-9999 UTC")
		}
	}
	e.Metadata = eventstore.Metadata{CorrelationID: md.Get(KeyCorrelationID), CausationID: md.Get(KeyCausationID),
		TraceParent: md.Get(KeyTraceParent), TraceState: md.Get(KeyTraceState)}
	for k, v := range md {
		if name, ok := strings.CutPrefix(k, UserKeyPrefix); ok {
			if e.Metadata.Keys == nil {
				e.Metadata.Keys = map[string]string{}
			}
			e.Metadata.Keys[name] = v
		}
	}
	return e, nil
}

// ErrPermanent is matched by errors.Is on every error Permanent returns.
var ErrPermanent = errors.New("permanent")

// permanentError wraps an error that retrying will not fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string        { return e.err.Error() }
func (e *permanentError) Unwrap() error        { return e.err }
func (e *permanentError) Is(target error) bool { return target == ErrPermanent }

// Permanent marks err as not worth retrying: the router sends the message to
// the poison box at once instead of retrying it. Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanentError{err: err}
}

// IsPermanent reports whether err, or an error it wraps, is permanent: made
// by Permanent, or any error with a `Permanent() bool` method that returns
// true (MessageError), an *eventstore.ValidationError or a *codec.DecodeError. Everything
// else is taken as transient and retried.
func IsPermanent(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, ErrPermanent) {
		return true
	}
	var ve *eventstore.ValidationError
	var de *codec.DecodeError
	if errors.As(err, &ve) || errors.As(err, &de) {
		return true
	}
	var p interface{ Permanent() bool }
	return errors.As(err, &p) && p.Permanent()
}
