package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/gdpr"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestGdprForget: gdpr migrate creates the key schema; gdpr forget deletes
// one subject's key and nobody else's, records the action in the audit
// trail, says so when there was no key, and refuses to run without an actor
// or before the key schema exists.
func TestGdprForget(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			c, _ := newCLI(t, driver)
			db := testdb.Open(t, driver)
			ks := c.schema + "_keys"
			t.Cleanup(func() { _, _ = db.Exec(`DROP SCHEMA IF EXISTS "` + ks + `" CASCADE`) })

			var out bytes.Buffer
			err := c.run(ctx, &out, "gdpr", "forget", "alice", "--actor", "ops")
			if err == nil || !strings.Contains(err.Error(), "stele gdpr migrate --key-schema "+ks) {
				t.Fatalf("forget before gdpr migrate: %v", err)
			}
			if got := c.mustRun("gdpr", "migrate"); !strings.Contains(got, "key schema "+ks+" is up to date") {
				t.Fatalf("gdpr migrate said %q", got)
			}
			c.mustRun("gdpr", "migrate") // again: nothing to do

			keys, err := gdpr.NewPostgresKeyStore(db, ks, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{"alice", "bob"} {
				if _, err := keys.Create(ctx, s); err != nil {
					t.Fatal(err)
				}
			}

			if err := c.run(ctx, &out, "gdpr", "forget", "alice"); err == nil || !strings.Contains(err.Error(), "--actor is required") {
				t.Fatalf("forget without --actor: %v", err)
			}
			if err := c.run(ctx, &out, "gdpr", "forget", "a\x00b", "--actor", "ops"); !errors.Is(err, gdpr.ErrInvalidSubject) {
				t.Fatalf("forget of an invalid subject: %v", err)
			}
			if _, err := keys.Key(ctx, "alice"); err != nil {
				t.Fatal("a refused forget deleted the key")
			}

			got := c.mustRun("gdpr", "forget", "alice", "--actor", "dpo@example.com", "--vacuum-full")
			if !strings.Contains(got, `forgot subject "alice": key deleted (audit #`) || !strings.Contains(got, "VACUUM FULL") {
				t.Fatalf("forget said %q", got)
			}
			if _, err := keys.Key(ctx, "alice"); !errors.Is(err, gdpr.ErrNoKey) {
				t.Fatalf("alice's key after forget: %v", err)
			}
			if _, err := keys.Key(ctx, "bob"); err != nil {
				t.Fatalf("bob's key after alice's forget: %v", err)
			}
			got = c.mustRun("gdpr", "forget", "alice", "--actor", "dpo@example.com")
			if !strings.Contains(got, `subject "alice" had no key`) {
				t.Fatalf("second forget said %q", got)
			}
			trail, err := pgstore.Audit(ctx, db, c.schema, 10)
			if err != nil {
				t.Fatal(err)
			}
			var forgets int
			for _, e := range trail {
				if e.Action == "forget" {
					forgets++
					if e.Target != "alice" || e.Actor != "dpo@example.com" || !strings.Contains(string(e.Detail), ks) {
						t.Errorf("audit row %+v", e)
					}
				}
			}
			if forgets != 2 {
				t.Fatalf("%d forget rows in the audit trail, want 2: %+v", forgets, trail)
			}

			// An explicit key schema.
			other := c.schema + "_k2"
			t.Cleanup(func() { _, _ = db.Exec(`DROP SCHEMA IF EXISTS "` + other + `" CASCADE`) })
			c.mustRun("gdpr", "migrate", "--key-schema", other)
			if got := c.mustRun("gdpr", "forget", "bob", "--actor", "ops", "--key-schema", other); !strings.Contains(got, "had no key") {
				t.Fatalf("forget in another key schema said %q", got)
			}
			if _, err := keys.Key(ctx, "bob"); err != nil {
				t.Fatal("a forget in another key schema deleted bob's key here")
			}
			if err := c.run(ctx, &out, "gdpr", "migrate", "--key-schema", "Bad;Name"); err == nil {
				t.Fatal("an invalid key schema was accepted")
			}
		})
	}
}
