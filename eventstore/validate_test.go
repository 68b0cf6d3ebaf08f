package eventstore_test

import (
	"encoding/json"
	"errors"
	"testing"
	"unicode/utf8"

	"github.com/stele-dev/stele/eventstore"
)

func TestParsePosition(t *testing.T) {
	for _, ok := range []eventstore.Position{{}, {TxID: 7, GlobalPosition: 9}, {TxID: 1<<64 - 1, GlobalPosition: 1<<63 - 1}} {
		got, err := eventstore.ParsePosition(ok.String())
		if err != nil || got != ok {
			t.Errorf("ParsePosition(%q) = %v, %v", ok.String(), got, err)
		}
	}
	for _, bad := range []string{"", "1", "1/", "/2", "1/2junk", "1/2/3", "1/-5", " 1/2", "-1/2", "x/y"} {
		if _, err := eventstore.ParsePosition(bad); err == nil {
			t.Errorf("ParsePosition(%q) accepted it", bad)
		}
	}
}

func TestCategory(t *testing.T) {
	for id, want := range map[string]string{"order-42": "order", "order-42-x": "order", "order": "order", "-x": ""} {
		if got := eventstore.Category(id); got != want {
			t.Errorf("Category(%q) = %q, want %q", id, got, want)
		}
	}
}

// FuzzPrepareAppend: whatever the input, validation either refuses it with a
// ValidationError or accepts a stream id and type that obey the rules, and
// never panics.
func FuzzPrepareAppend(f *testing.F) {
	f.Add("order-1", "placed", []byte(`{}`), "corr", "k", "v", int64(-1))
	f.Add("$all", "", []byte{0xff}, "\x00", "", "\xff", int64(-9))
	f.Add("a\nb", "t", []byte(nil), "", "key", "", int64(3))
	f.Fuzz(func(t *testing.T, stream, typ string, data []byte, corr, key, val string, exp int64) {
		evs := []eventstore.EventData{{Type: typ, Data: data, Metadata: eventstore.Metadata{CorrelationID: corr, Keys: map[string]string{key: val}}}}
		out, err := eventstore.PrepareAppend(stream, eventstore.ExpectedVersion(exp), evs, eventstore.Limits{})
		if err != nil {
			var ve *eventstore.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("refusal is not a ValidationError: %v", err)
			}
			return
		}
		if !utf8.ValidString(stream) || stream == "" || len(stream) > eventstore.MaxStreamIDBytes || stream[0] == '$' {
			t.Fatalf("accepted stream id %q", stream)
		}
		if exp < -3 {
			t.Fatalf("accepted expected version %d", exp)
		}
		if len(out) != 1 || out[0].ID.Version() != 7 || out[0].ContentType == "" {
			t.Fatalf("prepared %+v", out)
		}
		if _, err := eventstore.DecodeMetadata(out[0].MetadataJSON); err != nil {
			t.Fatalf("encoded metadata does not decode: %v", err)
		}
	})
}

// FuzzMetadataJSON: the hand-written metadata encoder writes valid JSON that
// encoding/json reads back to the same metadata.
func FuzzMetadataJSON(f *testing.F) {
	f.Add("corr", "cause", "tenant", "acme \"quoted\" \\ \n\t\x01 ünï", "k2", "v2")
	f.Add("", "", "", "", "", "")
	f.Fuzz(func(t *testing.T, corr, cause, k1, v1, k2, v2 string) {
		m := eventstore.Metadata{CorrelationID: corr, CausationID: cause, Keys: map[string]string{k1: v1, k2: v2}}
		enc, err := eventstore.EncodeMetadata(m, 1<<20)
		if err != nil {
			return // refused input is FuzzPrepareAppend's business
		}
		if !json.Valid(enc) {
			t.Fatalf("encoded invalid JSON %q", enc)
		}
		back, err := eventstore.DecodeMetadata(enc)
		if err != nil || !back.Equal(m) {
			t.Fatalf("round trip: %+v, %v", back, err)
		}
	})
}

// TestDecodeMetadataAsPostgresRendersIt: jsonb comes back with its keys
// reordered and spaces after ':' and ','; escapes take the slow path.
func TestDecodeMetadataAsPostgresRendersIt(t *testing.T) {
	for in, want := range map[string]eventstore.Metadata{
		`{"keys": {"a": "1", "tenant": "acme"}, "causation_id": "c", "correlation_id": "r"}`:                        {CorrelationID: "r", CausationID: "c", Keys: map[string]string{"a": "1", "tenant": "acme"}},
		`{"keys": {"q": "say \"hi\"\n"}, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}`: {TraceParent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", Keys: map[string]string{"q": "say \"hi\"\n"}},
		`{}`: {},
		`{"future_field": 3, "correlation_id": "r"}`: {CorrelationID: "r"},
	} {
		got, err := eventstore.DecodeMetadata([]byte(in))
		if err != nil || !got.Equal(want) {
			t.Errorf("DecodeMetadata(%s) = %+v, %v; want %+v", in, got, err, want)
		}
	}
}
