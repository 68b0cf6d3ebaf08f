package telemetry_test

import (
	"context"
	"testing"
	"time"

	"github.com/stele-dev/stele/internal/testdb"
)

// TestObservePostgres: a transaction holding a transaction id, left open,
// shows in stele.postgres.oldest_transaction.age, and its age grows.
// (Other tests on the same server may hold older transactions, so the test
// checks lower bounds only.)
func TestObservePostgres(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	o := newObserved(t)
	if err := o.tel.ObservePostgres(db); err != nil {
		t.Fatal(err)
	}
	age := func() float64 {
		t.Helper()
		m, ok := metrics(o.collect(t))["stele.postgres.oldest_transaction.age"]
		ps := points(m)
		if !ok || len(ps) != 1 || len(ps[0].attrs) != 0 || m.Unit != "s" {
			t.Fatalf("stele.postgres.oldest_transaction.age: %+v", m)
		}
		return ps[0].value
	}
	if a := age(); a < 0 {
		t.Fatalf("age %v before the transaction", a)
	}

	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	var xid int64
	if err := tx.GetContext(ctx, &xid, `SELECT txid_current()`); err != nil { // assigns it an id
		t.Fatal(err)
	}
	began := time.Now()
	time.Sleep(300 * time.Millisecond)
	first := age()
	if held := time.Since(began).Seconds(); first < 0.3 {
		t.Errorf("age %.3fs with a transaction open for at least %.3fs", first, held)
	}
	time.Sleep(300 * time.Millisecond)
	if second := age(); second < 0.6 {
		t.Errorf("age %.3fs after another 300ms, want at least 0.6s", second)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}
