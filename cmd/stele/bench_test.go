package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stele-dev/stele/internal/bench"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestBenchSmoke runs every workload at a tiny scale on both stores and
// checks the output contract: one JSON object per workload with its figures.
// It measures nothing worth quoting.
func TestBenchSmoke(t *testing.T) {
	testdb.Open(t, "postgres") // skip or fail with a clear message when PostgreSQL is missing
	for _, store := range []string{"memory", "postgres"} {
		t.Run(store, func(t *testing.T) {
			var out bytes.Buffer
			root := newRootCmd()
			root.SetOut(&out)
			root.SetArgs([]string{"--dsn", testdb.DSN(), "bench", "--store", store, "--workload", "all", "--scale", "0.01", "--json"})
			if err := root.ExecuteContext(context.Background()); err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSpace(out.String()), "\n")
			if len(lines) != len(bench.Workloads) {
				t.Fatalf("%d lines, want one per workload:\n%s", len(lines), out.String())
			}
			for i, line := range lines {
				var s bench.Summary
				if err := json.Unmarshal([]byte(line), &s); err != nil {
					t.Fatalf("line %d is not JSON: %v", i, err)
				}
				if s.Workload != bench.Workloads[i] || s.Events <= 0 || s.EventsPerSec <= 0 || s.Seconds <= 0 || s.PeakRSSMB <= 0 {
					t.Errorf("line %d: %s", i, line)
				}
				if (s.Workload == "W1" || s.Workload == "W4") && (s.P50ms <= 0 || s.P99ms < s.P50ms) {
					t.Errorf("%s latency figures: %s", s.Workload, line)
				}
			}
		})
	}
	// The benchmark drops what it created.
	db := testdb.Open(t, "postgres")
	var left int
	if err := db.Get(&left, `SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'stele_bench_%'`); err != nil || left != 0 {
		t.Errorf("%d bench schemas left behind (%v)", left, err)
	}
}
