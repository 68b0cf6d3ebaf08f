package eventstoretest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/wait"
)

func testAppendAndReadBack(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	before := time.Now().Add(-time.Minute) // server clocks may differ a little
	in := []eventstore.EventData{
		{Type: "order.placed", Data: []byte(`{"sku":"A"}`), Metadata: eventstore.Metadata{
			CorrelationID: "corr-1", CausationID: "cmd-1",
			TraceParent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
			Keys:        map[string]string{"tenant": "acme", "user": "ünïcode"},
		}},
		{ID: uuid.New(), Type: "order.paid", Data: []byte{0, 1, 2, 255}, ContentType: "application/octet-stream"},
		{Type: "order.shipped"}, // no payload at all
	}
	res, err := s.Append(ctx, "order-1", eventstore.NoStream, in)
	if err != nil {
		t.Fatalf("Append: %v", err)
	}
	if res.StreamID != "order-1" || res.FirstVersion != 1 || res.LastVersion != 3 {
		t.Fatalf("result = %+v, want versions 1..3 of order-1", res)
	}
	if !res.FirstPosition.Less(res.LastPosition) {
		t.Fatalf("positions %s..%s do not increase", res.FirstPosition, res.LastPosition)
	}
	got, err := eventstore.LoadStream(ctx, s, "order-1")
	if err != nil {
		t.Fatalf("LoadStream: %v", err)
	}
	if len(got) != 3 {
		t.Fatalf("read %d events, want 3", len(got))
	}
	for i, e := range got {
		want := in[i]
		if e.StreamID != "order-1" || e.Version != eventstore.Version(i+1) || e.Type != want.Type || !bytes.Equal(e.Data, want.Data) {
			t.Errorf("event %d = %s v%d %s %q, want order-1 v%d %s %q", i, e.StreamID, e.Version, e.Type, e.Data, i+1, want.Type, want.Data)
		}
		if want.ID != uuid.Nil && e.ID != want.ID {
			t.Errorf("event %d id = %s, want the given %s", i, e.ID, want.ID)
		}
		if e.ID == uuid.Nil || e.ID.Version() != 7 && want.ID == uuid.Nil {
			t.Errorf("event %d: generated id %s is not a UUIDv7", i, e.ID)
		}
		wantCT := want.ContentType
		if wantCT == "" {
			wantCT = eventstore.DefaultContentType
		}
		if e.ContentType != wantCT {
			t.Errorf("event %d content type = %q, want %q", i, e.ContentType, wantCT)
		}
		if !e.Metadata.Equal(want.Metadata) {
			t.Errorf("event %d metadata = %+v, want %+v", i, e.Metadata, want.Metadata)
		}
		if e.RecordedAt.Before(before) || e.RecordedAt.After(time.Now().Add(time.Minute)) {
			t.Errorf("event %d recorded at %s, not around now", i, e.RecordedAt)
		}
	}
	if got[0].Position != res.FirstPosition || got[2].Position != res.LastPosition {
		t.Errorf("read positions %s..%s, append said %s..%s", got[0].Position, got[2].Position, res.FirstPosition, res.LastPosition)
	}
	if v, err := s.StreamVersion(ctx, "order-1"); err != nil || v != 3 {
		t.Errorf("StreamVersion = %d, %v; want 3", v, err)
	}
	if v, err := s.StreamVersion(ctx, "order-none"); err != nil || v != 0 {
		t.Errorf("StreamVersion of a missing stream = %d, %v; want 0", v, err)
	}
	if evs, err := s.ReadStream(ctx, "order-none", eventstore.ReadStreamOpts{}); err != nil || len(evs) != 0 {
		t.Errorf("ReadStream of a missing stream = %d events, %v; want none", len(evs), err)
	}
}

func testExpectedVersions(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	mustAppend(t, s, "acct-1", eventstore.NoStream, Evs("opened", 2)) // acct-1 at version 2
	cases := []struct {
		name     string
		stream   string
		expected eventstore.ExpectedVersion
		ok       bool
		actual   eventstore.Version
	}{
		{"no stream on a new stream", "acct-2", eventstore.NoStream, true, 0},
		{"no stream on an existing stream", "acct-1", eventstore.NoStream, false, 2},
		{"stream exists on a new stream", "acct-3", eventstore.StreamExists, false, 0},
		{"exact on a new stream", "acct-4", eventstore.Exact(3), false, 0},
		{"exact zero on a new stream", "acct-5", eventstore.Exact(0), true, 0},
		{"exact, stale", "acct-1", eventstore.Exact(1), false, 2},
		{"exact, ahead", "acct-1", eventstore.Exact(7), false, 2},
		{"exact, right", "acct-1", eventstore.Exact(2), true, 2},
		{"stream exists", "acct-1", eventstore.StreamExists, true, 3},
		{"any", "acct-1", eventstore.Any, true, 4},
		{"any on a new stream", "acct-6", eventstore.Any, true, 0},
	}
	for _, c := range cases {
		before, _ := s.StreamVersion(ctx, c.stream)
		res, err := s.Append(ctx, c.stream, c.expected, Evs("credited", 1))
		if c.ok {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			} else if res.FirstVersion != c.actual+1 {
				t.Errorf("%s: appended at version %d, want %d", c.name, res.FirstVersion, c.actual+1)
			}
			continue
		}
		var ce *eventstore.ConcurrencyError
		if !errors.Is(err, eventstore.ErrConcurrencyConflict) || !errors.As(err, &ce) {
			t.Errorf("%s: err = %v, want a concurrency conflict", c.name, err)
			continue
		}
		if ce.Actual != c.actual || ce.StreamID != c.stream || ce.Expected != c.expected {
			t.Errorf("%s: conflict %+v, want stream %s expected %s actual %d", c.name, ce, c.stream, c.expected, c.actual)
		}
		if after, _ := s.StreamVersion(ctx, c.stream); after != before {
			t.Errorf("%s: refused append moved the stream from %d to %d", c.name, before, after)
		}
	}
	if streams, _ := s.ListStreams(ctx, eventstore.ListStreamsOpts{Category: "acct"}); len(streams) != 4 {
		t.Errorf("refused appends to new streams created streams: %+v", streams)
	}
}

func testAtomicBatch(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	mustAppend(t, s, "cart-1", eventstore.NoStream, Evs("added", 1))
	if _, err := s.Append(ctx, "cart-1", eventstore.Exact(0), Evs("added", 5)); !errors.Is(err, eventstore.ErrConcurrencyConflict) {
		t.Fatalf("stale batch: err = %v, want conflict", err)
	}
	bad := Evs("added", 3)
	bad[2].Type = ""
	if _, err := s.Append(ctx, "cart-1", eventstore.Any, bad); !errors.Is(err, eventstore.ErrInvalidEventType) {
		t.Fatalf("batch with a bad event: err = %v, want ErrInvalidEventType", err)
	}
	evs, err := eventstore.LoadStream(ctx, s, "cart-1")
	if err != nil || len(evs) != 1 {
		t.Fatalf("after refused batches the stream has %d events (%v), want 1", len(evs), err)
	}
	res := mustAppend(t, s, "cart-1", eventstore.Exact(1), Evs("added", 100))
	if res.FirstVersion != 2 || res.LastVersion != 101 {
		t.Fatalf("batch of 100 landed at %d..%d, want 2..101", res.FirstVersion, res.LastVersion)
	}
	all := readAllN(t, s, eventstore.ReadAllOpts{}, 101)
	for i := 1; i < len(all); i++ {
		if all[i].Version != all[i-1].Version+1 {
			t.Fatalf("batch not contiguous in the feed: v%d after v%d", all[i].Version, all[i-1].Version)
		}
	}
}

func testIdempotentRetry(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	batch := []eventstore.EventData{
		{ID: uuid.New(), Type: "paid", Data: []byte(`{"amount":10}`), Metadata: eventstore.Metadata{CorrelationID: "c1"}},
		{ID: uuid.New(), Type: "receipt.sent", Data: []byte(`{}`)},
	}
	first := mustAppend(t, s, "pay-1", eventstore.NoStream, batch)
	// The client saw an error although the append committed, and retries the
	// same batch with the same expected version, then with Any.
	for _, exp := range []eventstore.ExpectedVersion{eventstore.NoStream, eventstore.Any, eventstore.Exact(0)} {
		again, err := s.Append(ctx, "pay-1", exp, batch)
		if err != nil {
			t.Fatalf("retry with %s: %v", exp, err)
		}
		if again != first {
			t.Fatalf("retry with %s returned %+v, want the first result %+v", exp, again, first)
		}
	}
	// Later events do not stop a late retry from being recognised.
	mustAppend(t, s, "pay-1", eventstore.Exact(2), Evs("refunded", 1))
	if again, err := s.Append(ctx, "pay-1", eventstore.NoStream, batch); err != nil || again != first {
		t.Fatalf("late retry = %+v, %v; want %+v", again, err, first)
	}

	mismatches := map[string]func() (string, []eventstore.EventData){
		"other data": func() (string, []eventstore.EventData) {
			c := clone(batch)
			c[0].Data = []byte(`{"amount":11}`)
			return "pay-1", c
		},
		"other type": func() (string, []eventstore.EventData) {
			c := clone(batch)
			c[1].Type = "receipt.mailed"
			return "pay-1", c
		},
		"other metadata": func() (string, []eventstore.EventData) {
			c := clone(batch)
			c[0].Metadata.CorrelationID = "c2"
			return "pay-1", c
		},
		"other stream": func() (string, []eventstore.EventData) { return "pay-2", clone(batch) },
		"reordered": func() (string, []eventstore.EventData) {
			c := clone(batch)
			c[0], c[1] = c[1], c[0]
			return "pay-1", c
		},
		"partly new": func() (string, []eventstore.EventData) {
			return "pay-1", append(clone(batch), eventstore.EventData{ID: uuid.New(), Type: "extra"})
		},
	}
	for name, mk := range mismatches {
		stream, evs := mk()
		_, err := s.Append(ctx, stream, eventstore.Any, evs)
		var ie *eventstore.IdempotencyError
		if !errors.Is(err, eventstore.ErrIdempotencyMismatch) || !errors.As(err, &ie) || ie.StreamID != stream {
			t.Errorf("%s: err = %v, want an IdempotencyError for %s", name, err, stream)
		}
	}
	readAllN(t, s, eventstore.ReadAllOpts{}, 3) // nothing stored twice
}

func clone(evs []eventstore.EventData) []eventstore.EventData {
	out := make([]eventstore.EventData, len(evs))
	copy(out, evs)
	return out
}

func testBadInput(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	big := make([]byte, eventstore.DefaultLimits.MaxEventBytes+1)
	dupID := uuid.New()
	cases := []struct {
		name     string
		stream   string
		expected eventstore.ExpectedVersion
		events   []eventstore.EventData
		want     error
	}{
		{"empty stream id", "", eventstore.Any, Evs("e", 1), eventstore.ErrInvalidStreamID},
		{"over-long stream id", strings.Repeat("s", 256), eventstore.Any, Evs("e", 1), eventstore.ErrInvalidStreamID},
		{"control character in stream id", "order-\n1", eventstore.Any, Evs("e", 1), eventstore.ErrInvalidStreamID},
		{"NUL in stream id", "order-\x001", eventstore.Any, Evs("e", 1), eventstore.ErrInvalidStreamID},
		{"$-prefixed stream id", "$all", eventstore.Any, Evs("e", 1), eventstore.ErrInvalidStreamID},
		{"non-UTF-8 stream id", "order-\xff\xfe", eventstore.Any, Evs("e", 1), eventstore.ErrInvalidStreamID},
		{"unknown expected version", "order-1", eventstore.ExpectedVersion(-4), Evs("e", 1), eventstore.ErrInvalidExpectedVersion},
		{"negative exact version", "order-1", eventstore.Exact(-1), Evs("e", 1), eventstore.ErrInvalidExpectedVersion},
		{"no events", "order-1", eventstore.Any, nil, eventstore.ErrEmptyBatch},
		{"empty event type", "order-1", eventstore.Any, []eventstore.EventData{{Type: ""}}, eventstore.ErrInvalidEventType},
		{"event over the size limit", "order-1", eventstore.Any, []eventstore.EventData{{Type: "e", Data: big}}, eventstore.ErrEventTooLarge},
		{"too many events", "order-1", eventstore.Any, Evs("e", eventstore.DefaultLimits.MaxBatchEvents+1), eventstore.ErrBatchTooLarge},
		{"batch over the byte limit", "order-1", eventstore.Any, []eventstore.EventData{
			{Type: "e", Data: big[:1<<20]}, {Type: "e", Data: big[:1<<20]}, {Type: "e", Data: big[:1<<20]},
			{Type: "e", Data: big[:1<<20]}, {Type: "e", Data: big[:1<<20]}}, eventstore.ErrBatchTooLarge},
		{"same id twice in a batch", "order-1", eventstore.Any, []eventstore.EventData{{ID: dupID, Type: "e"}, {ID: dupID, Type: "e"}}, eventstore.ErrInvalidEvent},
		{"bad traceparent", "order-1", eventstore.Any, []eventstore.EventData{{Type: "e", Metadata: eventstore.Metadata{TraceParent: "not-a-trace"}}}, eventstore.ErrInvalidMetadata},
		{"empty metadata key", "order-1", eventstore.Any, []eventstore.EventData{{Type: "e", Metadata: eventstore.Metadata{Keys: map[string]string{"": "x"}}}}, eventstore.ErrInvalidMetadata},
		{"non-UTF-8 metadata value", "order-1", eventstore.Any, []eventstore.EventData{{Type: "e", Metadata: eventstore.Metadata{Keys: map[string]string{"k": "\xff"}}}}, eventstore.ErrInvalidMetadata},
		{"control character in correlation id", "order-1", eventstore.Any, []eventstore.EventData{{Type: "e", Metadata: eventstore.Metadata{CorrelationID: "a\x00b"}}}, eventstore.ErrInvalidMetadata},
		{"metadata over the size limit", "order-1", eventstore.Any, []eventstore.EventData{{Type: "e", Metadata: eventstore.Metadata{Keys: map[string]string{"k": strings.Repeat("x", 17<<10)}}}}, eventstore.ErrInvalidMetadata},
	}
	for _, c := range cases {
		_, err := s.Append(ctx, c.stream, c.expected, c.events)
		var ve *eventstore.ValidationError
		if !errors.Is(err, c.want) || !errors.As(err, &ve) {
			t.Errorf("%s: err = %v, want a ValidationError matching %v", c.name, err, c.want)
		}
	}
	if all := readAll(t, s, eventstore.ReadAllOpts{}); len(all) != 0 {
		t.Errorf("refused appends wrote %d events", len(all))
	}
	if streams, err := s.ListStreams(ctx, eventstore.ListStreamsOpts{}); err != nil || len(streams) != 0 {
		t.Errorf("refused appends created streams: %+v (%v)", streams, err)
	}
	if _, err := s.ReadStream(ctx, "$bad", eventstore.ReadStreamOpts{}); !errors.Is(err, eventstore.ErrInvalidStreamID) {
		t.Errorf("ReadStream of a reserved id: err = %v, want ErrInvalidStreamID", err)
	}
}

func testReadStreamPages(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	mustAppend(t, s, "log-1", eventstore.NoStream, Evs("line", 25))
	mustAppend(t, s, "log-2", eventstore.NoStream, Evs("line", 3)) // must not leak into log-1
	page, err := s.ReadStream(ctx, "log-1", eventstore.ReadStreamOpts{From: 5, Limit: 10})
	if err != nil || len(page) != 10 || page[0].Version != 5 || page[9].Version != 14 {
		t.Fatalf("forward page from 5 = %s (%v), want v5..v14", versions(page), err)
	}
	page, err = s.ReadStream(ctx, "log-1", eventstore.ReadStreamOpts{Direction: eventstore.Backward, Limit: 4})
	if err != nil || versions(page) != "25 24 23 22" {
		t.Fatalf("backward page from the end = %s (%v), want 25 24 23 22", versions(page), err)
	}
	page, err = s.ReadStream(ctx, "log-1", eventstore.ReadStreamOpts{Direction: eventstore.Backward, From: 3})
	if err != nil || versions(page) != "3 2 1" {
		t.Fatalf("backward page from 3 = %s (%v), want 3 2 1", versions(page), err)
	}
	var fwd, bwd []eventstore.Event
	for e, err := range eventstore.IterStream(ctx, s, "log-1", eventstore.ReadStreamOpts{Limit: 7}) {
		if err != nil {
			t.Fatal(err)
		}
		fwd = append(fwd, e)
	}
	for e, err := range eventstore.IterStream(ctx, s, "log-1", eventstore.ReadStreamOpts{Limit: 7, Direction: eventstore.Backward}) {
		if err != nil {
			t.Fatal(err)
		}
		bwd = append(bwd, e)
	}
	if len(fwd) != 25 || len(bwd) != 25 {
		t.Fatalf("paged iteration read %d forwards and %d backwards, want 25 each", len(fwd), len(bwd))
	}
	for i := range fwd {
		if fwd[i].Version != eventstore.Version(i+1) || bwd[i].Version != eventstore.Version(25-i) {
			t.Fatalf("paged iteration out of order at %d: fwd v%d, bwd v%d", i, fwd[i].Version, bwd[i].Version)
		}
	}
}

func testReadAll(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	if head, err := s.Head(ctx); err != nil || head != eventstore.Start {
		t.Fatalf("Head of an empty log = %s, %v; want Start", head, err)
	}
	mustAppend(t, s, "order-1", eventstore.NoStream, Evs("placed", 2))
	mustAppend(t, s, "user-1", eventstore.NoStream, Evs("registered", 1))
	last := mustAppend(t, s, "order-2", eventstore.NoStream, Evs("placed", 3))
	waitCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := eventstore.WaitForPosition(waitCtx, s, last.LastPosition); err != nil {
		t.Fatalf("WaitForPosition(%s): %v", last.LastPosition, err)
	}
	if head, err := s.Head(ctx); err != nil || head != last.LastPosition {
		t.Fatalf("Head = %s, %v; want the last append's %s", head, err, last.LastPosition)
	}
	all := readAllN(t, s, eventstore.ReadAllOpts{Limit: 2}, 6)
	for i := 1; i < len(all); i++ {
		if !all[i-1].Position.Less(all[i].Position) {
			t.Fatalf("feed not in position order at %d: %s then %s", i, all[i-1].Position, all[i].Position)
		}
	}
	// From a checkpoint: everything strictly after it.
	rest := readAllN(t, s, eventstore.ReadAllOpts{After: all[2].Position}, 3)
	if rest[0].ID != all[3].ID {
		t.Fatalf("read after checkpoint %s: %d events, want the last 3", all[2].Position, len(rest))
	}
	orders := readAllN(t, s, eventstore.ReadAllOpts{Category: "order", Limit: 1}, 5)
	for _, e := range orders {
		if eventstore.Category(e.StreamID) != "order" {
			t.Fatalf("category read returned %s", e.StreamID)
		}
	}
	// Replay from a point in time: take the recorded time of the user event and
	// ask for everything since.
	since := all[2].RecordedAt
	later := readAllN(t, s, eventstore.ReadAllOpts{Since: since}, 4)
	for _, e := range later {
		if e.RecordedAt.Before(since) {
			t.Fatalf("read since %s returned an event recorded at %s", since, e.RecordedAt)
		}
	}
	if later[0].ID != all[2].ID {
		t.Fatalf("read since the 3rd event's time: %d events starting %s, want it and all after", len(later), later[0].StreamID)
	}
	future := readAll(t, s, eventstore.ReadAllOpts{Since: time.Now().Add(time.Hour)})
	if len(future) != 0 {
		t.Fatalf("read since an hour ahead returned %d events", len(future))
	}
}

func testListStreams(t *testing.T, b Backend) {
	ctx := context.Background()
	s := b.NewStore(t)
	for _, id := range []string{"b-2", "a-1", "b-1", "c"} {
		mustAppend(t, s, id, eventstore.NoStream, Evs("x", 2))
	}
	var ids []string
	after := ""
	for {
		page, err := s.ListStreams(ctx, eventstore.ListStreamsOpts{After: after, Limit: 3})
		if err != nil {
			t.Fatal(err)
		}
		for _, si := range page {
			if si.Version != 2 || si.Category != eventstore.Category(si.StreamID) {
				t.Errorf("stream info %+v", si)
			}
			ids = append(ids, si.StreamID)
		}
		if len(page) < 3 {
			break
		}
		after = page[len(page)-1].StreamID
	}
	if strings.Join(ids, " ") != "a-1 b-1 b-2 c" {
		t.Fatalf("ListStreams = %v, want a-1 b-1 b-2 c", ids)
	}
	bs, err := s.ListStreams(ctx, eventstore.ListStreamsOpts{Category: "b"})
	if err != nil || len(bs) != 2 {
		t.Fatalf("ListStreams category b = %+v (%v)", bs, err)
	}
}

func mustAppend(t testing.TB, s eventstore.Store, stream string, exp eventstore.ExpectedVersion, evs []eventstore.EventData) eventstore.AppendResult {
	t.Helper()
	res, err := s.Append(context.Background(), stream, exp, evs)
	if err != nil {
		t.Fatalf("Append(%s, %s): %v", stream, exp, err)
	}
	return res
}

// readAllN reads the feed until it holds n events. The feed shows an event
// once every older transaction in the whole server has ended, and tests of
// other packages may hold one open for a moment, so it waits (up to a
// deadline) rather than expecting the event at once.
func readAllN(t testing.TB, s eventstore.Store, opts eventstore.ReadAllOpts, n int) []eventstore.Event {
	t.Helper()
	var evs []eventstore.Event
	wait.Until(t, fmt.Sprintf("the feed to hold %d events", n), func() bool {
		evs = readAll(t, s, opts)
		if len(evs) > n {
			t.Fatalf("feed holds %d events, want %d", len(evs), n)
		}
		return len(evs) == n
	})
	return evs
}

func readAll(t testing.TB, s eventstore.Store, opts eventstore.ReadAllOpts) []eventstore.Event {
	t.Helper()
	var out []eventstore.Event
	for e, err := range eventstore.IterAll(context.Background(), s, opts) {
		if err != nil {
			t.Fatalf("ReadAll: %v", err)
		}
		out = append(out, e)
	}
	return out
}

func versions(evs []eventstore.Event) string {
	parts := make([]string, len(evs))
	for i, e := range evs {
		parts[i] = strconv.FormatInt(int64(e.Version), 10)
	}
	return strings.Join(parts, " ")
}
