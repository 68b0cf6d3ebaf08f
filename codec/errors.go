package codec

import (
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/stele-dev/stele/eventstore"
)

// Sentinels to branch on with errors.Is. Decode wraps them in a *DecodeError;
// registration wraps ErrInvalidRegistration in a *RegistrationError.
var (
	// ErrUnknownType: the stored event type is neither registered nor renamed
	// to a registered name.
	ErrUnknownType = errors.New("codec: unknown event type")
	// ErrUndecodable: the content type or payload cannot be read, or an
	// upcaster refused the payload.
	ErrUndecodable = errors.New("codec: undecodable event")
	// ErrNoUpcaster: the event is stored at an older schema version and a step
	// of the upcaster chain to the current version is missing.
	ErrNoUpcaster = errors.New("codec: missing upcaster")
	// ErrFutureVersion: the event is stored at a newer schema version than this
	// program registered. Deploy the newer reader; guessing would mis-decode.
	ErrFutureVersion = errors.New("codec: event schema version is newer than the registered one")
	// ErrNotRegistered: Encode or Name was given a value of an unregistered type.
	ErrNotRegistered = errors.New("codec: type not registered")
	// ErrInvalidRegistration: Register, Upcast or Rename was refused.
	ErrInvalidRegistration = errors.New("codec: invalid registration")
)

// DecodeError says which stored event could not be decoded. It unwraps to one
// of the sentinels above and, when there is one, to the codec's or the
// upcaster's own error.
type DecodeError struct {
	StreamID      string
	Version       eventstore.Version // the event's version in its stream
	Type          string             // the stored event type
	SchemaVersion int                // the stored schema version; 0 if unreadable
	Err           error
}

func (e *DecodeError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "codec: decoding stream %q version %d, type %q", e.StreamID, e.Version, e.Type)
	if e.SchemaVersion > 0 {
		fmt.Fprintf(&b, " schema v%d", e.SchemaVersion)
	}
	if e.Err != nil {
		// The sentinels carry the package prefix already; say it once.
		b.WriteString(": ")
		b.WriteString(strings.TrimPrefix(e.Err.Error(), "codec: "))
	}
	return b.String()
}

func (e *DecodeError) Unwrap() error { return e.Err }

// RegistrationError says why Register, Upcast or Rename refused a name.
// errors.Is(err, ErrInvalidRegistration) holds.
type RegistrationError struct {
	Name   string       // the event name involved
	GoType reflect.Type // the Go type, for Register; nil otherwise
	Reason string
}

func (e *RegistrationError) Error() string {
	if e.GoType != nil {
		return fmt.Sprintf("%v: %q (Go type %v): %s", ErrInvalidRegistration, e.Name, e.GoType, e.Reason)
	}
	return fmt.Sprintf("%v: %q: %s", ErrInvalidRegistration, e.Name, e.Reason)
}

func (e *RegistrationError) Unwrap() error { return ErrInvalidRegistration }
