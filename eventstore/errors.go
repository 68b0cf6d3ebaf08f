package eventstore

import (
	"errors"
	"fmt"

	"github.com/google/uuid"
)

// Sentinels to branch on with errors.Is. Typed errors below carry detail.
var (
	// ErrConcurrencyConflict: the stream was not at the expected version.
	ErrConcurrencyConflict = errors.New("eventstore: concurrency conflict")
	// ErrIdempotencyMismatch: an event id is already stored with other content,
	// in another stream or at another place in the stream.
	ErrIdempotencyMismatch = errors.New("eventstore: event id already stored with other content")
	// ErrRetryable marks an append refused so that it can be retried in a fresh
	// transaction (see IsRetryable).
	ErrRetryable = errors.New("eventstore: retry in a new transaction")

	// Validation failures: nothing was written.
	ErrInvalidStreamID        = errors.New("eventstore: invalid stream id")
	ErrInvalidEventType       = errors.New("eventstore: invalid event type")
	ErrInvalidExpectedVersion = errors.New("eventstore: invalid expected version")
	ErrInvalidMetadata        = errors.New("eventstore: invalid metadata")
	ErrInvalidEvent           = errors.New("eventstore: invalid event")
	ErrEmptyBatch             = errors.New("eventstore: no events to append")
	ErrEventTooLarge          = errors.New("eventstore: event too large")
	ErrBatchTooLarge          = errors.New("eventstore: batch too large")
)

// ConcurrencyError says which stream conflicted and at what version it was.
// errors.Is(err, ErrConcurrencyConflict) holds.
type ConcurrencyError struct {
	StreamID string
	Expected ExpectedVersion
	Actual   Version
}

func (e *ConcurrencyError) Error() string {
	return fmt.Sprintf("eventstore: concurrency conflict on %q: expected %s, stream is at version %d", e.StreamID, e.Expected, e.Actual)
}

func (e *ConcurrencyError) Unwrap() error { return ErrConcurrencyConflict }

// IdempotencyError names the event id that was reused with other content.
// errors.Is(err, ErrIdempotencyMismatch) holds.
type IdempotencyError struct {
	StreamID string
	EventID  uuid.UUID
}

func (e *IdempotencyError) Error() string {
	return fmt.Sprintf("eventstore: appending to %q: event %s is already stored with other content", e.StreamID, e.EventID)
}

func (e *IdempotencyError) Unwrap() error { return ErrIdempotencyMismatch }

// ValidationError says which input was refused and why. It unwraps to one of
// the ErrInvalid*/Err*TooLarge sentinels.
type ValidationError struct {
	Field  string // "stream id", "events[3].Type", ...
	Reason string
	Err    error // the sentinel
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("%v: %s: %s", e.Err, e.Field, e.Reason)
}

func (e *ValidationError) Unwrap() error { return e.Err }

// RetryableError wraps an append refused for a reason that a fresh
// transaction can clear: the stream's last writer is a newer transaction
// (see docs/eventstore.md, "per-stream order"), a deadlock, or a race on an
// event id. Append retries these itself; AppendTx returns them.
type RetryableError struct {
	StreamID string
	Reason   string
	Err      error // the driver's error, if any
}

func (e *RetryableError) Error() string {
	msg := fmt.Sprintf("eventstore: appending to %q: %s; retry in a new transaction", e.StreamID, e.Reason)
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

func (e *RetryableError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrRetryable, e.Err}
	}
	return []error{ErrRetryable}
}

// IsRetryable reports whether err refused an append that may succeed if it is
// run again in a new transaction.
func IsRetryable(err error) bool { return errors.Is(err, ErrRetryable) }
