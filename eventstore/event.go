package eventstore

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
)

// Version is an event's 1-based, contiguous number within its stream. A
// stream with no events is at version 0.
type Version int64

// ExpectedVersion is the optimistic-concurrency condition of an append: one
// of Any, NoStream, StreamExists, or an exact version made with Exact.
type ExpectedVersion int64

const (
	// Any appends whatever the stream's current version.
	Any ExpectedVersion = -1
	// NoStream appends only if the stream has no events yet.
	NoStream ExpectedVersion = -2
	// StreamExists appends only if the stream has at least one event.
	StreamExists ExpectedVersion = -3
)

// Exact appends only if the stream is at version v. Exact(0) is NoStream.
func Exact(v Version) ExpectedVersion {
	if v < 0 {
		return ExpectedVersion(-100) // invalid on purpose; Validate refuses it
	}
	return ExpectedVersion(v)
}

func (e ExpectedVersion) String() string {
	switch {
	case e == Any:
		return "any"
	case e == NoStream:
		return "no stream"
	case e == StreamExists:
		return "stream exists"
	case e >= 0:
		return fmt.Sprintf("version %d", int64(e))
	default:
		return fmt.Sprintf("invalid(%d)", int64(e))
	}
}

// Satisfied reports whether a stream at version current meets e.
func (e ExpectedVersion) Satisfied(current Version) bool {
	switch {
	case e == Any:
		return true
	case e == NoStream:
		return current == 0
	case e == StreamExists:
		return current > 0
	default:
		return current == Version(e)
	}
}

// Position is a place in the global feed: the writing transaction's id and the
// event's global position, compared in that order. The feed is ordered by
// Position, and a checkpoint is a Position; never compare GlobalPosition alone,
// because positions can commit out of order.
type Position struct {
	TxID           uint64
	GlobalPosition int64
}

// Start is the position before the first event of the feed.
var Start = Position{}

// Less reports whether p comes before q in the feed.
func (p Position) Less(q Position) bool {
	if p.TxID != q.TxID {
		return p.TxID < q.TxID
	}
	return p.GlobalPosition < q.GlobalPosition
}

func (p Position) String() string { return fmt.Sprintf("%d/%d", p.TxID, p.GlobalPosition) }

// ParsePosition reads the form Position.String prints ("txid/position").
func ParsePosition(s string) (Position, error) {
	tx, pos, ok := strings.Cut(s, "/")
	if !ok {
		return Position{}, fmt.Errorf("eventstore: parsing position %q: want TXID/POSITION", s)
	}
	txID, err := strconv.ParseUint(tx, 10, 64)
	if err != nil {
		return Position{}, fmt.Errorf("eventstore: parsing position %q: transaction id: %w", s, err)
	}
	gp, err := strconv.ParseInt(pos, 10, 64)
	if err != nil || gp < 0 {
		return Position{}, fmt.Errorf("eventstore: parsing position %q: want a global position >= 0", s)
	}
	return Position{TxID: txID, GlobalPosition: gp}, nil
}

// Metadata travels with every event: ids that tie events to the request and
// the event that caused them, W3C trace context, and free-form user keys.
type Metadata struct {
	CorrelationID string            `json:"correlation_id,omitempty"`
	CausationID   string            `json:"causation_id,omitempty"`
	TraceParent   string            `json:"traceparent,omitempty"`
	TraceState    string            `json:"tracestate,omitempty"`
	Keys          map[string]string `json:"keys,omitempty"`
}

// IsZero reports whether m carries nothing.
func (m Metadata) IsZero() bool {
	return m.CorrelationID == "" && m.CausationID == "" && m.TraceParent == "" && m.TraceState == "" && len(m.Keys) == 0
}

// Equal reports whether m and o carry the same values.
func (m Metadata) Equal(o Metadata) bool {
	if m.CorrelationID != o.CorrelationID || m.CausationID != o.CausationID ||
		m.TraceParent != o.TraceParent || m.TraceState != o.TraceState || len(m.Keys) != len(o.Keys) {
		return false
	}
	for k, v := range m.Keys {
		if w, ok := o.Keys[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// DefaultContentType is recorded for events that name none.
const DefaultContentType = "application/json"

// EventData is an event to append. A zero ID is replaced by a new UUIDv7;
// give your own ID to make a retried append idempotent.
type EventData struct {
	ID          uuid.UUID
	Type        string
	Data        []byte
	ContentType string // defaults to DefaultContentType
	Metadata    Metadata
}

// Event is an event as stored.
type Event struct {
	StreamID    string
	Version     Version
	Position    Position
	ID          uuid.UUID
	Type        string
	Data        []byte
	ContentType string
	Metadata    Metadata
	// RecordedAt is set by the store when the event is written. It is for
	// people and for ReadAllOpts.Since; order comes from Position and Version.
	RecordedAt time.Time
}

// Category is the part of the stream id before its first '-' ("order-42" is in
// category "order"); a stream id without '-' is its own category.
func Category(streamID string) string {
	if i := strings.IndexByte(streamID, '-'); i >= 0 {
		return streamID[:i]
	}
	return streamID
}

// AppendResult describes a successful append. For an idempotent retry it is
// the result of the append that stored the events.
type AppendResult struct {
	StreamID      string
	FirstVersion  Version
	LastVersion   Version // the stream's version after the append
	FirstPosition Position
	LastPosition  Position
}

// Direction of a stream read.
type Direction int

const (
	Forward Direction = iota
	Backward
)

// ReadStreamOpts selects a page of one stream.
type ReadStreamOpts struct {
	// From is the first version read: the lowest when reading forwards
	// (0 means 1), the highest when reading backwards (0 means the last).
	From      Version
	Direction Direction
	// Limit caps the page; 0 means DefaultPageSize.
	Limit int
}

// ReadAllOpts selects a page of the global feed.
type ReadAllOpts struct {
	// After is the checkpoint: events strictly after it are read.
	After Position
	// Category, when set, reads only streams of that category.
	Category string
	// Since, when set, skips events recorded before it (replay from a time).
	Since time.Time
	// Limit caps the page; 0 means DefaultPageSize.
	Limit int
}

// DefaultPageSize is the page used when a read gives no limit.
const DefaultPageSize = 500

// StreamInfo summarises one stream.
type StreamInfo struct {
	StreamID  string
	Category  string
	Version   Version
	CreatedAt time.Time
	UpdatedAt time.Time
}

// ListStreamsOpts pages through streams in id order.
type ListStreamsOpts struct {
	Category string
	After    string // stream id to start after
	Limit    int    // 0 means DefaultPageSize
}

// Store is an append-only log of events kept in streams. Every backend
// (memstore, pgstore) passes the same conformance suite, eventstoretest.
type Store interface {
	// Append adds events to a stream atomically if expected holds. It returns
	// an error that matches ErrConcurrencyConflict when it does not.
	Append(ctx context.Context, streamID string, expected ExpectedVersion, events []EventData) (AppendResult, error)
	// ReadStream reads one page of a stream; fewer than the limit means the end.
	ReadStream(ctx context.Context, streamID string, opts ReadStreamOpts) ([]Event, error)
	// StreamVersion returns the stream's current version (0 if it has none).
	StreamVersion(ctx context.Context, streamID string) (Version, error)
	// ReadAll reads one page of the global feed after opts.After, in order.
	// It returns only events whose position can no longer be preceded by an
	// event still being written, so a reader that checkpoints the last
	// position it saw never skips one.
	ReadAll(ctx context.Context, opts ReadAllOpts) ([]Event, error)
	// Head returns the position of the last event readable in the feed now
	// (Start when there is none): where a reader that wants only new events
	// starts.
	Head(ctx context.Context) (Position, error)
	// ListStreams pages through the streams in id order.
	ListStreams(ctx context.Context, opts ListStreamsOpts) ([]StreamInfo, error)
	// WaitForAppend returns a channel closed at the next append this store
	// commits, or when the backend's poll interval has passed. Subscribe uses
	// it to follow the feed live.
	WaitForAppend() <-chan struct{}
}
