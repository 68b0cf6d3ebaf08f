package pgstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
)

// govAppend appends n events to stream, each with its own data and metadata.
func govAppend(t testing.TB, s *pgstore.Store, stream string, n int) {
	t.Helper()
	events := make([]eventstore.EventData, n)
	for i := range events {
		events[i] = eventstore.EventData{
			Type:     "Happened",
			Data:     fmt.Appendf(nil, `{"stream": %q, "n": %d, "pad": "%s"}`, stream, i, strings.Repeat("x", i)),
			Metadata: eventstore.Metadata{CorrelationID: "c-" + stream, Keys: map[string]string{"n": fmt.Sprint(i)}},
		}
	}
	if _, err := s.Append(context.Background(), stream, eventstore.Any, events); err != nil {
		t.Fatalf("appending to %s: %v", stream, err)
	}
}

func feed(t testing.TB, s *pgstore.Store, after eventstore.Position) []eventstore.Event {
	t.Helper()
	var out []eventstore.Event
	for e, err := range eventstore.IterAll(context.Background(), s, eventstore.ReadAllOpts{After: after, Limit: 37}) {
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

func load(t testing.TB, s *pgstore.Store, stream string) []eventstore.Event {
	t.Helper()
	events, err := s.LoadStream(context.Background(), stream)
	if err != nil {
		t.Fatal(err)
	}
	return events
}

// sameEvent compares every stored field, bytes and positions included.
func sameEvent(a, b eventstore.Event) bool {
	return a.StreamID == b.StreamID && a.Version == b.Version && a.Position == b.Position && a.ID == b.ID &&
		a.Type == b.Type && bytes.Equal(a.Data, b.Data) && a.ContentType == b.ContentType &&
		a.Metadata.Equal(b.Metadata) && a.RecordedAt.Equal(b.RecordedAt)
}

func sameEvents(t testing.TB, what string, got, want []eventstore.Event) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d events, want %d", what, len(got), len(want))
	}
	for i := range got {
		if !sameEvent(got[i], want[i]) {
			t.Fatalf("%s: event %d is %s v%d at %s, want %s v%d at %s (or its content differs)", what, i,
				got[i].StreamID, got[i].Version, got[i].Position, want[i].StreamID, want[i].Version, want[i].Position)
		}
	}
}

func listed(t testing.TB, s *pgstore.Store) map[string]eventstore.Version {
	t.Helper()
	out := map[string]eventstore.Version{}
	page, err := s.ListStreams(context.Background(), eventstore.ListStreamsOpts{Limit: 10000})
	if err != nil {
		t.Fatal(err)
	}
	for _, si := range page {
		out[si.StreamID] = si.Version
	}
	return out
}

func noProblems(t testing.TB, db *sqlx.DB, schema string) {
	t.Helper()
	problems, err := pgstore.Verify(context.Background(), db, schema)
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) > 0 {
		t.Fatalf("verify found %d problems, want none: %v", len(problems), problems)
	}
}

// TestArchiveRetentionTombstoneKeepOtherStreamsIntact archives, applies
// retention to and tombstones some streams among many, and checks that
// every other stream is unchanged byte for byte, the feed keeps its order
// minus exactly the retired events, a subscriber from the start sees exactly
// what is left, a consumer checkpointed before the actions continues with no
// gap, appends to retired streams are refused, a restore puts the events
// back where they were, every action is audited, and the hash chain still
// verifies.
func TestArchiveRetentionTombstoneKeepOtherStreamsIntact(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	store := newStore(t, db, pgstore.Config{})
	schema := store.Schema()

	// Interleave the streams so that the feed mixes them.
	counts := map[string]int{}
	for i := range 12 {
		counts[fmt.Sprintf("order-%d", i)] = 4
		counts[fmt.Sprintf("log-%d", i)] = 6
		counts[fmt.Sprintf("user-%d", i)] = 3
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for k := range counts {
			if !yield(k) {
				return
			}
		}
	})
	for round := range 6 {
		for _, s := range names {
			if round < counts[s] {
				govAppend(t, store, s, 1)
			}
		}
	}
	// Some user events are newer than the others, for the age limit.
	const gap = 600 * time.Millisecond
	time.Sleep(gap)
	lateFrom := time.Now()
	for _, s := range []string{"user-1", "user-2"} {
		govAppend(t, store, s, 1)
		counts[s]++
	}
	if _, err := pgstore.Seal(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	before := map[string][]eventstore.Event{}
	for _, s := range names {
		before[s] = load(t, store, s)
	}
	// The feed shows the last appends once every older transaction in the
	// cluster (other tests' too) has ended.
	total := 0
	for _, n := range counts {
		total += n
	}
	var fullFeed []eventstore.Event
	wait.Until(t, "every appended event in the feed", func() bool {
		fullFeed = feed(t, store, eventstore.Start)
		return len(fullFeed) == total
	})
	checkpoint := fullFeed[len(fullFeed)/2].Position

	// The actions.
	arch, err := pgstore.ArchiveStream(ctx, db, schema, "alice", "order-3")
	if err != nil || arch.Events != 4 || arch.Version != 4 || arch.AuditID == 0 {
		t.Fatalf("archive order-3: %+v, %v", arch, err)
	}
	if _, err := pgstore.ArchiveStream(ctx, db, schema, "alice", "order-7"); err != nil {
		t.Fatal(err)
	}
	plan, err := pgstore.PlanRetention(ctx, db, schema, pgstore.RetentionPolicy{Category: "log", MaxCount: 2})
	if err != nil || plan.Streams != 12 || plan.Events != 48 || plan.AuditID != 0 {
		t.Fatalf("plan: %+v, %v", plan, err)
	}
	if got := load(t, store, "log-0"); len(got) != 6 {
		t.Fatalf("a plan changed log-0: %d events", len(got))
	}
	ret, err := pgstore.ApplyRetention(ctx, db, schema, "bob", pgstore.RetentionPolicy{Category: "log", MaxCount: 2})
	if err != nil || ret.Streams != 12 || ret.Events != 48 || ret.AuditID == 0 || ret.Cuts[0].UpTo != 4 {
		t.Fatalf("retention: %+v, %v", ret, err)
	}
	again, err := pgstore.ApplyRetention(ctx, db, schema, "bob", pgstore.RetentionPolicy{Category: "log", MaxCount: 2})
	if err != nil || again.Events != 0 || again.AuditID != 0 {
		t.Fatalf("retention again: %+v, %v", again, err)
	}
	// By age: everything but the two late user events is older than the
	// cut, halfway through the gap before them. The age is counted from now:
	// the steps since the late appends (above all the wait for the feed) can
	// take longer than any fixed age on a loaded server.
	maxAge := time.Since(lateFrom) + gap/2
	aged, err := pgstore.ApplyRetention(ctx, db, schema, "bob", pgstore.RetentionPolicy{Category: "user", MaxAge: maxAge})
	if err != nil || aged.Streams != 12 || aged.Events != 36 || aged.OlderThan.IsZero() {
		t.Fatalf("retention by age: %+v, %v", aged, err)
	}
	tomb, err := pgstore.TombstoneStream(ctx, db, schema, "carol", "order-5")
	if err != nil || tomb.Events != 4 {
		t.Fatalf("tombstone order-5: %+v, %v", tomb, err)
	}
	tomb, err = pgstore.TombstoneStream(ctx, db, schema, "carol", "order-7") // archived first
	if err != nil || tomb.Events != 0 || tomb.ArchivedEvents != 4 {
		t.Fatalf("tombstone archived order-7: %+v, %v", tomb, err)
	}

	// What each stream shows now.
	removed := map[string]map[eventstore.Version]bool{}
	want := map[string][]eventstore.Event{}
	for _, s := range names {
		evs := before[s]
		switch {
		case s == "order-3" || s == "order-5" || s == "order-7":
			evs = nil
		case strings.HasPrefix(s, "log-"):
			evs = evs[4:]
		case strings.HasPrefix(s, "user-"):
			evs = evs[3:] // user-1 and user-2 keep their late event
		}
		want[s] = evs
		removed[s] = map[eventstore.Version]bool{}
		for _, e := range before[s] {
			if !slices.ContainsFunc(evs, func(k eventstore.Event) bool { return k.Version == e.Version }) {
				removed[s][e.Version] = true
			}
		}
	}
	lists := listed(t, store)
	for _, s := range names {
		sameEvents(t, s, load(t, store, s), want[s])
		v, err := store.StreamVersion(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		retired := s == "order-3" || s == "order-5" || s == "order-7"
		if wantV := eventstore.Version(counts[s]); retired && (v != 0 || lists[s] != 0) || !retired && (v != wantV || lists[s] != wantV) {
			t.Errorf("%s: StreamVersion %d, listed at %d", s, v, lists[s])
		}
	}
	var left []eventstore.Event
	for _, e := range fullFeed {
		if !removed[e.StreamID][e.Version] {
			left = append(left, e)
		}
	}
	sameEvents(t, "the feed", feed(t, store, eventstore.Start), left)
	// A consumer checkpointed before the actions continues with what is
	// left after its checkpoint, in order, with no gap.
	var afterCP []eventstore.Event
	for _, e := range left {
		if checkpoint.Less(e.Position) {
			afterCP = append(afterCP, e)
		}
	}
	sameEvents(t, "the feed after the checkpoint", feed(t, store, checkpoint), afterCP)
	// A subscriber from the start sees exactly what is left.
	subCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	var got []eventstore.Event
	err = eventstore.Subscribe(subCtx, store, eventstore.SubscribeOpts{PageSize: 50}, func(_ context.Context, e eventstore.Event) error {
		got = append(got, e)
		if len(got) == len(left) {
			cancel()
		}
		return nil
	})
	cancel()
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("subscription: %v", err)
	}
	sameEvents(t, "the subscriber", got, left)

	// Statuses and refusals.
	for s, wantState := range map[string]pgstore.StreamState{"order-3": pgstore.StreamArchived, "order-5": pgstore.StreamTombstoned,
		"order-7": pgstore.StreamTombstoned, "log-1": pgstore.StreamLive, "nope-1": pgstore.StreamAbsent} {
		st, err := pgstore.LookupStream(ctx, db, schema, s)
		if err != nil || st.State != wantState {
			t.Errorf("LookupStream(%s): %+v, %v; want %s", s, st, err, wantState)
		}
	}
	if st, _ := pgstore.LookupStream(ctx, db, schema, "order-3"); st.Version != 4 || st.ArchivedEvents != 4 || st.Events != 0 {
		t.Errorf("order-3: %+v", st)
	}
	if _, err := pgstore.ArchiveStream(ctx, db, schema, "alice", "order-3"); !errors.Is(err, pgstore.ErrStreamArchived) {
		t.Errorf("archiving an archived stream: %v", err)
	}
	if _, err := pgstore.ArchiveStream(ctx, db, schema, "alice", "order-5"); !errors.Is(err, pgstore.ErrStreamTombstoned) {
		t.Errorf("archiving a tombstoned stream: %v", err)
	}
	if _, err := pgstore.RestoreArchivedStream(ctx, db, schema, "alice", "order-5"); !errors.Is(err, pgstore.ErrStreamTombstoned) {
		t.Errorf("restoring a tombstoned stream: %v", err)
	}
	if _, err := pgstore.TombstoneStream(ctx, db, schema, "alice", "nope-1"); !errors.Is(err, pgstore.ErrStreamNotFound) {
		t.Errorf("tombstoning a stream never written: %v", err)
	}
	if _, err := pgstore.ArchiveStream(ctx, db, schema, "", "order-1"); !errors.Is(err, pgstore.ErrAdminAction) {
		t.Errorf("archiving without an actor: %v", err)
	}
	for _, s := range []string{"order-3", "order-5"} {
		_, err := store.Append(ctx, s, eventstore.Any, []eventstore.EventData{{Type: "Again"}})
		re, ok := pgstore.AsStreamRetired(err)
		if !ok || re.StreamID != s || (s == "order-3") != errors.Is(re, pgstore.ErrStreamArchived) ||
			(s == "order-5") != errors.Is(re, pgstore.ErrStreamTombstoned) {
			t.Errorf("appending to %s: %v (%+v)", s, err, re)
		}
	}
	noProblems(t, db, schema)

	// Restore: the events return where they were; appends continue after them.
	res, err := pgstore.RestoreArchivedStream(ctx, db, schema, "alice", "order-3")
	if err != nil || res.Events != 4 || res.Version != 4 {
		t.Fatalf("restore order-3: %+v, %v", res, err)
	}
	sameEvents(t, "restored order-3", load(t, store, "order-3"), before["order-3"])
	if _, err := pgstore.RestoreArchivedStream(ctx, db, schema, "alice", "log-2"); err != nil {
		t.Fatal(err)
	}
	sameEvents(t, "restored log-2", load(t, store, "log-2"), before["log-2"])
	if _, err := pgstore.RestoreArchivedStream(ctx, db, schema, "alice", "log-2"); !errors.Is(err, pgstore.ErrNothingArchived) {
		t.Errorf("restoring again: %v", err)
	}
	left = nil
	for _, e := range fullFeed {
		if e.StreamID == "order-3" || e.StreamID == "log-2" || !removed[e.StreamID][e.Version] {
			left = append(left, e)
		}
	}
	sameEvents(t, "the feed after the restores", feed(t, store, eventstore.Start), left)
	if r, err := store.Append(ctx, "order-3", eventstore.Exact(4), []eventstore.EventData{{Type: "Again"}}); err != nil || r.FirstVersion != 5 {
		t.Fatalf("appending to the restored stream: %+v, %v", r, err)
	}

	// The audit trail, newest first.
	trail, err := pgstore.Audit(ctx, db, schema, 100)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, a := range trail {
		actions = append(actions, a.Action+" "+a.Target+" "+a.Actor)
	}
	wantActions := []string{"unarchive log-2 alice", "unarchive order-3 alice", "tombstone order-7 carol", "tombstone order-5 carol",
		"retention user bob", "retention log bob", "archive order-7 alice", "archive order-3 alice"}
	if !slices.Equal(actions, wantActions) {
		t.Errorf("audit trail:\n%s\nwant\n%s", strings.Join(actions, "\n"), strings.Join(wantActions, "\n"))
	}
	var detail map[string]any
	if err := json.Unmarshal(trail[5].Detail, &detail); err != nil || detail["events"] != float64(48) || detail["streams"] != float64(12) ||
		detail["max_count"] != float64(2) {
		t.Errorf("retention detail %s (%v)", trail[5].Detail, err)
	}
	noProblems(t, db, schema)
	if _, err := pgstore.Seal(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	noProblems(t, db, schema)
}

// TestArchivedStreamRefusesAppendsInAGroup: with either driver and group
// commit on or off, an append to an archived or tombstoned stream fails
// with a StreamRetiredError, and appends to other streams committed in the
// same group go through.
func TestArchivedStreamRefusesAppendsInAGroup(t *testing.T) {
	for _, driver := range testdb.Drivers {
		for _, off := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/groupcommit=%v", driver, !off), func(t *testing.T) {
				ctx := context.Background()
				db := testdb.Open(t, driver)
				store := newStore(t, db, pgstore.Config{DisableGroupCommit: off})
				for _, s := range []string{"a-1", "a-2", "b-1"} {
					govAppend(t, store, s, 2)
				}
				if _, err := pgstore.ArchiveStream(ctx, db, store.Schema(), "ops", "a-1"); err != nil {
					t.Fatal(err)
				}
				if _, err := pgstore.TombstoneStream(ctx, db, store.Schema(), "ops", "a-2"); err != nil {
					t.Fatal(err)
				}
				var wg sync.WaitGroup
				errs := make([]error, 24)
				for i := range errs {
					wg.Go(func() {
						stream, exp := []string{"a-1", "a-2", "b-1"}[i%3], eventstore.Any
						if i%2 == 1 && stream != "b-1" {
							exp = eventstore.NoStream
						}
						_, errs[i] = store.Append(ctx, stream, exp, []eventstore.EventData{{Type: "More"}})
					})
				}
				wg.Wait()
				for i, err := range errs {
					re, ok := pgstore.AsStreamRetired(err)
					switch i % 3 {
					case 0:
						if !ok || !errors.Is(re, pgstore.ErrStreamArchived) || re.StreamID != "a-1" || !strings.Contains(err.Error(), "archived") {
							t.Errorf("append %d to archived a-1: %v", i, err)
						}
					case 1:
						if !ok || !errors.Is(re, pgstore.ErrStreamTombstoned) || re.StreamID != "a-2" {
							t.Errorf("append %d to tombstoned a-2: %v", i, err)
						}
					case 2:
						if err != nil {
							t.Errorf("append %d to b-1: %v", i, err)
						}
					}
				}
				if v, _ := store.StreamVersion(ctx, "b-1"); v != 10 {
					t.Errorf("b-1 at version %d, want 10", v)
				}
				// Through AppendTx, in the caller's transaction.
				tx, err := db.BeginTxx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				_, err = store.AppendTx(ctx, tx, "a-1", eventstore.Any, []eventstore.EventData{{Type: "More"}})
				_ = tx.Rollback()
				if re, ok := pgstore.AsStreamRetired(err); !ok || re.State != pgstore.StreamArchived {
					t.Errorf("AppendTx to archived a-1: %v", err)
				}
			})
		}
	}
}

// tamper runs stmt with the named immutability trigger of table disabled,
// as a superuser (or the table's owner) could.
func tamper(t *testing.T, db *sqlx.DB, schema, table, trigger, stmt string, args ...any) {
	t.Helper()
	q := `"` + schema + `".` + table
	tx := db.MustBegin()
	defer tx.Rollback() //nolint:errcheck
	tx.MustExec(`ALTER TABLE ` + q + ` DISABLE TRIGGER ` + trigger)
	if _, err := tx.Exec(strings.ReplaceAll(stmt, "{{schema}}", `"`+schema+`"`), args...); err != nil {
		t.Fatalf("tampering: %s: %v", stmt, err)
	}
	tx.MustExec(`ALTER TABLE ` + q + ` ENABLE TRIGGER ` + trigger)
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

func kinds(problems []pgstore.VerifyProblem) []string {
	var out []string
	for _, p := range problems {
		s := p.Kind
		if p.Tenant != "" {
			s += " " + p.Tenant + ":"
		} else if p.StreamID != "" {
			s += " "
		}
		if p.StreamID != "" {
			s += fmt.Sprintf("%s v%d", p.StreamID, p.Version)
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// TestVerifyCatchesTampering changes sealed history behind the triggers'
// back, one way at a time, and checks that Verify names each change, and
// that undoing it makes the history verify again.
func TestVerifyCatchesTampering(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	store := newStore(t, db, pgstore.Config{})
	schema := store.Schema()
	for i := range 8 {
		govAppend(t, store, fmt.Sprintf("acct-%d", i), 5)
	}
	noProblems(t, db, schema) // nothing sealed: nothing to find
	first, err := pgstore.Seal(ctx, db, schema)
	if err != nil || first.Seals != 1 || first.Events != 40 || first.SealID != 1 || len(first.Digest) != 64 {
		t.Fatalf("seal: %+v, %v", first, err)
	}
	if again, err := pgstore.Seal(ctx, db, schema); err != nil || again.Seals != 0 || again.Digest != first.Digest {
		t.Fatalf("sealing nothing new: %+v, %v", again, err)
	}
	// History changes that are allowed keep it verifiable.
	if _, err := pgstore.ArchiveStream(ctx, db, schema, "ops", "acct-6"); err != nil {
		t.Fatal(err)
	}
	if _, err := pgstore.TombstoneStream(ctx, db, schema, "ops", "acct-7"); err != nil {
		t.Fatal(err)
	}
	govAppend(t, store, "acct-0", 2) // unsealed, and fine
	sealed, err := pgstore.Seal(ctx, db, schema)
	// The tombstone sealed the audit rows: this one has only the new events.
	if err != nil || sealed.Seals != 1 || sealed.Events != 2 || sealed.AuditRows != 0 {
		t.Fatalf("second seal: %+v, %v", sealed, err)
	}
	report, err := pgstore.VerifyHistory(ctx, db, schema, pgstore.VerifyOpts{Digest: first.Digest})
	if err != nil || len(report.Problems) > 0 || report.Seals != 3 || report.LatestDigest != sealed.Digest ||
		report.SealedEvents != 42 || report.UnsealedEvents != 0 || report.SealedAuditRows != 2 {
		t.Fatalf("verify: %+v, %v", report, err)
	}

	cases := []struct {
		name, table, trigger, do, undo string
		want                           []string
	}{
		{"data changed", "events", "events_immutable",
			`UPDATE {{schema}}.events SET data = '{"n": 999}' WHERE stream_id = 'acct-1' AND version = 2`,
			`UPDATE {{schema}}.events SET data = $1 WHERE stream_id = 'acct-1' AND version = 2`,
			[]string{"changed acct-1 v2"}},
		{"metadata changed", "events", "events_immutable",
			`UPDATE {{schema}}.events SET metadata = metadata || '{"correlation_id": "forged"}' WHERE stream_id = 'acct-2' AND version = 5`,
			"", []string{"changed acct-2 v5"}},
		{"recorded_at changed", "events", "events_immutable",
			`UPDATE {{schema}}.events SET recorded_at = recorded_at - interval '1 microsecond' WHERE stream_id = 'acct-3' AND version = 1`,
			"", []string{"changed acct-3 v1"}},
		{"type changed in the archive", "archived_events", "archived_events_immutable",
			`UPDATE {{schema}}.archived_events SET event_type = 'Forged' WHERE stream_id = 'acct-6' AND version = 3`,
			"", []string{"changed acct-6 v3"}},
		{"two events swapped", "events", "events_immutable",
			`UPDATE {{schema}}.events SET version = -2 WHERE stream_id = 'acct-4' AND version = 2;
			 UPDATE {{schema}}.events SET version = 2 WHERE stream_id = 'acct-4' AND version = 3;
			 UPDATE {{schema}}.events SET version = 3 WHERE stream_id = 'acct-4' AND version = -2`,
			"", []string{"changed acct-4 v2", "changed acct-4 v3"}},
		{"sealed event deleted", "events", "events_immutable",
			`DELETE FROM {{schema}}.events WHERE stream_id = 'acct-5' AND version = 3`,
			"", []string{"deleted acct-5 v3"}},
		{"last events deleted and the version lowered", "events", "events_immutable",
			`WITH d AS (DELETE FROM {{schema}}.events WHERE stream_id = 'acct-0' AND version > 5 RETURNING 1)
			 UPDATE {{schema}}.streams SET version = 5 WHERE stream_id = 'acct-0'`,
			"", []string{"deleted acct-0 v6", "deleted acct-0 v7"}},
		{"event inserted past the stream's version", "events", "events_immutable",
			`INSERT INTO {{schema}}.events (stream_id, version, category, event_id, event_type, content_type, data, metadata)
			 VALUES ('acct-1', 9, 'acct', gen_random_uuid(), 'Forged', 'application/json', '{}', '{}')`,
			"", []string{"out-of-chain acct-1 v9"}},
		{"event inserted into a tombstoned stream", "events", "events_immutable",
			`INSERT INTO {{schema}}.events (stream_id, version, category, event_id, event_type, content_type, data, metadata)
			 VALUES ('acct-7', 1, 'acct', gen_random_uuid(), 'Forged', 'application/json', '{}', '{}')`,
			"", []string{"out-of-chain acct-7 v1"}},
		{"event copied back out of the archive", "events", "events_immutable",
			`INSERT INTO {{schema}}.events (stream_id, version, category, event_id, event_type, content_type, data, metadata, recorded_at)
			 SELECT stream_id, version, category, event_id, event_type, content_type, data, metadata, recorded_at
			 FROM {{schema}}.archived_events WHERE stream_id = 'acct-6' AND version = 1`,
			"", []string{"out-of-chain acct-6 v1"}},
		{"a hash changed", "event_hashes", "event_hashes_immutable",
			`UPDATE {{schema}}.event_hashes SET hash = sha256(hash) WHERE stream_id = 'acct-2' AND version = 2`,
			"", []string{"changed acct-2 v2", "changed acct-2 v3"}},
		{"a hash deleted", "event_hashes", "event_hashes_immutable",
			`DELETE FROM {{schema}}.event_hashes WHERE stream_id = 'acct-3' AND version = 5`,
			"", []string{"chain-broken acct-3 v5", "seal"}},
		{"an audit row changed", "admin_audit", "admin_audit_immutable",
			`UPDATE {{schema}}.admin_audit SET actor = 'nobody' WHERE action = 'tombstone'`,
			"", []string{"audit-changed"}},
		{"an audit row deleted", "admin_audit", "admin_audit_immutable",
			`DELETE FROM {{schema}}.admin_audit WHERE action = 'archive'`,
			"", []string{"audit-deleted"}},
		{"a seal deleted", "chain_seals", "chain_seals_immutable",
			`DELETE FROM {{schema}}.chain_seals WHERE id = 2`,
			"", []string{"seal", "seal", "seal"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// Each case starts from the sealed history: take it apart in a
			// transaction that is rolled back afterwards.
			q := `"` + schema + `"`
			var saved []byte
			_ = db.QueryRow(`SELECT data FROM ` + q + `.events WHERE stream_id = 'acct-1' AND version = 2`).Scan(&saved)
			snapshot := snapshotSchema(t, db, schema)
			tamper(t, db, schema, c.table, c.trigger, c.do)
			problems, err := pgstore.Verify(ctx, db, schema)
			if err != nil {
				t.Fatal(err)
			}
			if got := kinds(problems); !slices.Equal(got, c.want) {
				t.Errorf("verify found %q, want %q\n%v", got, c.want, problems)
			}
			if c.undo != "" {
				tamper(t, db, schema, c.table, c.trigger, c.undo, saved)
				noProblems(t, db, schema)
			}
			restoreSchema(t, db, schema, snapshot)
			noProblems(t, db, schema)
		})
	}

	// Whoever can write every table can rewrite the whole chain: Verify
	// alone is then satisfied, but the digest kept outside is not.
	t.Run("whole chain rewritten", func(t *testing.T) {
		tamper(t, db, schema, "events", "events_immutable",
			`UPDATE {{schema}}.events SET data = '{"n": 999}' WHERE stream_id = 'acct-1' AND version = 2`)
		for _, tbl := range []string{"event_hashes", "audit_hashes", "chain_seals"} {
			tamper(t, db, schema, tbl, tbl+"_immutable", `DELETE FROM {{schema}}.`+tbl)
		}
		testdb.Exec(t, db, `DELETE FROM "`+schema+`".chain_heads`)
		if _, err := pgstore.Seal(ctx, db, schema); err != nil {
			t.Fatal(err)
		}
		noProblems(t, db, schema)
		report, err := pgstore.VerifyHistory(ctx, db, schema, pgstore.VerifyOpts{Digest: sealed.Digest})
		if err != nil {
			t.Fatal(err)
		}
		if got := kinds(report.Problems); !slices.Equal(got, []string{"digest-unknown"}) {
			t.Errorf("verify with the old digest: %v", report.Problems)
		}
		if _, err := pgstore.VerifyHistory(ctx, db, schema, pgstore.VerifyOpts{Digest: "zz"}); err == nil {
			t.Error("a malformed digest was accepted")
		}
	})
}

// snapshotSchema copies the tables Verify reads, so a case can put them back.
var verifiedTables = []string{"streams", "events", "archived_events", "retired_streams", "event_hashes", "audit_hashes",
	"chain_seals", "chain_heads", "admin_audit"}

func snapshotSchema(t *testing.T, db *sqlx.DB, schema string) string {
	t.Helper()
	backup := testdb.Schema(t, db)
	testdb.Exec(t, db, `CREATE SCHEMA "`+backup+`"`)
	for _, tbl := range verifiedTables {
		testdb.Exec(t, db, `CREATE TABLE "`+backup+`".`+tbl+` AS TABLE "`+schema+`".`+tbl)
	}
	return backup
}

func restoreSchema(t *testing.T, db *sqlx.DB, schema, backup string) {
	t.Helper()
	q := `"` + schema + `"`
	tx := db.MustBegin()
	defer tx.Rollback()                                         //nolint:errcheck
	tx.MustExec(`SET LOCAL session_replication_role = replica`) // superuser: no triggers
	for _, tbl := range verifiedTables {
		tx.MustExec(`DELETE FROM ` + q + `.` + tbl)
		over := ""
		if tbl == "events" || tbl == "admin_audit" {
			over = " OVERRIDING SYSTEM VALUE"
		}
		tx.MustExec(`INSERT INTO ` + q + `.` + tbl + over + ` SELECT * FROM "` + backup + `".` + tbl)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

// TestAuditRecordsMigrations: RecordMigration leaves a "migrate" row naming
// what was applied, and nothing when nothing was.
func TestAuditRecordsMigrations(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	res, err := pgstore.Migrate(ctx, db, schema)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pgstore.RecordMigration(ctx, db, schema, "deployer", res); err != nil {
		t.Fatal(err)
	}
	res2, err := pgstore.Migrate(ctx, db, schema)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := pgstore.RecordMigration(ctx, db, schema, "deployer", res2); err != nil || id != 0 {
		t.Fatalf("recording no migration: %d, %v", id, err)
	}
	trail, err := pgstore.Audit(ctx, db, schema, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(trail) != 1 || trail[0].Action != "migrate" || trail[0].Actor != "deployer" || trail[0].Target != schema {
		t.Fatalf("trail %+v", trail)
	}
	var detail struct {
		Applied []string
		Version int
	}
	if err := json.Unmarshal(trail[0].Detail, &detail); err != nil || detail.Version != res.Version ||
		len(detail.Applied) != len(res.Applied) || detail.Applied[0] != "0001_event_log" {
		t.Fatalf("detail %s (%v)", trail[0].Detail, err)
	}
}

// FuzzArchiveNames feeds arbitrary stream ids, category names and actors
// to every governance function: they are bound as parameters, never
// written into SQL, so the schema never changes and the other stream's
// events stay as they were.
func FuzzArchiveNames(f *testing.F) {
	for _, s := range []string{
		"order-1", "x'; DROP TABLE events; --", `x"; DROP SCHEMA pwned; --`, "x');CREATE/**/TABLE/**/pwned(i/**/int);--",
		`$$; CREATE TABLE pwned (i int); $$`, "a-\\'; CREATE TABLE pwned(i int);--", "é-ü\u00a0'", "-", "",
		strings.Repeat("a", 300), "a\x00b", "order", "log-1) OR (1=1",
	} {
		f.Add(s)
	}
	ctx := context.Background()
	db := testdb.Open(f, "postgres")
	schema := testdb.Schema(f, db)
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		f.Fatal(err)
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema, DisableGroupCommit: true})
	if err != nil {
		f.Fatal(err)
	}
	defer store.Close()
	const keep = "keep-zz9"
	govAppend(f, store, keep, 3)
	kept := load(f, store, keep)
	fingerprint := func(t testing.TB) string {
		var fp string
		err := db.QueryRow(`SELECT string_agg(x, ',' ORDER BY x) FROM (
			SELECT 'r:' || c.relname || ':' || c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1
			UNION ALL SELECT 'a:' || c.relname || '.' || a.attname || ':' || a.atttypid FROM pg_attribute a
			  JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
			  WHERE n.nspname = $1 AND a.attnum > 0 AND NOT a.attisdropped
			UNION ALL SELECT 'f:' || p.proname || ':' || md5(p.prosrc) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1
			UNION ALL SELECT 't:' || g.tgname || ':' || g.tgenabled::text FROM pg_trigger g
			  JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1
			UNION ALL SELECT 'pwned:' || relname FROM pg_class WHERE relname LIKE '%pwned%'
			UNION ALL SELECT 'pwned:' || nspname FROM pg_namespace WHERE nspname LIKE '%pwned%') s(x)`, schema).Scan(&fp)
		if err != nil {
			t.Fatal(err)
		}
		return fp
	}
	want := fingerprint(f)
	f.Fuzz(func(t *testing.T, name string) {
		if name == keep || eventstore.Category(name) == "keep" {
			return
		}
		// When the name is a valid stream id, give it events, so that each
		// action really moves rows named by it.
		if eventstore.ValidateStreamID(name) == nil {
			_, _ = store.Append(ctx, name, eventstore.Any, []eventstore.EventData{{Type: "T", Data: []byte(`{}`)}})
		}
		_, _ = pgstore.LookupStream(ctx, db, schema, name)
		_, _ = pgstore.ArchiveStream(ctx, db, schema, name, name)
		_, _ = pgstore.ListRetired(ctx, db, schema, name, 10)
		_, _ = pgstore.RestoreArchivedStream(ctx, db, schema, name, name)
		for _, p := range []pgstore.RetentionPolicy{{Category: name, MaxCount: 1}, {Category: name, MaxAge: time.Hour}} {
			_, _ = pgstore.PlanRetention(ctx, db, schema, p)
			_, _ = pgstore.ApplyRetention(ctx, db, schema, name, p)
		}
		_, _ = pgstore.TombstoneStream(ctx, db, schema, name, name)
		if got := fingerprint(t); got != want {
			t.Fatalf("the schema changed after %q:\n%s\nwant\n%s", name, got, want)
		}
		sameEvents(t, keep, load(t, store, keep), kept)
	})
}

// TestGovernanceLookupsSeek: the governance lookups of a stream (by id, in a
// schema bound to no tenant) read that stream's rows through the keys, which
// lead with the tenant since migration 0008, not the whole log.
func TestGovernanceLookupsSeek(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	store := newStore(t, db, pgstore.Config{})
	q := `"` + store.Schema() + `"`
	testdb.Exec(t, db,
		`INSERT INTO `+q+`.streams (stream_id, category, version, last_xid) SELECT 'order-'||i, 'order', 5, '1' FROM generate_series(1, 20000) i`,
		`INSERT INTO `+q+`.events (stream_id, version, category, event_id, event_type, content_type, data, metadata)
		 SELECT 'order-'||i, v, 'order', gen_random_uuid(), 't', 'application/json', '\x7b7d', '{}' FROM generate_series(1, 20000) i, generate_series(1, 5) v`,
		`ANALYZE `+q+`.events`, `ANALYZE `+q+`.streams`)
	// One connection, so its statistics are the ones flushed below.
	one, err := sqlx.Open(db.DriverName(), testdb.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	one.SetMaxOpenConns(1)
	rowsRead := func() int64 {
		t.Helper()
		testdb.Exec(t, one, `SELECT pg_stat_force_next_flush()`)
		var n int64
		if err := one.GetContext(ctx, &n, `SELECT (SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables
			         WHERE schemaname = $1 AND relname IN ('events', 'streams', 'snapshots'))
			      + (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
			         WHERE schemaname = $1 AND relname IN ('events', 'streams', 'snapshots'))`, store.Schema()); err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := rowsRead()
	for range 3 {
		st, err := pgstore.LookupStream(ctx, one, store.Schema(), "order-777")
		if err != nil || st.Events != 5 {
			t.Fatalf("LookupStream: %+v, %v", st, err)
		}
	}
	if read := rowsRead() - before; read > 1000 {
		t.Errorf("3 lookups of a 5-event stream read %d rows of the log's 120,000: not through the keys", read)
	}
}
