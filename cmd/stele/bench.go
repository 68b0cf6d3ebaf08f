package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime/pprof"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/memstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/bench"
)

func newBenchCmd(g *globalOpts) *cobra.Command {
	var workload, storeKind, rawLimit, cpuProfile string
	var scale float64
	var asJSON, groupCommit bool
	var flushers, runs int
	var linger time.Duration
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Run the standard workloads (W1–W6) and report throughput and latency",
		Long: `Run the standard workloads of BENCHMARK.md. Each run of a workload uses a fresh
schema (created and dropped here) or a fresh in-memory store. With --runs N the median of N
runs is reported; with --raw-limit PATH the raw-PostgreSQL limit is measured first by that
script (../shared/bench/raw-limit.sh) and each figure is also given as a ratio to it.
With --json, one JSON object per workload is printed on a line of its own.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			names := []string{strings.ToUpper(workload)}
			if strings.EqualFold(workload, "all") {
				names = bench.Workloads
			}
			if scale <= 0 || runs < 1 {
				return fmt.Errorf("--scale %g, --runs %d: both must be positive", scale, runs)
			}
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return err
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return err
				}
				defer pprof.StopCPUProfile()
			}
			w := cmd.OutOrStdout()
			var raw *bench.RawLimit
			if rawLimit != "" {
				var err error
				if raw, err = measureRawLimit(ctx, rawLimit); err != nil {
					return err
				}
				b, _ := json.Marshal(raw)
				fmt.Fprintf(cmd.ErrOrStderr(), "raw limit: %s\n", b)
			}
			cfg := pgstore.Config{DisableGroupCommit: !groupCommit, GroupCommitFlushers: flushers, GroupCommitLinger: linger}
			var summaries []bench.Summary
			for _, name := range names {
				var results []bench.Result
				for range runs {
					var res bench.Result
					var err error
					switch storeKind {
					case "memory":
						res, err = bench.Run(ctx, memstore.New(nil), bench.DB{}, name, scale)
						res.Store = "memory"
					case "postgres":
						c := cfg
						res, err = benchPostgres(ctx, g, name, scale, &c)
						res.Store, res.GroupCommit = "postgres/"+g.driver, groupCommit
					default:
						return fmt.Errorf("--store %q: want memory or postgres", storeKind)
					}
					if err != nil {
						return fmt.Errorf("%s: %w", name, err)
					}
					results = append(results, res)
				}
				sum := bench.Summarize(results, raw)
				if asJSON {
					b, _ := json.Marshal(sum)
					fmt.Fprintln(w, string(b))
				}
				summaries = append(summaries, sum)
			}
			if !asJSON {
				printTable(w, summaries)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&workload, "workload", "all", "W1 to W6, or all")
	f.StringVar(&storeKind, "store", "postgres", "memory or postgres")
	f.Float64Var(&scale, "scale", 1, "multiply every workload's event count (0.1 for a smoke run; never quote those)")
	f.IntVar(&runs, "runs", 1, "run each workload N times and report the medians")
	f.StringVar(&rawLimit, "raw-limit", "", "measure the raw-PostgreSQL limit first with this script and report ratios to it")
	f.BoolVar(&asJSON, "json", false, "print one JSON object per workload")
	f.BoolVar(&groupCommit, "group-commit", true, "fold concurrent appends into shared commits (pgstore's default)")
	f.IntVar(&flushers, "group-commit-flushers", 0, "group commits in flight at once (0: pgstore's default)")
	f.DurationVar(&linger, "group-commit-linger", 0, "how long a flusher waits for the callers it just answered (0: pgstore's default; negative: off)")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a Go CPU profile of the client to this file")
	return cmd
}

// measureRawLimit runs raw-limit.sh and reads the JSON line it prints.
func measureRawLimit(ctx context.Context, script string) (*bench.RawLimit, error) {
	out, err := exec.CommandContext(ctx, "bash", script).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil, fmt.Errorf("raw limit (%s): %w: %s", script, err, ee.Stderr)
		}
		return nil, fmt.Errorf("raw limit (%s): %w", script, err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	var raw bench.RawLimit
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &raw); err != nil {
		return nil, fmt.Errorf("raw limit (%s) printed %q: %w", script, out, err)
	}
	return &raw, nil
}

// benchPostgres runs one workload on a schema of its own, dropped afterwards.
func benchPostgres(ctx context.Context, g *globalOpts, name string, scale float64, cfg *pgstore.Config) (bench.Result, error) {
	db, err := g.openDB(ctx)
	if err != nil {
		return bench.Result{}, err
	}
	defer db.Close()
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(32)
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	cfg.Schema = "stele_bench_" + hex.EncodeToString(b)
	defer db.ExecContext(context.WithoutCancel(ctx), `DROP SCHEMA IF EXISTS "`+cfg.Schema+`" CASCADE`)
	if _, err := pgstore.Migrate(ctx, db, cfg.Schema); err != nil {
		return bench.Result{}, err
	}
	store, err := pgstore.New(db, cfg)
	if err != nil {
		return bench.Result{}, err
	}
	defer store.Close()
	var s eventstore.Store = store
	return bench.Run(ctx, s, bench.DB{DB: db, Schema: cfg.Schema}, name, scale)
}

func printTable(w io.Writer, results []bench.Summary) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tstore\truns\tevents\tseconds\tevents/s\t× raw\tp50 ms\tp99 ms\tpeak RSS MB\t")
	for _, r := range results {
		ratio := "-"
		if r.RatioToRaw != nil {
			ratio = fmt.Sprintf("%.2f", *r.RatioToRaw)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.2f\t%.0f\t%s\t%.2f\t%.2f\t%.0f\t\n", r.Workload, r.Store, r.Runs, r.Events, r.Seconds, r.EventsPerSec, ratio, r.P50ms, r.P99ms, r.PeakRSSMB)
	}
	tw.Flush()
}
