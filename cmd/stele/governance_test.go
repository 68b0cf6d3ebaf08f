package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// runErr runs stele and returns its output and error.
func (c cli) runErr(args ...string) (string, error) {
	var out bytes.Buffer
	err := c.run(context.Background(), &out, args...)
	return out.String(), err
}

// TestArchiveCLI archives, lists, restores and tombstones streams through
// the CLI, as an operator would.
func TestArchiveCLI(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			c, store := newCLI(t, driver)
			appendEvents(t, store, "order-1", "OrderPlaced", "OrderPaid")
			appendEvents(t, store, "order-2", "OrderPlaced")
			appendEvents(t, store, "customer-1", "CustomerRegistered")

			out := c.mustRun("archive", "stream", "order-1", "--actor", "alice")
			if !strings.HasPrefix(out, "archived order-1: 2 events moved to the archive, version 2 kept") {
				t.Errorf("archive printed %q", out)
			}
			assertRows(t, c.mustRun("streams", "ls"), [][]string{
				{"STREAM", "CATEGORY", "VERSION", "UPDATED_AT"},
				{"customer-1", "customer", "1"},
				{"order-2", "order", "1"},
			})
			assertRows(t, c.mustRun("archive", "ls"), [][]string{
				{"STREAM", "STATE", "VERSION", "EVENTS", "ARCHIVED_EVENTS", "RETIRED_AT"},
				{"order-1", "archived", "2", "0", "2"},
			})
			if _, err := store.Append(context.Background(), "order-1", eventstore.Any, []eventstore.EventData{{Type: "X"}}); !errors.Is(asRetired(err), pgstore.ErrStreamArchived) {
				t.Errorf("append to the archived stream: %v", err)
			}
			if _, err := c.runErr("archive", "stream", "order-1", "--actor", "alice"); !errors.Is(err, pgstore.ErrStreamArchived) {
				t.Errorf("archiving again: %v", err)
			}
			if _, err := c.runErr("archive", "stream", "order-9", "--actor", "alice"); !errors.Is(err, pgstore.ErrStreamNotFound) {
				t.Errorf("archiving a missing stream: %v", err)
			}

			out = c.mustRun("archive", "restore", "order-1", "--actor", "bob")
			if !strings.HasPrefix(out, "restored order-1: 2 events back in the log at their original positions, version 2") {
				t.Errorf("restore printed %q", out)
			}
			assertRows(t, c.mustRun("streams", "show", "order-1"), [][]string{
				{"VERSION", "POSITION", "TYPE", "RECORDED_AT", "METADATA", "DATA"},
				{"1"}, {"2"},
			})

			// Tombstone: nothing happens without --yes.
			out, err := c.runErr("tombstone", "order-2", "--actor", "carol")
			if err == nil || !strings.Contains(err.Error(), "--yes") {
				t.Errorf("tombstone without --yes: %v", err)
			}
			if v, _ := store.StreamVersion(context.Background(), "order-2"); v != 1 {
				t.Fatalf("tombstone without --yes changed order-2: version %d", v)
			}
			out = c.mustRun("tombstone", "order-2", "--actor", "carol", "--yes")
			if !strings.HasPrefix(out, "tombstoned order-2: 1 events deleted from the log and 0 from the archive") {
				t.Errorf("tombstone printed %q", out)
			}
			var row retiredJSON
			if err := json.Unmarshal([]byte(c.mustRun("archive", "ls", "--json", "--category", "order")), &row); err != nil {
				t.Fatal(err)
			}
			if row.StreamID != "order-2" || row.State != "tombstoned" || row.Version != 1 || row.Events != 0 || row.RetiredAt == nil {
				t.Errorf("archive ls --json: %+v", row)
			}
			if _, err := c.runErr("archive", "restore", "order-2", "--actor", "bob"); !errors.Is(err, pgstore.ErrStreamTombstoned) {
				t.Errorf("restoring a tombstoned stream: %v", err)
			}
			assertAudit(t, c.mustRun("audit", "--limit", "3"), [][]string{
				{"4", "carol", "postgres", "tombstone", "order-2"},
				{"3", "bob", "postgres", "unarchive", "order-1"},
				{"2", "alice", "postgres", "archive", "order-1"},
			})
		})
	}
}

// assertAudit checks `stele audit` output: the header, then rows whose
// fields, the AT column left out, start with want's.
func assertAudit(t *testing.T, out string, want [][]string) {
	t.Helper()
	var b strings.Builder
	for _, row := range fields(out) {
		if len(row) > 1 {
			row = append(row[:1:1], row[2:]...)
		}
		b.WriteString(strings.Join(row, " ") + "\n")
	}
	assertRows(t, b.String(), append([][]string{{"ID", "ACTOR", "ROLE", "ACTION", "TARGET", "DETAIL"}}, want...))
}

func asRetired(err error) error {
	if re, ok := pgstore.AsStreamRetired(err); ok {
		return re
	}
	return err
}

// TestRetentionCLI: --dry-run lists the cuts and changes nothing; apply
// archives them and says how many; bad policies are refused.
func TestRetentionCLI(t *testing.T) {
	c, store := newCLI(t, "postgres")
	for _, s := range []string{"log-1", "log-2"} {
		appendEvents(t, store, s, "A", "B", "C", "D", "E")
	}
	appendEvents(t, store, "log-3", "A")
	appendEvents(t, store, "order-1", "A", "B", "C", "D", "E")

	out := c.mustRun("retention", "apply", "--category", "log", "--max-count", "2", "--dry-run")
	assertRows(t, out, [][]string{
		{"dry", "run:", "retention", "of", "category", "log", "(max", "count", "2)", "would", "archive", "6", "events", "of", "2", "streams;"},
		{"STREAM", "UP_TO_VERSION", "EVENTS"},
		{"log-1", "3", "3"},
		{"log-2", "3", "3"},
	})
	if events, _ := eventstore.LoadStream(context.Background(), store, "log-1"); len(events) != 5 {
		t.Fatalf("a dry run archived events: %d left", len(events))
	}
	var plan retentionJSON
	if err := json.Unmarshal([]byte(c.mustRun("retention", "apply", "--category", "log", "--max-count", "2", "--dry-run", "--json")), &plan); err != nil {
		t.Fatal(err)
	}
	if !plan.DryRun || plan.Events != 6 || plan.Streams != 2 || len(plan.Cuts) != 2 || plan.Cuts[1] != (cutJSON{"log-2", 3, 3}) {
		t.Errorf("dry run --json: %+v", plan)
	}

	out = c.mustRun("retention", "apply", "--category", "log", "--max-count", "2", "--actor", "dana")
	if !strings.HasPrefix(out, "retention of category log (max count 2): archived 6 events of 2 streams (audit ") {
		t.Errorf("apply printed %q", out)
	}
	for s, want := range map[string]int{"log-1": 2, "log-2": 2, "log-3": 1, "order-1": 5} {
		if events, _ := eventstore.LoadStream(context.Background(), store, s); len(events) != want {
			t.Errorf("%s: %d events left, want %d", s, len(events), want)
		}
	}
	out = c.mustRun("retention", "apply", "--category", "log", "--max-count", "2", "--actor", "dana")
	if !strings.Contains(out, "nothing beyond the policy") {
		t.Errorf("second apply printed %q", out)
	}
	// By age, in JSON: everything is older than a microsecond.
	var aged retentionJSON
	if err := json.Unmarshal([]byte(c.mustRun("retention", "apply", "--category", "order", "--max-age", "1us", "--actor", "dana", "--json")), &aged); err != nil {
		t.Fatal(err)
	}
	if aged.DryRun || aged.Events != 5 || aged.AuditID == 0 || aged.MaxAge != "1µs" || aged.OlderThan == nil {
		t.Errorf("apply --json: %+v", aged)
	}
	assertAudit(t, c.mustRun("audit", "--limit", "2"), [][]string{
		{"3", "dana", "postgres", "retention", "order"},
		{"2", "dana", "postgres", "retention", "log"},
	})

	for _, args := range [][]string{
		{"retention", "apply", "--max-count", "2"},                        // no category
		{"retention", "apply", "--category", "log"},                       // no limit
		{"retention", "apply", "--category", "log-1", "--max-count", "1"}, // not a category
		{"retention", "apply", "--category", "log", "--max-count", "-1"},
		{"retention", "apply", "--category", "log", "--max-age", "soon"},
	} {
		if _, err := c.runErr(args...); err == nil {
			t.Errorf("stele %s: no error", strings.Join(args, " "))
		}
	}
}

// TestVerifyCLI: seal prints a digest; verify passes, then catches a
// changed event row (exit status 1), in text and JSON, and checks a digest.
func TestVerifyCLI(t *testing.T) {
	c, store := newCLI(t, "postgres")
	appendEvents(t, store, "order-1", "OrderPlaced", "OrderPaid")
	appendEvents(t, store, "order-2", "OrderPlaced")

	out := c.mustRun("verify")
	if !strings.Contains(out, "0 sealed events") || !strings.Contains(out, "3 events and 1 audit rows not sealed yet") || !strings.Contains(out, "ok:") {
		t.Errorf("verify before any seal printed %q", out)
	}
	var seal sealJSON
	if err := json.Unmarshal([]byte(c.mustRun("seal", "--json")), &seal); err != nil {
		t.Fatal(err)
	}
	if seal.Seals != 1 || seal.Events != 3 || seal.AuditRows != 1 || seal.SealID != 1 || len(seal.Digest) != 64 {
		t.Fatalf("seal --json: %+v", seal)
	}
	if out := c.mustRun("seal"); out != "nothing new to seal; seal 1, digest "+seal.Digest+"\n" {
		t.Errorf("second seal printed %q", out)
	}
	out = c.mustRun("verify", "--digest", seal.Digest)
	if !strings.Contains(out, "checked 1 seals, 3 sealed events, 1 sealed audit rows") || !strings.Contains(out, "ok: history is as sealed; latest digest "+seal.Digest) {
		t.Errorf("verify printed %q", out)
	}

	// Change a row behind the trigger's back, as a superuser could.
	db := testdb.Open(t, "postgres")
	q := `"` + c.schema + `".events`
	testdb.Exec(t, db, `ALTER TABLE `+q+` DISABLE TRIGGER events_immutable`,
		`UPDATE `+q+` SET data = '{"amount": 1000000}' WHERE stream_id = 'order-1' AND version = 2`,
		`ALTER TABLE `+q+` ENABLE TRIGGER events_immutable`)
	out, err := c.runErr("verify")
	if !errors.Is(err, errVerifyFailed) {
		t.Fatalf("verify of a changed row: %v\n%s", err, out)
	}
	if !strings.HasPrefix(out, `changed "order-1" v2: the event differs from what was sealed`) {
		t.Errorf("verify printed %q", out)
	}
	out, err = c.runErr("verify", "--json")
	var report verifyJSON
	if jerr := json.Unmarshal([]byte(out), &report); jerr != nil || err == nil {
		t.Fatalf("verify --json: %v, %v in %q", err, jerr, out)
	}
	if report.OK || len(report.Problems) != 1 || report.Problems[0].Kind != pgstore.ProblemChanged || report.Problems[0].StreamID != "order-1" ||
		report.Problems[0].Version != 2 || report.LatestDigest != seal.Digest {
		t.Errorf("verify --json: %+v", report)
	}
	if _, err := c.runErr("verify", "--digest", strings.Repeat("ab", 32)); !errors.Is(err, errVerifyFailed) {
		t.Errorf("verify with an unknown digest: %v", err)
	}
}

// TestAuditCLI: `stele migrate` leaves an audit row naming what it applied
// and who ran it, and `stele audit` prints the trail, newest first.
func TestAuditCLI(t *testing.T) {
	db := testdb.Open(t, "postgres")
	c := cli{t: t, driver: "postgres", schema: testdb.Schema(t, db)}
	c.mustRun("migrate", "--actor", "deployer")
	c.mustRun("migrate", "--actor", "deployer") // applies nothing: no row
	assertAudit(t, c.mustRun("audit"), [][]string{
		{"1", "deployer", "postgres", "migrate", c.schema},
	})
	var row struct {
		ID     int64  `json:"id"`
		Actor  string `json:"actor"`
		Action string `json:"action"`
		Detail struct {
			Applied []string `json:"applied"`
			Version int      `json:"version"`
		} `json:"detail"`
	}
	if err := json.Unmarshal([]byte(c.mustRun("audit", "--json")), &row); err != nil {
		t.Fatal(err)
	}
	all := pgstore.Migrations()
	if row.ID != 1 || row.Actor != "deployer" || row.Action != "migrate" || len(row.Detail.Applied) != len(all) ||
		row.Detail.Version != all[len(all)-1].Version {
		t.Errorf("audit --json: %+v", row)
	}
	store, err := pgstore.New(db, &pgstore.Config{Schema: c.schema})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	appendEvents(t, store, "order-1", "OrderPlaced")
	t.Setenv("STELE_ACTOR", "erin")
	c.mustRun("archive", "stream", "order-1")
	assertAudit(t, c.mustRun("audit", "--limit", "1"), [][]string{
		{"2", "erin", "postgres", "archive", "order-1", `{"events":`, "1,", `"version":`, "1}"},
	})
}
