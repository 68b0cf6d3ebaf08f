package pgstore

import (
	"context"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestMigration0009OnSealedSchema: a schema at version 8 holding a
// chain sealed in the pre-0009 format (tenant ” only, rows written straight
// into event_hashes, chain_heads and chain_seals, whose immutability
// triggers are in place) takes migration 0009: the rows survive with tenant
// ”, the chain verifies as it was, the digest kept outside still matches,
// and sealing continues over a tenant's streams afterwards.
func TestMigration0009OnSealedSchema(t *testing.T) {
	ctx := context.Background()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	q := quoteIdent(schema)
	testdb.Exec(t, db, `CREATE SCHEMA IF NOT EXISTS `+q,
		`CREATE TABLE IF NOT EXISTS `+q+`.schema_migrations (version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`)
	for _, m := range Migrations() {
		if m.Version > 8 {
			break
		}
		testdb.Exec(t, db, strings.ReplaceAll(m.sql, "{{schema}}", q))
		if _, err := db.Exec(`INSERT INTO `+q+`.schema_migrations VALUES ($1, $2)`, m.Version, m.Name); err != nil {
			t.Fatal(err)
		}
	}
	ids := []uuid.UUID{uuid.New(), uuid.New(), uuid.New()}
	testdb.Exec(t, db, `SELECT * FROM `+q+`.append_events('{order-1,order-2}', '{-2,-2}', '{2,1}', '{1,1}', '{1,1,2}', '{1,2,1}',
		ARRAY['`+ids[0].String()+`','`+ids[1].String()+`','`+ids[2].String()+`']::uuid[], '{placed,paid,placed}',
		'{application/json,application/json,application/json}', ARRAY['\x7b7d','\x7b7d','\x7b7d']::bytea[],
		ARRAY['{}','{}','{}']::jsonb[], false)`)

	// The chain as the release before 0009 sealed it.
	chain := func(tx *sqlx.Tx) (spans []sealSpan, hashes map[[2]any][]byte) {
		rows, err := tx.Query(`SELECT ` + chainEventCols + ` FROM ` + q + `.events ORDER BY stream_id, version`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		hashes = map[[2]any][]byte{}
		prev := map[string][]byte{}
		for rows.Next() {
			var e chainEvent
			if err := rows.Scan(&e.tenant, &e.streamID, &e.version, &e.category, &e.eventID, &e.typ, &e.contentType, &e.data, &e.meta, &e.micros); err != nil {
				t.Fatal(err)
			}
			p := prev[e.streamID]
			if p == nil {
				p = zeroHash
			}
			h := e.hash(p)
			prev[e.streamID] = h
			hashes[[2]any{e.streamID, e.version}] = h
			if len(spans) == 0 || spans[len(spans)-1].streamID != e.streamID {
				spans = append(spans, sealSpan{streamID: e.streamID, first: e.version})
			}
			spans[len(spans)-1].last, spans[len(spans)-1].head = e.version, h
		}
		return spans, hashes
	}
	tx := db.MustBegin()
	spans, hashes := chain(tx)
	digest := sealDigest(1, zeroHash, spans, sealSpan{})
	tx.MustExec(`INSERT INTO `+q+`.chain_seals (id, events, audit_rows, prev_digest, digest) VALUES (1, 3, 0, $1, $2)`, zeroHash, digest)
	for k, h := range hashes {
		tx.MustExec(`INSERT INTO `+q+`.event_hashes (stream_id, version, hash, seal_id) VALUES ($1, $2, $3, 1)`, k[0], k[1], h)
	}
	for _, s := range spans {
		tx.MustExec(`INSERT INTO `+q+`.chain_heads (stream_id, version, hash) VALUES ($1, $2, $3)`, s.streamID, s.last, s.head)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}

	if _, err := Migrate(ctx, db, schema); err != nil {
		t.Fatalf("0009 on a sealed schema: %v", err)
	}
	for table, want := range map[string]int{"event_hashes": 3, "chain_heads": 2, "chain_seals": 1} {
		var n int
		cond := ""
		if table != "chain_seals" {
			cond = ` WHERE tenant_id = ''`
		}
		if err := db.Get(&n, `SELECT count(*) FROM `+q+`.`+table+cond); err != nil || n != want {
			t.Errorf("%s after 0009: %d rows of tenant '' (%v), want %d", table, n, err, want)
		}
	}
	kept := hex.EncodeToString(digest)
	r, err := VerifyHistory(ctx, db, schema, VerifyOpts{Digest: kept})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Problems) > 0 || r.SealedEvents != 3 || r.LatestDigest != kept {
		t.Fatalf("the pre-0009 chain after 0009: %+v", r)
	}

	// Sealing goes on, over a tenant's stream of the same id too.
	s, err := New(db, &Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	acme, err := s.ForTenant("acme")
	if err != nil {
		t.Fatal(err)
	}
	defer acme.Close()
	if _, err := acme.Append(ctx, "order-1", eventstore.Any, []eventstore.EventData{{Type: "placed", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append(ctx, "order-1", eventstore.Any, []eventstore.EventData{{Type: "shipped", Data: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	res, err := Seal(ctx, db, schema)
	if err != nil || res.Events != 2 {
		t.Fatalf("seal after 0009: %+v, %v", res, err)
	}
	r, err = VerifyHistory(ctx, db, schema, VerifyOpts{Digest: kept})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Problems) > 0 || r.SealedEvents != 5 || r.Seals != 2 {
		t.Fatalf("after sealing on: %+v", r)
	}
}
