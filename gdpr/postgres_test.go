package gdpr_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/aggregate/pgsnapshot"
	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/gdpr"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/projection"
)

func TestMain(m *testing.M) { testdb.VerifyMain(m) }

// keySchema returns a keys schema for the test's store schema, migrated and
// dropped when the test ends.
func keySchema(t *testing.T, db *sqlx.DB, storeSchema string) string {
	t.Helper()
	ks := storeSchema + "_keys"
	t.Cleanup(func() {
		if _, err := db.Exec(`DROP SCHEMA IF EXISTS "` + ks + `" CASCADE`); err != nil {
			t.Errorf("dropping %s: %v", ks, err)
		}
	})
	for range 2 { // idempotent
		if err := gdpr.MigrateKeys(context.Background(), db, ks); err != nil {
			t.Fatal(err)
		}
	}
	return ks
}

// TestKeyStorePostgres: keys are created once however many callers race,
// wrapped when a wrapper is set, refused under another wrapper, deleted;
// the application role may read and create keys but never delete one.
func TestKeyStorePostgres(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			db := testdb.Open(t, driver)
			ks := keySchema(t, db, testdb.Schema(t, db))
			w, _ := gdpr.NewAESKeyWrapper("kek-1", bytes.Repeat([]byte{3}, gdpr.KeySize))
			keys, err := gdpr.NewPostgresKeyStore(db, ks, &gdpr.PostgresKeyStoreOptions{Wrapper: w})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := keys.Key(ctx, "s1"); !errors.Is(err, gdpr.ErrNoKey) {
				t.Fatalf("Key before Create: %v", err)
			}
			var wg sync.WaitGroup
			got := make([]gdpr.Key, 8)
			errs := make([]error, 8)
			for i := range got {
				wg.Go(func() { got[i], errs[i] = keys.Create(ctx, "s1") })
			}
			wg.Wait()
			for i := range got {
				if errs[i] != nil || got[i].ID != got[0].ID || !bytes.Equal(got[i].Material, got[0].Material) {
					t.Fatalf("racing Creates disagree: %v %v", errs[i], got[i].ID)
				}
			}
			var stored []byte
			var wrapping string
			if err := db.QueryRow(`SELECT key, wrapping FROM "`+ks+`".subject_keys WHERE subject = 's1'`).Scan(&stored, &wrapping); err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(stored, got[0].Material) || wrapping != "aes-gcm:kek-1" {
				t.Fatalf("the stored key is not wrapped (%q)", wrapping)
			}
			plainStore, _ := gdpr.NewPostgresKeyStore(db, ks, nil)
			if _, err := plainStore.Key(ctx, "s1"); err == nil || !strings.Contains(err.Error(), "kek-1") {
				t.Fatalf("a wrapped key read without its wrapper: %v", err)
			}
			if _, err := plainStore.Create(ctx, "s2"); err != nil {
				t.Fatal(err)
			}
			if k, err := keys.Key(ctx, "s2"); err != nil || len(k.Material) != gdpr.KeySize {
				t.Fatalf("an unwrapped key read by a store with a wrapper: %v", err)
			}
			if ok, err := keys.Delete(ctx, "s1"); !ok || err != nil {
				t.Fatalf("Delete: %v %v", ok, err)
			}
			if ok, err := keys.Delete(ctx, "s1"); ok || err != nil {
				t.Fatalf("second Delete: %v %v", ok, err)
			}
			if _, err := keys.Key(ctx, "s1"); !errors.Is(err, gdpr.ErrNoKey) {
				t.Fatalf("Key after Delete: %v", err)
			}

			// The application role: SELECT and INSERT, no DELETE, UPDATE or TRUNCATE.
			role := ks + "_app"
			grants, err := gdpr.KeyRoleGrants(ks, role)
			if err != nil {
				t.Fatal(err)
			}
			testdb.Exec(t, db, `CREATE ROLE "`+role+`" NOLOGIN`)
			t.Cleanup(func() {
				_, _ = db.Exec(`DROP OWNED BY "` + role + `"`)
				_, _ = db.Exec(`DROP ROLE IF EXISTS "` + role + `"`)
			})
			testdb.Exec(t, db, grants...)
			asApp := func(stmt string) error {
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				defer tx.Rollback()
				if _, err := tx.Exec(`SET LOCAL ROLE "` + role + `"`); err != nil {
					t.Fatal(err)
				}
				_, err = tx.Exec(stmt)
				return err
			}
			tbl := `"` + ks + `".subject_keys`
			if err := asApp(`SELECT count(*) FROM ` + tbl); err != nil {
				t.Fatalf("the app role cannot read keys: %v", err)
			}
			if err := asApp(`INSERT INTO ` + tbl + ` (subject, key_id, key) VALUES ('n', 'k', '\x00')`); err != nil {
				t.Fatalf("the app role cannot create keys: %v", err)
			}
			for _, stmt := range []string{`DELETE FROM ` + tbl, `UPDATE ` + tbl + ` SET key = '\x00'`, `TRUNCATE ` + tbl} {
				if err := asApp(stmt); err == nil || !strings.Contains(err.Error(), "permission denied") {
					t.Errorf("the app role ran %s: %v", stmt, err)
				}
			}
		})
	}
}

// The events of the end-to-end test. Photo is []byte; Note is personal data
// in an event no projection handles (it is parked as a dead letter).
type CustomerRegistered struct {
	CustomerID string `json:"customer_id"`
	Name       string `json:"name" personal:"subject=CustomerID"`
	Email      string `json:"email" personal:"subject=CustomerID"`
	Photo      []byte `json:"photo" personal:"subject=CustomerID"`
	Plan       string `json:"plan"`
}

type EmailChanged struct {
	CustomerID string `json:"customer_id"`
	Email      string `json:"email" personal:"subject=CustomerID"`
}

type CustomerFlagged struct {
	CustomerID string `json:"customer_id"`
	Note       string `json:"note" personal:"subject=CustomerID"`
}

// stateCodec encodes Customer snapshots, so they hold no plaintext either.
var stateCodec *gdpr.Protector

// Customer's state carries personal data too: its snapshots go through the
// Protector (aggregate.StateMarshaler), never plain JSON.
type Customer struct {
	aggregate.Root
	CustomerID string
	Name       string `personal:"subject=CustomerID"`
	Email      string `personal:"subject=CustomerID"`
	Plan       string
	Flags      int
}

func (c *Customer) Apply(e any) {
	switch e := e.(type) {
	case CustomerRegistered:
		c.CustomerID, c.Name, c.Email, c.Plan = e.CustomerID, e.Name, e.Email, e.Plan
	case EmailChanged:
		c.Email = e.Email
	case CustomerFlagged:
		c.Flags++
	}
}

func (c *Customer) MarshalState() ([]byte, error)    { return stateCodec.Marshal(c) }
func (c *Customer) UnmarshalState(data []byte) error { return stateCodec.Unmarshal(data, c) }

// person is one data subject's canary values.
type person struct {
	id, name, email, email2, note string
	photo                         []byte
}

func canary(id string) person {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	tag := hex.EncodeToString(b)
	return person{
		id:     id,
		name:   "Canary Name " + id + " " + tag,
		email:  id + ".canary." + tag + "@example.com",
		email2: id + ".second." + tag + "@example.org",
		note:   "canary note on " + id + " " + tag,
		photo:  []byte("\x89PNG canary photo of " + id + " " + tag),
	}
}

func (p person) values() map[string][]byte {
	return map[string][]byte{"name": []byte(p.name), "email": []byte(p.email), "email2": []byte(p.email2),
		"note": []byte(p.note), "photo": p.photo}
}

// needles are the forms in which value could sit in a row's text: itself;
// base64 at each of the three alignments it may have inside a longer base64
// text (a JSON []byte field); and each of those, and value, as hex, which is
// how bytea columns (event data, snapshots, payloads) print.
func needles(value []byte) []string {
	var text []string
	if utf8.Valid(value) && bytes.IndexByte(value, 0) < 0 { // else it cannot be in a text column
		text = append(text, string(value))
	}
	for shift := range 3 {
		padded := append(bytes.Repeat([]byte{0}, shift), value...)
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
			s := strings.TrimRight(enc.EncodeToString(padded), "=")
			// Drop the characters touched by the padding prefix and the
			// last (partial) group.
			start := (shift*8 + 5) / 6
			end := len(s) - 4
			if end-start >= 8 {
				text = append(text, s[start:end])
			}
		}
	}
	out := []string{hex.EncodeToString(value)}
	for _, n := range text {
		out = append(out, n, hex.EncodeToString([]byte(n)))
	}
	return out
}

// findAnywhere returns "schema.table: label" for every table or view of
// schemas whose rows, as text, contain one of the needles of a value.
func findAnywhere(t *testing.T, db *sqlx.DB, schemas []string, values map[string][]byte) []string {
	t.Helper()
	var tables []struct {
		Schema string `db:"table_schema"`
		Name   string `db:"table_name"`
	}
	q, args, err := sqlx.In(`SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema IN (?)`, schemas)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Select(&tables, db.Rebind(q), args...); err != nil {
		t.Fatal(err)
	}
	if len(tables) < 10 {
		t.Fatalf("only %d tables in %v", len(tables), schemas)
	}
	var hits []string
	for _, tb := range tables {
		for label, v := range values {
			var count int
			if err := db.Get(&count, `SELECT count(*) FROM "`+tb.Schema+`"."`+tb.Name+`" r
				WHERE EXISTS (SELECT FROM unnest($1::text[]) n WHERE strpos(r::text, n) > 0)`, pq.Array(needles(v))); err != nil {
				t.Fatalf("searching %s.%s: %v", tb.Schema, tb.Name, err)
			}
			if count > 0 {
				hits = append(hits, tb.Schema+"."+tb.Name+": "+label)
			}
		}
	}
	sort.Strings(hits)
	return hits
}

// customersTable writes slot of the customers read model.
func customersHandler(reg *codec.Registry, schema string) func(slot string) (any, error) {
	return func(slot string) (any, error) {
		tbl := `"` + schema + `".customers_` + slot
		return projection.TxHandlerFunc(func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
			v, err := reg.Decode(e)
			if err != nil {
				return err
			}
			switch v := v.(type) {
			case CustomerRegistered:
				_, err = tx.ExecContext(ctx, `INSERT INTO `+tbl+` (id, name, email, photo, plan) VALUES ($1, $2, $3, $4, $5)`,
					v.CustomerID, v.Name, v.Email, v.Photo, v.Plan)
			case EmailChanged:
				_, err = tx.ExecContext(ctx, `UPDATE `+tbl+` SET email = $2 WHERE id = $1`, v.CustomerID, v.Email)
			case CustomerFlagged:
				err = errors.New("flagged customers are reviewed by hand") // parked; says nothing personal
			}
			return err
		}), nil
	}
}

// TestForgetLeavesNoPlaintext is the crypto-shredding acceptance test on
// PostgreSQL. Two customers' personal data goes through every place stele
// keeps data: events (data and metadata), snapshots, a projection with its
// checkpoint, dead letters and the bus's poison box. Before the forget, the
// canaries are in plaintext only in the read model. After `forget alice`
// and a rebuild of the read model, no table of the store's schema or of the
// keys schema holds alice's plaintext (as text, hex or base64) or her key;
// bob's data still decrypts; the rebuilt projection and alice's aggregate
// show the placeholder; the forget is in the audit trail.
func TestForgetLeavesNoPlaintext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	db := testdb.Open(t, "postgres")
	schema := testdb.Schema(t, db)
	if _, err := pgstore.Migrate(ctx, db, schema); err != nil {
		t.Fatal(err)
	}
	ks := keySchema(t, db, schema)
	wrapper, _ := gdpr.NewAESKeyWrapper("kek-test", bytes.Repeat([]byte{9}, gdpr.KeySize))
	keys, err := gdpr.NewPostgresKeyStore(db, ks, &gdpr.PostgresKeyStoreOptions{Wrapper: wrapper})
	if err != nil {
		t.Fatal(err)
	}
	p := newProtector(t, keys, nil)
	stateCodec = p
	reg := codec.NewRegistry(p)
	codec.MustRegister[CustomerRegistered](reg, "customer.registered", 1)
	codec.MustRegister[EmailChanged](reg, "customer.email_changed", 1)
	codec.MustRegister[CustomerFlagged](reg, "customer.flagged", 1)

	store, err := pgstore.New(db, &pgstore.Config{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	snaps, err := pgsnapshot.New(db, schema)
	if err != nil {
		t.Fatal(err)
	}
	repo, err := aggregate.NewRepository[Customer](store, aggregate.Config{
		Category: "customer", Codec: reg, Snapshots: snaps, SnapshotEvery: 2,
	})
	if err != nil {
		t.Fatal(err)
	}

	alice, bob := canary("alice"), canary("bob")
	for _, c := range []person{alice, bob} {
		err := repo.Update(ctx, c.id, func(cu *Customer) error {
			aggregate.Record(cu, CustomerRegistered{CustomerID: c.id, Name: c.name, Email: c.email, Photo: c.photo, Plan: "gold"})
			aggregate.Record(cu, EmailChanged{CustomerID: c.id, Email: c.email2})
			aggregate.Record(cu, CustomerFlagged{CustomerID: c.id, Note: c.note})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var snapshots int
	if err := db.Get(&snapshots, `SELECT count(*) FROM "`+schema+`".snapshots`); err != nil || snapshots != 2 {
		t.Fatalf("%d snapshots (%v), want 2", snapshots, err)
	}

	// A poisoned bus message carrying alice's event, as the router would park it.
	ev, err := store.ReadStream(ctx, "customer-alice", eventstore.ReadStreamOpts{From: 1, Limit: 1})
	if err != nil || len(ev) != 1 {
		t.Fatalf("reading alice's first event: %v", err)
	}
	box, err := bus.NewPostgresPoisonBox(db, schema)
	if err != nil {
		t.Fatal(err)
	}
	msg := message.NewMessage(ev[0].ID.String(), ev[0].Data)
	msg.Metadata.Set(middleware.ReasonForPoisonedKey, "handler failed")
	msg.Metadata.Set(middleware.PoisonedTopicKey, "stele.events")
	msg.Metadata.Set(middleware.PoisonedHandlerKey, "mailer")
	if err := box.Publish(bus.PoisonTopic, msg); err != nil {
		t.Fatal(err)
	}

	// The read model, in slots: v1 now, v2 rebuilt after the forget.
	for _, slot := range []string{"v1", "v2"} {
		testdb.Exec(t, db, `CREATE TABLE "`+schema+`".customers_`+slot+` (id text PRIMARY KEY, name text, email text, photo bytea, plan text)`)
	}
	rcfg := projection.RebuildConfig{
		Config: projection.Config{
			Name: "customers", DB: db, Schema: schema, Policy: projection.PolicyPark,
			Retries: 1, Backoff: time.Millisecond, MaxBackoff: time.Millisecond,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		},
		Handler: customersHandler(reg, schema),
		Switch: func(ctx context.Context, tx *sqlx.Tx, slot string) error {
			_, err := tx.ExecContext(ctx, `CREATE OR REPLACE VIEW "`+schema+`".customers AS SELECT * FROM "`+schema+`".customers_`+slot)
			return err
		},
	}
	v1, err := projection.Rebuild(ctx, store, rcfg, "v1")
	if err != nil {
		t.Fatal(err)
	}
	defer v1.Stop(context.Background())
	caughtUp(t, store, v1, "customer-bob")
	var parked int
	if err := db.Get(&parked, `SELECT count(*) FROM "`+schema+`".projection_dead_letters`); err != nil || parked != 2 {
		t.Fatalf("%d dead letters (%v), want the 2 flagged events", parked, err)
	}

	schemas := []string{schema, ks}
	// Before: plaintext only in the read model (the table and its view).
	for _, hit := range findAnywhere(t, db, schemas, alice.values()) {
		if !strings.Contains(hit, ".customers") {
			t.Errorf("before the forget, plaintext outside the read model: %s", hit)
		}
	}
	if hits := findAnywhere(t, db, schemas, map[string][]byte{"email2": []byte(alice.email2)}); len(hits) != 2 {
		t.Fatalf("the search does not find the read model's canary: %v", hits)
	}
	aliceKey, err := keys.Key(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	var wrappedKey []byte
	if err := db.Get(&wrappedKey, `SELECT key FROM "`+ks+`".subject_keys WHERE subject = 'alice'`); err != nil {
		t.Fatal(err)
	}
	keyValues := map[string][]byte{"key material": aliceKey.Material, "wrapped key": wrappedKey}
	if hits := findAnywhere(t, db, schemas, keyValues); len(hits) != 1 || !strings.HasSuffix(hits[0], "subject_keys: wrapped key") {
		t.Fatalf("before the forget, the key is found at %v; want the wrapped key in subject_keys only", hits)
	}

	// Forget alice, through the audited admin path.
	res, err := gdpr.Forget(ctx, db, schema, ks, "dpo@example.com", "alice")
	if err != nil || !res.KeyDeleted {
		t.Fatalf("Forget: %+v %v", res, err)
	}
	if _, err := keys.Key(ctx, "alice"); !errors.Is(err, gdpr.ErrNoKey) {
		t.Fatalf("alice's key after the forget: %v", err)
	}
	trail, err := pgstore.Audit(ctx, db, schema, 10)
	if err != nil || len(trail) == 0 || trail[0].ID != res.AuditID || trail[0].Action != "forget" ||
		trail[0].Target != "alice" || trail[0].Actor != "dpo@example.com" {
		t.Fatalf("audit trail %+v (%v)", trail, err)
	}

	// Rebuild the read model into v2, then retire v1: dropping the old slot
	// is the application's part of a forget.
	v2, err := projection.Rebuild(ctx, store, rcfg, "v2")
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Stop(context.Background())
	caughtUp(t, store, v2, "customer-bob")
	if err := v1.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	testdb.Exec(t, db, `DROP TABLE "`+schema+`".customers_v1`)

	if hits := findAnywhere(t, db, schemas, alice.values()); len(hits) > 0 {
		t.Errorf("after the forget, alice's plaintext remains in %v", hits)
	}
	if hits := findAnywhere(t, db, schemas, keyValues); len(hits) > 0 {
		t.Errorf("after the forget, alice's key remains in %v", hits)
	}
	if hits := findAnywhere(t, db, schemas, map[string][]byte{"email2": []byte(bob.email2)}); len(hits) != 2 {
		t.Errorf("bob's read-model row should survive the rebuild: %v", hits)
	}

	type row struct {
		ID    string
		Name  string
		Email string
		Photo []byte
		Plan  string
	}
	var rows []row
	if err := db.Select(&rows, `SELECT id, name, email, photo, plan FROM "`+schema+`".customers ORDER BY id`); err != nil {
		t.Fatal(err)
	}
	want := []row{
		{ID: "alice", Name: gdpr.Erased, Email: gdpr.Erased, Photo: nil, Plan: "gold"},
		{ID: "bob", Name: bob.name, Email: bob.email2, Photo: bob.photo, Plan: "gold"},
	}
	if fmt.Sprint(rows) != fmt.Sprint(want) {
		t.Fatalf("rebuilt read model\n%v\nwant\n%v", rows, want)
	}

	// Aggregates still load, from their snapshots and the events after.
	a, err := repo.Load(ctx, "alice")
	if err != nil {
		t.Fatalf("loading a forgotten customer: %v", err)
	}
	if a.Name != gdpr.Erased || a.Email != gdpr.Erased || a.Plan != "gold" || a.Flags != 1 || a.Version() != 3 {
		t.Fatalf("alice after the forget: %+v v%d", *a, a.Version())
	}
	b, err := repo.Load(ctx, "bob")
	if err != nil || b.Name != bob.name || b.Email != bob.email2 || b.Flags != 1 {
		t.Fatalf("bob after alice's forget: %v %+v", err, b)
	}
	// Every stored event still decodes, without error.
	for e, err := range eventstore.IterAll(ctx, store, eventstore.ReadAllOpts{}) {
		if err != nil {
			t.Fatal(err)
		}
		if _, err := reg.Decode(e); err != nil {
			t.Fatalf("event %s/%d: %v", e.StreamID, e.Version, err)
		}
	}
	var keysLeft int
	if err := db.Get(&keysLeft, `SELECT count(*) FROM "`+ks+`".subject_keys`); err != nil || keysLeft != 1 {
		t.Fatalf("%d keys left (%v), want bob's", keysLeft, err)
	}
	// Forgetting again is audited and reports no key.
	if res, err := gdpr.Forget(ctx, db, schema, ks, "dpo@example.com", "alice"); err != nil || res.KeyDeleted {
		t.Fatalf("second forget: %+v %v", res, err)
	}
	if _, err := gdpr.Forget(ctx, db, schema, ks, "", "bob"); !errors.Is(err, pgstore.ErrAdminAction) {
		t.Fatalf("a forget without an actor: %v", err)
	}
	if err := keysStillThere(ctx, keys, "bob"); err != nil {
		t.Fatal(err)
	}
}

// caughtUp waits until r has handled the whole log (Rebuild switches up to
// a batch before that).
// caughtUp waits until r has handled the stream's last event. The feed's head
// alone is not enough: it shows an append only once every older transaction
// on the server (other tests' too) has ended, so it can lag the appends.
func caughtUp(t *testing.T, store eventstore.Store, r *projection.Runner, lastStream string) {
	t.Helper()
	ctx := context.Background()
	evs, err := store.ReadStream(ctx, lastStream, eventstore.ReadStreamOpts{Direction: eventstore.Backward, Limit: 1})
	if err != nil || len(evs) != 1 {
		t.Fatalf("reading the last event of %s: %v", lastStream, err)
	}
	last := evs[0].Position
	if err := eventstore.WaitForPosition(ctx, store, last); err != nil {
		t.Fatal(err)
	}
	wait.Until(t, "the projection to catch up", func() bool {
		st, err := r.Status(ctx)
		return err == nil && !st.Position.Less(last)
	})
}

func keysStillThere(ctx context.Context, keys gdpr.KeyStore, subject string) error {
	if _, err := keys.Key(ctx, subject); err != nil {
		return fmt.Errorf("%s's key: %w", subject, err)
	}
	return nil
}
