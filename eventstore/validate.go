package eventstore

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"unicode"
	"unicode/utf8"

	"github.com/google/uuid"
)

// Limits bound what one append may carry. They are checked before anything is
// sent to the backend.
type Limits struct {
	MaxEventBytes    int // Data of one event; default 1 MiB
	MaxBatchEvents   int // events in one append; default 1,000
	MaxBatchBytes    int // Data plus metadata of one append; default 4 MiB
	MaxMetadataBytes int // encoded metadata of one event; default 16 KiB
}

// DefaultLimits are the limits a zero Limits stands for.
var DefaultLimits = Limits{
	MaxEventBytes:    1 << 20,
	MaxBatchEvents:   1000,
	MaxBatchBytes:    4 << 20,
	MaxMetadataBytes: 16 << 10,
}

// WithDefaults fills zero fields from DefaultLimits.
func (l Limits) WithDefaults() Limits {
	if l.MaxEventBytes <= 0 {
		l.MaxEventBytes = DefaultLimits.MaxEventBytes
	}
	if l.MaxBatchEvents <= 0 {
		l.MaxBatchEvents = DefaultLimits.MaxBatchEvents
	}
	if l.MaxBatchBytes <= 0 {
		l.MaxBatchBytes = DefaultLimits.MaxBatchBytes
	}
	if l.MaxMetadataBytes <= 0 {
		l.MaxMetadataBytes = DefaultLimits.MaxMetadataBytes
	}
	return l
}

// MaxStreamIDBytes is the longest stream id accepted.
const MaxStreamIDBytes = 255

func invalid(sentinel error, field, format string, args ...any) *ValidationError {
	return &ValidationError{Field: field, Reason: fmt.Sprintf(format, args...), Err: sentinel}
}

// ValidateStreamID checks the stream-id rules: 1 to 255 bytes of valid,
// printable UTF-8, not starting with '$' (reserved for stele).
func ValidateStreamID(id string) error {
	return validateName(ErrInvalidStreamID, "stream id", id, true)
}

func validateName(sentinel error, field, s string, reserveDollar bool) error {
	if isPlainASCII(s) && s != "" && len(s) <= MaxStreamIDBytes && !(reserveDollar && s[0] == '$') {
		return nil // the common case, without decoding runes
	}
	switch {
	case s == "":
		return invalid(sentinel, field, "empty")
	case len(s) > MaxStreamIDBytes:
		return invalid(sentinel, field, "%d bytes, more than %d", len(s), MaxStreamIDBytes)
	case !utf8.ValidString(s):
		return invalid(sentinel, field, "not valid UTF-8")
	case reserveDollar && s[0] == '$':
		return invalid(sentinel, field, "%q starts with '$', which is reserved for stele", s)
	}
	for i, r := range s {
		if !unicode.IsPrint(r) {
			return invalid(sentinel, field, "unprintable character %U at byte %d", r, i)
		}
	}
	return nil
}

var traceParentRE = regexp.MustCompile(`^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`)

// EncodeMetadata checks m and returns its stored JSON form. An empty Metadata
// encodes as "{}".
func EncodeMetadata(m Metadata, maxBytes int) ([]byte, error) {
	for name, v := range map[string]string{"CorrelationID": m.CorrelationID, "CausationID": m.CausationID, "TraceState": m.TraceState} {
		if !utf8.ValidString(v) || hasControl(v) {
			return nil, invalid(ErrInvalidMetadata, "Metadata."+name, "not printable UTF-8")
		}
	}
	if m.TraceParent != "" && !traceParentRE.MatchString(m.TraceParent) {
		return nil, invalid(ErrInvalidMetadata, "Metadata.TraceParent", "%q is not a W3C traceparent", m.TraceParent)
	}
	for k, v := range m.Keys {
		if k == "" || !utf8.ValidString(k) || hasControl(k) {
			return nil, invalid(ErrInvalidMetadata, "Metadata.Keys", "key %q is empty or not printable UTF-8", k)
		}
		if !utf8.ValidString(v) || hasNUL(v) {
			return nil, invalid(ErrInvalidMetadata, "Metadata.Keys", "value of %q is not valid UTF-8", k)
		}
	}
	b := appendMetadataJSON(make([]byte, 0, 64), m)
	if len(b) > maxBytes {
		return nil, invalid(ErrInvalidMetadata, "Metadata", "%d bytes encoded, more than %d", len(b), maxBytes)
	}
	return b, nil
}

// appendMetadataJSON writes m as the JSON object json.Marshal would write
// (keys sorted, empty fields left out) without reflection: it runs on every
// appended event.
func appendMetadataJSON(b []byte, m Metadata) []byte {
	b = append(b, '{')
	field := func(name, v string) {
		if v == "" {
			return
		}
		if len(b) > 1 {
			b = append(b, ',')
		}
		b = appendJSONString(b, name)
		b = append(b, ':')
		b = appendJSONString(b, v)
	}
	field("correlation_id", m.CorrelationID)
	field("causation_id", m.CausationID)
	field("traceparent", m.TraceParent)
	field("tracestate", m.TraceState)
	if len(m.Keys) > 0 {
		if len(b) > 1 {
			b = append(b, ',')
		}
		b = append(b, `"keys":{`...)
		keys := make([]string, 0, len(m.Keys))
		for k := range m.Keys {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for i, k := range keys {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, k)
			b = append(b, ':')
			b = appendJSONString(b, m.Keys[k])
		}
		b = append(b, '}')
	}
	return append(b, '}')
}

// appendJSONString quotes valid UTF-8 s as a JSON string.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\t':
			b = append(b, '\\', 't')
		case '\r':
			b = append(b, '\\', 'r')
		default:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// isPlainASCII reports whether s is printable ASCII only.
func isPlainASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

func hasControl(s string) bool {
	for _, r := range s {
		if unicode.IsControl(r) {
			return true
		}
	}
	return false
}

func hasNUL(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return true
		}
	}
	return false
}

// PreparedEvent is an EventData that passed validation, with its id filled
// and its metadata encoded: what a backend writes.
type PreparedEvent struct {
	EventData
	MetadataJSON []byte
}

// PrepareAppend validates an append against the limits and returns the events
// ready to write. It never changes the caller's slice. Every backend calls it
// before touching storage, so bad input is refused the same way everywhere.
func PrepareAppend(streamID string, expected ExpectedVersion, events []EventData, limits Limits) ([]PreparedEvent, error) {
	if err := ValidateStreamID(streamID); err != nil {
		return nil, err
	}
	if expected < StreamExists {
		return nil, invalid(ErrInvalidExpectedVersion, "expected version", "%d is none of Any, NoStream, StreamExists or an exact version", int64(expected))
	}
	if len(events) == 0 {
		return nil, &ValidationError{Field: "events", Reason: "empty", Err: ErrEmptyBatch}
	}
	limits = limits.WithDefaults()
	if len(events) > limits.MaxBatchEvents {
		return nil, invalid(ErrBatchTooLarge, "events", "%d events, more than %d", len(events), limits.MaxBatchEvents)
	}
	out := make([]PreparedEvent, len(events))
	total := 0
	var seen map[uuid.UUID]int // only for batches too long to compare pairwise
	if len(events) > 16 {
		seen = make(map[uuid.UUID]int, len(events))
	}
	for i, e := range events {
		field := func(name string) string { return "events[" + strconv.Itoa(i) + "]." + name }
		if err := validateName(ErrInvalidEventType, "", e.Type, false); err != nil {
			err.(*ValidationError).Field = field("Type")
			return nil, err
		}
		if len(e.Data) > limits.MaxEventBytes {
			return nil, invalid(ErrEventTooLarge, field("Data"), "%d bytes, more than %d", len(e.Data), limits.MaxEventBytes)
		}
		if e.ContentType == "" {
			e.ContentType = DefaultContentType
		} else if err := validateName(ErrInvalidEvent, "", e.ContentType, false); err != nil {
			err.(*ValidationError).Field = field("ContentType")
			return nil, err
		}
		if e.ID == uuid.Nil {
			id, err := uuid.NewV7()
			if err != nil {
				return nil, fmt.Errorf("eventstore: generating event id: %w", err)
			}
			e.ID = id
		} else if j := duplicateOf(out[:i], seen, e.ID); j >= 0 {
			return nil, invalid(ErrInvalidEvent, field("ID"), "%s also given to events[%d]", e.ID, j)
		}
		if seen != nil {
			seen[e.ID] = i
		}
		meta, err := EncodeMetadata(e.Metadata, limits.MaxMetadataBytes)
		if err != nil {
			var ve *ValidationError
			if ok := asValidation(err, &ve); ok {
				ve.Field = field(ve.Field)
			}
			return nil, err
		}
		total += len(e.Data) + len(meta)
		out[i] = PreparedEvent{EventData: e, MetadataJSON: meta}
	}
	if total > limits.MaxBatchBytes {
		return nil, invalid(ErrBatchTooLarge, "events", "%d bytes, more than %d", total, limits.MaxBatchBytes)
	}
	return out, nil
}

// duplicateOf returns the index of an earlier event with id, or -1.
func duplicateOf(earlier []PreparedEvent, seen map[uuid.UUID]int, id uuid.UUID) int {
	if seen != nil {
		if j, ok := seen[id]; ok {
			return j
		}
		return -1
	}
	for j := range earlier {
		if earlier[j].ID == id {
			return j
		}
	}
	return -1
}

func asValidation(err error, target **ValidationError) bool {
	ve, ok := err.(*ValidationError)
	if ok {
		*target = ve
	}
	return ok
}

// MatchStored decides an append whose event ids are (partly) stored already.
// stored maps those ids to the stored events. When every event of the batch
// is stored, in this stream, at consecutive versions, with the same content,
// the append is an idempotent retry and MatchStored returns the first
// append's result; anything else is an *IdempotencyError.
func MatchStored(streamID string, prepared []PreparedEvent, stored map[uuid.UUID]Event) (AppendResult, error) {
	var first, prev Event
	for i, p := range prepared {
		e, ok := stored[p.ID]
		if !ok || e.StreamID != streamID || !SameContent(e, p) || (i > 0 && e.Version != prev.Version+1) {
			return AppendResult{}, &IdempotencyError{StreamID: streamID, EventID: p.ID}
		}
		if i == 0 {
			first = e
		}
		prev = e
	}
	return AppendResult{
		StreamID:      streamID,
		FirstVersion:  first.Version,
		LastVersion:   prev.Version,
		FirstPosition: first.Position,
		LastPosition:  prev.Position,
	}, nil
}

// SameContent reports whether a stored event holds what p would write; an
// idempotent retry must match on all of it.
func SameContent(stored Event, p PreparedEvent) bool {
	return stored.ID == p.ID && stored.Type == p.Type && stored.ContentType == p.ContentType &&
		string(stored.Data) == string(p.Data) && stored.Metadata.Equal(p.Metadata)
}
