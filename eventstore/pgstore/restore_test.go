package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/testsvc"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/outbox"
	"github.com/stele-dev/stele/projection"
)

// TestRestoreCheckUntouched: a schema that never left its cluster needs no
// repair, and a repair refuses.
func TestRestoreCheckUntouched(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	for i := range 5 {
		restoreAppend(t, store, fmt.Sprintf("acct-%d", i%2), 2)
	}
	st, err := pgstore.RestoreCheck(ctx, db, schema)
	if err != nil {
		t.Fatal(err)
	}
	if st.NeedsRepair || st.RewriteNeeded || st.IdentityChanged || st.EventsAhead != 0 || st.Events != 10 || st.Streams != 2 || len(st.Reasons()) != 0 {
		t.Fatalf("untouched schema: %+v, reasons %q", st, st.Reasons())
	}
	if _, err := pgstore.RestoreRepair(ctx, db, schema, "ops"); !errors.Is(err, pgstore.ErrNothingToRepair) {
		t.Fatalf("repair of an untouched schema: %v, want ErrNothingToRepair", err)
	}
	if trail, _ := pgstore.Audit(ctx, db, schema, 10); len(trail) != 0 {
		t.Fatalf("a refused repair left an audit row: %+v", trail)
	}
}

// TestRestoreRepairSimulated fakes a restore inside the test cluster (the
// recorded identity and every stored id moved far beyond this cluster's
// counter, through the audited path) and checks the repair's bookkeeping:
// the order kept, checkpoints moved, the per-stream guard, the audit row,
// RestoreMapPosition; and that an identity change alone only records it.
func TestRestoreRepairSimulated(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	q := `"` + schema + `"`
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	for range 3 {
		restoreInterleave(t, db, store, 4)
	}
	old := restoreReadAllOf(t, db, store, schema)
	cp := old[5].Position
	testdb.Exec(t, db, fmt.Sprintf(`INSERT INTO %s.projection_checkpoints (name, transaction_id, position) VALUES
		('mid', '%d', %d), ('fresh', '0', 0)`, q, cp.TxID, cp.GlobalPosition))

	// Identity only: nothing to rewrite, the repair records the identity.
	restoreFakeIdentity(t, db, schema, 0)
	// Ids from another cluster are left alone only once they are below every
	// running transaction; other sessions on the shared server may hold an
	// older one for a while.
	var st pgstore.RestoreStatus
	wait.Until(t, "the stored ids to fall below every running transaction", func() bool {
		if st, err = pgstore.RestoreCheck(ctx, db, schema); err != nil {
			t.Fatal(err)
		}
		return !st.RewriteNeeded
	})
	if !st.NeedsRepair || st.RewriteNeeded || !st.IdentityChanged {
		t.Fatalf("identity changed only: %+v", st)
	}
	res, err := pgstore.RestoreRepair(ctx, db, schema, "ops")
	if err != nil {
		t.Fatal(err)
	}
	if res.Rewritten || res.PreviousSystemID != "1234" || res.SystemID != st.SystemID {
		t.Fatalf("identity-only repair: %+v", res)
	}
	if got := restoreReadAllOf(t, db, store, schema); !samePositions(got, old) {
		t.Fatal("an identity-only repair changed the feed")
	}

	// A sealed history with an archived stream: its events sit in
	// archived_events with their old ids, and must come back in place.
	if _, err := pgstore.Seal(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	if _, err := pgstore.ArchiveStream(ctx, db, schema, "ops", "acct-3"); err != nil {
		t.Fatal(err)
	}

	// Every stored id far ahead, as after a restore from an older, busier cluster.
	const shift = 1 << 40
	restoreFakeIdentity(t, db, schema, shift)
	st, err = pgstore.RestoreCheck(ctx, db, schema)
	if err != nil {
		t.Fatal(err)
	}
	if !st.NeedsRepair || !st.RewriteNeeded || st.Events != int64(len(old)) || st.EventsAhead != st.Events || st.CheckpointsAhead != 1 || st.StreamsAhead != st.Streams {
		t.Fatalf("after the fake restore: %+v", st)
	}
	if page, err := store.ReadAll(ctx, eventstore.ReadAllOpts{}); err != nil || len(page) != 0 {
		t.Fatalf("the feed showed %d events with ids beyond the counter (%v); the test does not fake what it means to", len(page), err)
	}
	if st.AppendedHere != 0 {
		t.Fatalf("%d events taken for appends since the restore", st.AppendedHere)
	}
	// A writer started on the restored copy before the repair: refused.
	restoreAppend(t, store, "local-1", 2)
	if st, err = pgstore.RestoreCheck(ctx, db, schema); err != nil || st.AppendedHere != 2 {
		t.Fatalf("after 2 appends to the restored copy: %d appended here (%v)", st.AppendedHere, err)
	}
	if _, err = pgstore.RestoreRepair(ctx, db, schema, "ops"); !errors.Is(err, pgstore.ErrAppendedBeforeRepair) {
		t.Fatalf("repair with appends since the restore: %v, want ErrAppendedBeforeRepair", err)
	}
	if _, err := pgstore.TombstoneStream(ctx, db, schema, "ops", "local-1"); err != nil {
		t.Fatal(err)
	}
	res, err = pgstore.RestoreRepair(ctx, db, schema, "ops")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Rewritten || res.Events != int64(len(old)) || res.Runs < 2 || res.Runs > res.OldTransactions || res.BurnedXids != 0 {
		t.Fatalf("repair: %+v", res)
	}
	var live []eventstore.Event
	for _, e := range old {
		if e.StreamID != "acct-3" {
			live = append(live, e)
		}
	}
	if got := restoreReadAllOf(t, db, store, schema); !sameIDs(got, live) {
		t.Fatal("the repaired feed is not the old one (less the archived stream) in the old order")
	}
	if _, err := pgstore.RestoreArchivedStream(ctx, db, schema, "ops", "acct-3"); err != nil {
		t.Fatal(err)
	}
	got := restoreReadAllOf(t, db, store, schema)
	if !sameIDs(got, old) {
		t.Fatal("with the archived stream back, the repaired feed is not the old one in the old order")
	}
	if problems, err := pgstore.Verify(ctx, db, schema); err != nil || len(problems) != 0 {
		t.Fatalf("verify after the repair: %v (%v)", problems, err)
	}
	for i, e := range got {
		if e.Position.TxID > uint64(res.Runs) || e.Position.GlobalPosition != old[i].Position.GlobalPosition {
			t.Fatalf("event %d: %s, want an id in 1..%d and position %d", i, e.Position, res.Runs, old[i].Position.GlobalPosition)
		}
		shifted := eventstore.Position{TxID: old[i].Position.TxID + shift, GlobalPosition: old[i].Position.GlobalPosition}
		if m, err := pgstore.RestoreMapPosition(ctx, db, schema, shifted); err != nil || m != e.Position {
			t.Fatalf("RestoreMapPosition(%s) = %s (%v), want %s", shifted, m, err, e.Position)
		}
	}
	moved := map[string]eventstore.Position{}
	for _, c := range res.Moved {
		moved[c.Table+"/"+c.Key] = c.New
	}
	if moved["projection_checkpoints/mid"] != got[5].Position || moved["projection_checkpoints/fresh"] != eventstore.Start || len(moved) != 2 {
		t.Fatalf("moved checkpoints %v; want mid at %s and fresh at the start", moved, got[5].Position)
	}
	trail, err := pgstore.Audit(ctx, db, schema, 100)
	if err != nil {
		t.Fatal(err)
	}
	var entry *pgstore.AuditEntry
	for i := range trail {
		if trail[i].ID == res.AuditID {
			entry = &trail[i]
		}
	}
	if entry == nil || entry.Action != "restore-repair" || entry.Actor != "ops" ||
		!strings.Contains(string(entry.Detail), `"runs": `+strconv.FormatInt(res.Runs, 10)) {
		t.Fatalf("audit row %d of the repair: %+v", res.AuditID, entry)
	}
	t.Logf("audit detail: %s", entry.Detail)
	// Appends work again on old streams (the per-stream guard was mapped) and
	// come after every restored event.
	r := restoreAppend(t, store, "acct-0", 1)
	if !got[len(got)-1].Position.Less(r.FirstPosition) {
		t.Fatalf("new append at %s, not after the restored %s", r.FirstPosition, got[len(got)-1].Position)
	}
	if st, err = pgstore.RestoreCheck(ctx, db, schema); err != nil || st.NeedsRepair {
		t.Fatalf("after the repair: %+v (%v)", st, err)
	}
}

// restoreFakeIdentity records a made-up cluster identity and, with shift,
// moves every stored id beyond this cluster's counter, through Admin.
func restoreFakeIdentity(t *testing.T, db *sqlx.DB, schema string, shift uint64) {
	t.Helper()
	q := `"` + schema + `"`
	_, err := pgstore.Admin(context.Background(), db, schema, pgstore.AdminAction{Actor: "test", Action: "fake-restore"}, func(tx *sqlx.Tx) error {
		stmts := []string{`UPDATE ` + q + `.cluster_identity SET system_identifier = '1234'`}
		if shift > 0 {
			s := strconv.FormatUint(shift, 10)
			stmts = append(stmts,
				`UPDATE `+q+`.events SET transaction_id = (transaction_id::text::numeric + `+s+`)::text::xid8`,
				`UPDATE `+q+`.archived_events SET transaction_id = (transaction_id::text::numeric + `+s+`)::text::xid8`,
				`UPDATE `+q+`.streams SET last_xid = (last_xid::text::numeric + `+s+`)::text::xid8`,
				`UPDATE `+q+`.projection_checkpoints SET transaction_id = (transaction_id::text::numeric + `+s+`)::text::xid8 WHERE position > 0`)
		}
		for _, s := range stmts {
			if _, err := tx.Exec(s); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestRestoreIntoNewCluster is the backup and restore test issue 9 asks
// for: a schema with a busy history, a projection and a relay checkpointed
// part way, is dumped, restored into a second PostgreSQL cluster the test
// creates, checked and repaired; then a subscriber, the projection and the
// relay continue there with nothing lost and nothing repeated.
func TestRestoreIntoNewCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tools := restoreTools(t)
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	q := `"` + schema + `"`
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	testdb.Exec(t, db, `CREATE TABLE `+q+`.ledger (seq bigserial PRIMARY KEY, event_id uuid NOT NULL, cluster text NOT NULL)`)
	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()

	// History. Rounds of transactions that take their ids in one order and
	// write in the other make (transaction id, position) order differ from
	// position order; concurrent appends share group commits.
	phase := func() {
		for range 30 {
			restoreInterleave(t, db, store, 12)
		}
		var wg sync.WaitGroup
		for g := range 6 {
			wg.Go(func() {
				evs := []eventstore.EventData{{Type: "Placed", Data: []byte(`{}`)}, {Type: "Paid", Data: []byte(`{}`)}, {Type: "Sent", Data: []byte(`{}`)}}
				for range 8 {
					if _, err := store.Append(ctx, fmt.Sprintf("order-%d", g), eventstore.Any, evs); err != nil {
						t.Error(err) // not Fatal: another goroutine
						return
					}
				}
			})
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
	}
	phase()
	// The projection stops at a checkpoint that a later-committing,
	// lower-positioned event straddles.
	commitLate1 := restoreStraddle(t, db, store, "p")
	ledger := func(cluster string) projection.TxHandler {
		return projection.TxHandlerFunc(func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
			_, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.ledger (event_id, cluster) VALUES ($1, $2)`, e.ID, cluster)
			return err
		})
	}
	restoreRunProjection(ctx, t, store, db, schema, ledger("old"))
	commitLate1()
	phase()
	// The relay too, at another place.
	commitLate2 := restoreStraddle(t, db, store, "r")
	relayedOld := restoreRunRelay(ctx, t, store, db, schema)
	commitLate2()
	phase()

	old := restoreReadAllOf(t, db, store, schema)
	cpProj := restoreCheckpoint(t, db, schema, "projection_checkpoints", "ledger")
	cpRelay := restoreCheckpoint(t, db, schema, "outbox_relays", "to-broker")
	iProj, iRelay := indexOf(old, cpProj), indexOf(old, cpRelay)
	if iProj < 0 || iRelay <= iProj || iRelay >= len(old)-1 {
		t.Fatalf("checkpoints %s (#%d) and %s (#%d) of %d events: want both mid-feed, the relay's later", cpProj, iProj, cpRelay, iRelay, len(old))
	}
	// The test means something only if position order is not the feed
	// order, right after each checkpoint too.
	descents := 0
	for i := 1; i < len(old); i++ {
		if old[i].Position.GlobalPosition < old[i-1].Position.GlobalPosition {
			descents++
		}
	}
	if descents == 0 || !straddled(old, iProj) || !straddled(old, iRelay) {
		t.Fatalf("%d descents; an event after each checkpoint with a lower position: %v %v", descents, straddled(old, iProj), straddled(old, iRelay))
	}
	if !sameIDs(relayedOld, old[:iRelay+1]) {
		t.Fatalf("the relay published %d events before the dump, want the %d up to its checkpoint in order", len(relayedOld), iRelay+1)
	}
	if ids := restoreLedger(t, db, schema); !sameIDList(ids, old[:iProj+1]) {
		t.Fatalf("the projection handled %d events before the dump, want %d", len(ids), iProj+1)
	}
	if st, err := pgstore.RestoreCheck(ctx, db, schema); err != nil || st.NeedsRepair {
		t.Fatalf("the original schema: %+v (%v)", st, err)
	}
	t.Logf("old cluster: %d events, %d descents in position order, projection at #%d, relay at #%d", len(old), descents, iProj, iRelay)

	// Dump, and restore into a new cluster.
	cl := newCluster(t, tools)
	dump := filepath.Join(cl.dir, "stele.dump")
	tools.run(t, false, tools.pgDump, "--dbname="+testdb.DSN(), "--schema="+schema, "--format=custom", "--file="+dump)
	cl.exec(t, "CREATE DATABASE restored")
	tools.run(t, false, tools.pgRestore, "--dbname="+cl.dsn("restored"), "--exit-on-error", dump)
	db2, err := sqlx.Open("postgres", cl.dsn("restored"))
	if err != nil {
		t.Fatal(err)
	}
	defer db2.Close()
	store2, err := pgstore.New(db2, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer store2.Close()

	st, err := pgstore.RestoreCheck(ctx, db2, schema)
	if err != nil {
		t.Fatal(err)
	}
	if !st.NeedsRepair || !st.RewriteNeeded || !st.IdentityChanged || st.Events != int64(len(old)) || st.EventsAhead != st.Events ||
		st.CheckpointsAhead < 2 || st.StreamsAhead == 0 {
		t.Fatalf("restored schema: repair %v, rewrite %v, identity changed %v, %d events (want %d), %d ahead, %d checkpoints ahead, %d streams ahead",
			st.NeedsRepair, st.RewriteNeeded, st.IdentityChanged, st.Events, len(old), st.EventsAhead, st.CheckpointsAhead, st.StreamsAhead)
	}
	t.Logf("restore-check: %s", strings.Join(st.Reasons(), "; "))
	if page, err := store2.ReadAll(ctx, eventstore.ReadAllOpts{}); err != nil || len(page) != 0 {
		t.Fatalf("before the repair the feed showed %d events (%v); expected none (the failure being repaired)", len(page), err)
	}
	xminBefore := restoreXmin(t, db2)
	res, err := pgstore.RestoreRepair(ctx, db2, schema, "restore-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("repair: %d events, %d old transactions (%d..%d) -> ids 1..%d, %d ids burned (xmin was %d), %d streams, %d positions moved",
		res.Events, res.OldTransactions, res.OldMinTxID, res.OldMaxTxID, res.Runs, res.BurnedXids, xminBefore, res.Streams, len(res.Moved))
	if !res.Rewritten || res.Events != int64(len(old)) || res.Runs > res.OldTransactions || res.Runs <= int64(descents) {
		t.Fatalf("repair: %+v", res)
	}
	if (uint64(res.Runs) >= xminBefore) != (res.BurnedXids > 0) {
		t.Fatalf("%d runs with xmin %d before: burned %d ids", res.Runs, xminBefore, res.BurnedXids)
	}
	if st, err := pgstore.RestoreCheck(ctx, db2, schema); err != nil || st.NeedsRepair {
		t.Fatalf("after the repair: %+v (%v)", st, err)
	}
	if trail, err := pgstore.Audit(ctx, db2, schema, 1); err != nil || len(trail) != 1 || trail[0].Action != "restore-repair" || trail[0].Actor != "restore-test" {
		t.Fatalf("audit %+v (%v)", trail, err)
	}

	// A subscriber from the start: every event once, in the old order.
	got := restoreSubscribe(ctx, t, store2, len(old))
	if !sameIDs(got, old) {
		t.Fatal("a subscriber from the start did not see the old feed, event for event")
	}
	for i := range got {
		if got[i].Position.GlobalPosition != old[i].Position.GlobalPosition {
			t.Fatalf("event %d moved from position %d to %d", i, old[i].Position.GlobalPosition, got[i].Position.GlobalPosition)
		}
	}
	if cp := restoreCheckpoint(t, db2, schema, "projection_checkpoints", "ledger"); cp != got[iProj].Position {
		t.Fatalf("projection checkpoint %s, want %s", cp, got[iProj].Position)
	}
	if cp := restoreCheckpoint(t, db2, schema, "outbox_relays", "to-broker"); cp != got[iRelay].Position {
		t.Fatalf("relay checkpoint %s, want %s", cp, got[iRelay].Position)
	}

	// The projection resumes: every event handled exactly once, in order.
	restoreRunProjection(ctx, t, store2, db2, schema, ledger("new"))
	if ids := restoreLedger(t, db2, schema); !sameIDList(ids, old) {
		t.Fatalf("the ledger holds %d rows for %d events, or not in feed order", len(ids), len(old))
	}
	var before, after int
	if err := db2.QueryRowContext(ctx, `SELECT count(*) FILTER (WHERE cluster = 'old'), count(*) FILTER (WHERE cluster = 'new') FROM `+q+`.ledger`).
		Scan(&before, &after); err != nil || before != iProj+1 || after != len(old)-iProj-1 {
		t.Fatalf("ledger: %d rows from before the dump, %d after (%v); want %d and %d", before, after, err, iProj+1, len(old)-iProj-1)
	}

	// The relay resumes: exactly the events after its checkpoint.
	if relayed := restoreRunRelay(ctx, t, store2, db2, schema); !sameIDs(relayed, old[iRelay+1:]) {
		t.Fatalf("the relay published %d events after the restore, want the %d after its checkpoint in order", len(relayed), len(old)-iRelay-1)
	}

	// New appends, to an old stream and a new one, come after every
	// restored event.
	r1 := restoreAppend(t, store2, "acct-0", 1)
	r2 := restoreAppend(t, store2, "fresh-1", 1)
	all := restoreReadAll(t, store2)
	if len(all) != len(old)+2 || !sameIDs(all[:len(old)], old) || all[len(old)].Position != r1.FirstPosition || all[len(old)+1].Position != r2.FirstPosition {
		t.Fatalf("after new appends the feed has %d events; want the %d restored ones then the 2 new", len(all), len(old))
	}
	if !all[len(old)-1].Position.Less(r1.FirstPosition) {
		t.Fatalf("new append at %s, not after the restored %s", r1.FirstPosition, all[len(old)-1].Position)
	}

	// A dump restored into another database of the same cluster keeps
	// meaningful ids: nothing to repair, the feed whole.
	dump2 := filepath.Join(cl.dir, "stele2.dump")
	tools.run(t, false, tools.pgDump, "--dbname="+cl.dsn("restored"), "--schema="+schema, "--format=custom", "--file="+dump2)
	cl.exec(t, "CREATE DATABASE copy")
	tools.run(t, false, tools.pgRestore, "--dbname="+cl.dsn("copy"), "--exit-on-error", dump2)
	db3, err := sqlx.Open("postgres", cl.dsn("copy"))
	if err != nil {
		t.Fatal(err)
	}
	defer db3.Close()
	st, err = pgstore.RestoreCheck(ctx, db3, schema)
	if err != nil || st.NeedsRepair || !st.DatabaseChanged || st.Events != int64(len(all)) {
		t.Fatalf("copy in another database of the same cluster: repair %v, database changed %v, %d events of %d (%v)",
			st.NeedsRepair, st.DatabaseChanged, st.Events, len(all), err)
	}
	store3, err := pgstore.New(db3, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer store3.Close()
	if !samePositions(restoreReadAll(t, store3), all) {
		t.Fatal("the copy's feed differs")
	}
}

// --- workload ---

func restoreAppend(t *testing.T, s *pgstore.Store, stream string, n int) eventstore.AppendResult {
	t.Helper()
	evs := make([]eventstore.EventData, n)
	for i := range evs {
		evs[i] = eventstore.EventData{Type: "Booked", Data: []byte(`{"n":1}`)}
	}
	r, err := s.Append(context.Background(), stream, eventstore.Any, evs)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// restoreInterleave runs k transactions that take their ids in one order and
// append in the reverse one: positions fall as transaction ids rise.
func restoreInterleave(t *testing.T, db *sqlx.DB, s *pgstore.Store, k int) {
	t.Helper()
	ctx := context.Background()
	txs := make([]*sqlx.Tx, k)
	for i := range txs {
		tx, err := db.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback() //nolint:errcheck // committed below
		if _, err := tx.ExecContext(ctx, `SELECT pg_current_xact_id()`); err != nil {
			t.Fatal(err)
		}
		txs[i] = tx
	}
	for i := k - 1; i >= 0; i-- {
		evs := []eventstore.EventData{{Type: "Booked", Data: []byte(`{}`)}, {Type: "Booked", Data: []byte(`{}`)}}
		if _, err := s.AppendTx(ctx, txs[i], fmt.Sprintf("acct-%d", i), eventstore.Any, evs); err != nil {
			t.Fatal(err)
		}
	}
	for _, tx := range txs {
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
	}
}

// restoreStraddle commits a transaction B whose events come after those of
// a transaction E that took its id later and stays open: a consumer that
// catches up now stops at B, and E's events, with lower positions, come
// after that checkpoint once E commits (the returned func).
func restoreStraddle(t *testing.T, db *sqlx.DB, s *pgstore.Store, tag string) func() {
	t.Helper()
	ctx := context.Background()
	b, err := db.BeginTxx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	e, err := db.BeginTxx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tx := range []*sqlx.Tx{b, e} {
		if _, err := tx.ExecContext(ctx, `SELECT pg_current_xact_id()`); err != nil {
			t.Fatal(err)
		}
	}
	evs := []eventstore.EventData{{Type: "Late", Data: []byte(`{}`)}, {Type: "Late", Data: []byte(`{}`)}}
	if _, err := s.AppendTx(ctx, e, "late-"+tag, eventstore.Any, evs); err != nil {
		t.Fatal(err)
	}
	rb, err := s.AppendTx(ctx, b, "early-"+tag, eventstore.Any, evs)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	// Another session's older transaction on the shared server may hold
	// the feed back for a while; the consumer must stop exactly at B.
	wait.Until(t, "the feed's head to reach B", func() bool {
		head, err := s.Head(ctx)
		return err == nil && head == rb.LastPosition
	})
	committed := false
	t.Cleanup(func() {
		if !committed {
			_ = e.Rollback()
		}
	})
	return func() {
		t.Helper()
		committed = true
		if err := e.Commit(); err != nil {
			t.Fatal(err)
		}
	}
}

// --- consumers ---

// restoreRunProjection runs projection "ledger" until its checkpoint is the
// feed's head, then stops it.
func restoreRunProjection(ctx context.Context, t *testing.T, s *pgstore.Store, db *sqlx.DB, schema string, h projection.TxHandler) {
	t.Helper()
	r, err := projection.NewRunner(s, h, projection.Config{Name: "ledger", DB: db, Schema: schema, BatchSize: 7, LeaseRetry: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer r.Stop(context.Background()) //nolint:errcheck // stopping
	restoreWaitCaughtUp(ctx, t, s, db, schema, "projection_checkpoints", "ledger", func() error { return r.Err() })
}

// restoreRunRelay runs relay "to-broker" (one lane, so in feed order) to a
// GoChannel until its checkpoint is the feed's head, stops it, and returns
// what it published.
func restoreRunRelay(ctx context.Context, t *testing.T, s *pgstore.Store, db *sqlx.DB, schema string) []eventstore.Event {
	t.Helper()
	pubsub := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, watermill.NopLogger{})
	defer pubsub.Close()
	subCtx, stopSub := context.WithCancel(ctx)
	defer stopSub()
	msgs, err := pubsub.Subscribe(subCtx, "events")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got []eventstore.Event
	var consumed sync.WaitGroup
	consumed.Go(func() {
		for m := range msgs {
			id, err := uuid.Parse(m.UUID)
			mu.Lock()
			if err == nil {
				got = append(got, eventstore.Event{ID: id})
			}
			mu.Unlock()
			m.Ack()
		}
	})
	relay, err := outbox.NewRelay(s, outbox.Config{Name: "to-broker", Publisher: pubsub, Topic: "events", DB: db, Schema: schema,
		Lanes: 1, BatchSize: 13, LeaseTTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stopRelay := context.WithCancel(ctx)
	var runErr error
	var running sync.WaitGroup
	running.Go(func() { runErr = relay.Run(runCtx) })
	restoreWaitCaughtUp(ctx, t, s, db, schema, "outbox_relays", "to-broker", func() error { return nil })
	stopRelay()
	running.Wait()
	if !errors.Is(runErr, context.Canceled) {
		t.Fatalf("relay: %v", runErr)
	}
	stopSub()
	consumed.Wait()
	mu.Lock()
	defer mu.Unlock()
	return got
}

func restoreWaitCaughtUp(ctx context.Context, t *testing.T, s *pgstore.Store, db *sqlx.DB, schema, table, name string, failed func() error) {
	t.Helper()
	wait.Until(t, table+" "+name+" caught up with the head", func() bool {
		head, err := s.Head(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := failed(); err != nil {
			t.Fatalf("%s %s failed: %v", table, name, err)
		}
		cp, ok := restoreCheckpointOK(t, db, schema, table, name)
		return ok && cp == head
	})
}

func restoreCheckpointOK(t *testing.T, db *sqlx.DB, schema, table, name string) (eventstore.Position, bool) {
	t.Helper()
	var xid string
	var p eventstore.Position
	err := db.QueryRowContext(context.Background(), `SELECT transaction_id::text, position FROM "`+schema+`".`+table+` WHERE name = $1`, name).
		Scan(&xid, &p.GlobalPosition)
	if err != nil {
		return p, false
	}
	p.TxID, err = strconv.ParseUint(xid, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return p, true
}

func restoreCheckpoint(t *testing.T, db *sqlx.DB, schema, table, name string) eventstore.Position {
	t.Helper()
	p, ok := restoreCheckpointOK(t, db, schema, table, name)
	if !ok {
		t.Fatalf("no checkpoint for %s in %s", name, table)
	}
	return p
}

func restoreLedger(t *testing.T, db *sqlx.DB, schema string) []string {
	t.Helper()
	var ids []string
	if err := db.SelectContext(context.Background(), &ids, `SELECT event_id::text FROM "`+schema+`".ledger ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	return ids
}

// restoreSubscribe follows the feed with eventstore.Subscribe until it has
// seen want events.
func restoreSubscribe(ctx context.Context, t *testing.T, s eventstore.Store, want int) []eventstore.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var got []eventstore.Event
	err := eventstore.Subscribe(ctx, s, eventstore.SubscribeOpts{PageSize: 50}, func(_ context.Context, e eventstore.Event) error {
		got = append(got, e)
		if len(got) == want {
			cancel()
		}
		return nil
	})
	if len(got) != want || !errors.Is(err, context.Canceled) {
		t.Fatalf("subscriber saw %d of %d events (%v)", len(got), want, err)
	}
	return got
}

func restoreReadAll(t *testing.T, s *pgstore.Store) []eventstore.Event {
	t.Helper()
	var out []eventstore.Event
	after := eventstore.Start
	for {
		page, err := s.ReadAll(context.Background(), eventstore.ReadAllOpts{After: after, Limit: 500})
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			return out
		}
		out = append(out, page...)
		after = page[len(page)-1].Position
	}
}

// restoreReadAllOf reads the whole feed once every stored event shows in it
// (an older transaction of another session may hold it back for a while).
func restoreReadAllOf(t *testing.T, db *sqlx.DB, s *pgstore.Store, schema string) []eventstore.Event {
	t.Helper()
	var stored int
	if err := db.QueryRowContext(context.Background(), `SELECT count(*) FROM "`+schema+`".events`).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	var feed []eventstore.Event
	wait.Until(t, "the feed to show every stored event", func() bool {
		feed = restoreReadAll(t, s)
		return len(feed) == stored
	})
	return feed
}

func restoreXmin(t *testing.T, db *sqlx.DB) uint64 {
	t.Helper()
	var s string
	if err := db.QueryRowContext(context.Background(), `SELECT pg_snapshot_xmin(pg_current_snapshot())::text`).Scan(&s); err != nil {
		t.Fatal(err)
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// --- comparisons ---

func indexOf(feed []eventstore.Event, p eventstore.Position) int {
	for i, e := range feed {
		if e.Position == p {
			return i
		}
	}
	return -1
}

// straddled: some event after feed[i] has a lower global position, so a
// checkpoint there must not be compared by position alone.
func straddled(feed []eventstore.Event, i int) bool {
	for _, e := range feed[i+1:] {
		if e.Position.GlobalPosition < feed[i].Position.GlobalPosition {
			return true
		}
	}
	return false
}

func sameIDs(a, b []eventstore.Event) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].ID != b[i].ID {
			return false
		}
	}
	return true
}

func samePositions(a, b []eventstore.Event) bool {
	if !sameIDs(a, b) {
		return false
	}
	for i := range a {
		if a[i].Position != b[i].Position {
			return false
		}
	}
	return true
}

func sameIDList(ids []string, feed []eventstore.Event) bool {
	if len(ids) != len(feed) {
		return false
	}
	for i, e := range feed {
		if ids[i] != e.ID.String() {
			return false
		}
	}
	return true
}

// --- a PostgreSQL cluster of the test's own ---

type pgTools struct {
	initdb, pgCtl, pgDump, pgRestore, psql string
	asPostgres                             bool // running as root: run the server's tools as the postgres user
	uid, gid                               int
}

// restoreTools finds what creating a cluster needs, or skips the test (fails
// it when STELE_REQUIRE_SERVICES is set).
func restoreTools(t *testing.T) pgTools {
	t.Helper()
	missing := func(what string) {
		testsvc.Missing(t, "cannot create a second PostgreSQL cluster: "+what+" (install postgresql-15)")
	}
	bin := "/usr/lib/postgresql/15/bin/"
	tools := pgTools{initdb: bin + "initdb", pgCtl: bin + "pg_ctl", pgDump: bin + "pg_dump", pgRestore: bin + "pg_restore", psql: bin + "psql"}
	for _, p := range []string{tools.initdb, tools.pgCtl, tools.pgDump, tools.pgRestore, tools.psql} {
		if _, err := os.Stat(p); err != nil {
			missing(p + " not found")
		}
	}
	if os.Geteuid() == 0 {
		// initdb refuses to run as root.
		u, err := user.Lookup("postgres")
		if err != nil {
			missing("running as root and there is no postgres user to run initdb as")
		}
		if _, err := exec.LookPath("runuser"); err != nil {
			missing("running as root and runuser is not installed")
		}
		tools.asPostgres = true
		tools.uid, _ = strconv.Atoi(u.Uid)
		tools.gid, _ = strconv.Atoi(u.Gid)
	}
	return tools
}

func (p pgTools) run(t *testing.T, server bool, name string, args ...string) string {
	t.Helper()
	if server && p.asPostgres {
		args = append([]string{"-u", "postgres", "--", name}, args...)
		name = "runuser"
	}
	cmd := exec.Command(name, args...)
	cmd.Dir = os.TempDir()
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=10")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

type pgCluster struct {
	dir  string
	port int
	psql string
}

func (c *pgCluster) dsn(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.port, db)
}

func (c *pgCluster) exec(t *testing.T, sql string) {
	t.Helper()
	out, err := exec.Command(c.psql, "--dbname="+c.dsn("postgres"), "-v", "ON_ERROR_STOP=1", "-c", sql).CombinedOutput()
	if err != nil {
		t.Fatalf("psql %s: %v\n%s", sql, err, out)
	}
}

// newCluster creates and starts a PostgreSQL 15 cluster in a folder of the
// test's own on a free port, and stops it when the test ends.
func newCluster(t *testing.T, tools pgTools) *pgCluster {
	t.Helper()
	dir := t.TempDir()
	if tools.asPostgres {
		// The postgres user must reach the folder: open its parent (the
		// test's own temporary folder) and give it the folder.
		if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, tools.uid, tools.gid); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	data := filepath.Join(dir, "data")
	tools.run(t, true, tools.initdb, "--pgdata="+data, "--username=postgres", "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C")
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=40", port, dir)
	tools.run(t, true, tools.pgCtl, "--pgdata="+data, "--log="+filepath.Join(dir, "server.log"), "--options="+opts, "--wait", "--timeout=60", "start")
	t.Cleanup(func() {
		cmd := exec.Command(tools.pgCtl, "--pgdata="+data, "--mode=fast", "--wait", "stop")
		if tools.asPostgres {
			cmd = exec.Command("runuser", "-u", "postgres", "--", tools.pgCtl, "--pgdata="+data, "--mode=fast", "--wait", "stop")
		}
		cmd.Dir = os.TempDir()
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("stopping the test cluster: %v\n%s", err, out)
		}
	})
	return &pgCluster{dir: dir, port: port, psql: tools.psql}
}
