package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stele-dev/stele/internal/bench"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestBenchSmoke runs every workload at a tiny scale on both stores and
// checks the output contract: one JSON object per workload (W7: per bus)
// with its figures. It measures nothing worth quoting.
func TestBenchSmoke(t *testing.T) {
	testdb.Open(t, "postgres") // skip or fail with a clear message when PostgreSQL is missing
	prefix := fmt.Sprintf("stele_bench_t%d_", time.Now().UnixNano())
	benchSchemaPrefix = prefix
	defer func() { benchSchemaPrefix = "stele_bench_" }()
	for _, store := range []string{"memory", "postgres"} {
		t.Run(store, func(t *testing.T) {
			buses := []string{"gochannel"}
			if store == "postgres" {
				buses = append(buses, "postgres")
			}
			var out bytes.Buffer
			root := newRootCmd()
			root.SetOut(&out)
			root.SetArgs([]string{"--dsn", testdb.DSN(), "bench", "--store", store, "--workload", "all", "--scale", "0.01",
				"--bus", strings.Join(buses, ","), "--json"})
			if err := root.ExecuteContext(context.Background()); err != nil {
				t.Fatal(err)
			}
			// W1–W6, W7 once per bus, W8.
			var want []string
			for _, w := range bench.Workloads {
				if w == "W7" {
					for range buses {
						want = append(want, w)
					}
				} else {
					want = append(want, w)
				}
			}
			lines := strings.Split(strings.TrimSpace(out.String()), "\n")
			if len(lines) != len(want) {
				t.Fatalf("%d lines, want %d (one per workload, W7 per bus):\n%s", len(lines), len(want), out.String())
			}
			var w7Buses []string
			for i, line := range lines {
				var s bench.Summary
				if err := json.Unmarshal([]byte(line), &s); err != nil {
					t.Fatalf("line %d is not JSON: %v", i, err)
				}
				if s.Workload != want[i] || s.Events <= 0 || s.EventsPerSec <= 0 || s.Seconds <= 0 || s.PeakRSSMB <= 0 {
					t.Errorf("line %d: %s", i, line)
				}
				if (s.Workload == "W1" || s.Workload == "W4") && (s.P50ms <= 0 || s.P99ms < s.P50ms) {
					t.Errorf("%s latency figures: %s", s.Workload, line)
				}
				switch s.Workload {
				case "W7":
					checkW7(t, s, line)
					w7Buses = append(w7Buses, s.Bus)
				case "W8":
					checkW8(t, s, line)
				default:
					if s.W7Result != nil || s.W8Result != nil || strings.Contains(line, `"bus"`) || strings.Contains(line, `"sagas"`) {
						t.Errorf("%s carries W7/W8 fields: %s", s.Workload, line)
					}
				}
			}
			if !slices.Equal(w7Buses, buses) {
				t.Errorf("W7 ran over %v, want %v", w7Buses, buses)
			}
		})
	}
	// The readable form: a W7 row per bus with its own columns, the
	// postgres bus with its poll interval, and W8's table.
	t.Run("table", func(t *testing.T) {
		var out bytes.Buffer
		for _, w := range []string{"W7", "W8"} {
			root := newRootCmd()
			root.SetOut(&out)
			root.SetArgs([]string{"--dsn", testdb.DSN(), "bench", "--workload", w, "--scale", "0.01", "--bus", "postgres"})
			if err := root.ExecuteContext(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		if len(lines) != 4 {
			t.Fatalf("want a header and a row for W7 and for W8:\n%s", out.String())
		}
		for _, col := range []string{"bus", "msgs/s", "p50 ms", "p99 ms", "poll ms", "relay batch", "lanes", "writers×batch"} {
			if !strings.Contains(lines[0], col) {
				t.Errorf("W7 header lacks %q: %s", col, lines[0])
			}
		}
		if f := strings.Fields(lines[1]); len(f) < 10 || f[0] != "W7" || f[2] != "postgres" || f[4] != "800" || f[9] != "100" {
			t.Errorf("W7 row (want bus postgres, 800 msgs, poll 100 ms): %s", lines[1])
		}
		for _, col := range []string{"sagas", "compensated", "sagas/s", "p50 ms", "p99 ms", "workers"} {
			if !strings.Contains(lines[2], col) {
				t.Errorf("W8 header lacks %q: %s", col, lines[2])
			}
		}
		if f := strings.Fields(lines[3]); len(f) < 5 || f[0] != "W8" || f[3] != "100" || f[4] != "10" {
			t.Errorf("W8 row (want 100 sagas, 10 compensated): %s", lines[3])
		}
	})
	t.Run("refusals", func(t *testing.T) {
		for _, args := range [][]string{
			{"--store", "memory", "--workload", "W7", "--bus", "postgres"},
			{"--workload", "W7", "--bus", "postgres://postgres@127.0.0.1/postgres"},
			{"--workload", "W7", "--bus", "kafka://127.0.0.1:9092"},
			{"--workload", "W7", "--bus", "carrier-pigeon"},
		} {
			root := newRootCmd()
			root.SetOut(&bytes.Buffer{})
			root.SetArgs(append([]string{"--dsn", testdb.DSN(), "bench", "--scale", "0.01"}, args...))
			if err := root.ExecuteContext(context.Background()); err == nil {
				t.Errorf("bench %s: no error", strings.Join(args, " "))
			}
		}
	})
	// The benchmark drops what it created (other runs on the server have
	// their own prefix).
	db := testdb.Open(t, "postgres")
	var left int
	if err := db.Get(&left, `SELECT count(*) FROM pg_namespace WHERE starts_with(nspname, $1)`, prefix); err != nil || left != 0 {
		t.Errorf("%d bench schemas left behind (%v)", left, err)
	}
}

// checkW7: every event arrived once, over the bus asked for, with the
// settings used and latency figures; the postgres bus has its poll interval.
func checkW7(t *testing.T, s bench.Summary, line string) {
	t.Helper()
	for _, field := range []string{`"bus"`, `"msgs_per_sec"`, `"delivered"`, `"duplicates"`, `"p50_ms"`, `"p99_ms"`, `"writers"`, `"append_batch"`, `"relay_batch"`, `"relay_lanes"`} {
		if !strings.Contains(line, field) {
			t.Errorf("W7 line lacks %s: %s", field, line)
		}
	}
	w := s.W7Result
	if w == nil || w.Delivered != s.Events || s.Events < 800 || w.MsgsPerSec <= 0 || s.P50ms <= 0 || s.P99ms < s.P50ms ||
		w.Writers != 8 || w.AppendBatch <= 0 || w.RelayBatch <= 0 || w.RelayLanes <= 0 || w.AppendSeconds <= 0 {
		t.Errorf("W7 figures: %s", line)
		return
	}
	if (w.Bus == "postgres") != (w.PollIntervalMs == 100) {
		t.Errorf("W7 over %s: poll interval %g ms: %s", w.Bus, w.PollIntervalMs, line)
	}
}

// checkW8: 1% of 10,000 sagas, one in ten compensated, all ended.
func checkW8(t *testing.T, s bench.Summary, line string) {
	t.Helper()
	for _, field := range []string{`"sagas"`, `"sagas_per_sec"`, `"completed"`, `"compensated"`, `"p50_ms"`, `"p99_ms"`, `"saga_workers"`} {
		if !strings.Contains(line, field) {
			t.Errorf("W8 line lacks %s: %s", field, line)
		}
	}
	w := s.W8Result
	if w == nil || w.Sagas != 100 || w.Completed != 90 || w.Compensated != 10 || w.SagasPerSec <= 0 ||
		s.P50ms <= 0 || s.P99ms < s.P50ms || w.SagaWorkers <= 0 || s.Events < 9*w.Sagas {
		t.Errorf("W8 figures: %s", line)
	}
}
