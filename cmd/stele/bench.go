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
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/bus/broker"
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
	var buses []string
	var opts bench.Options
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Run the standard workloads (W1–W8) and report throughput and latency",
		Long: `Run the standard workloads of BENCHMARK.md. Each run of a workload uses a fresh
schema (created and dropped here) or a fresh in-memory store. With --runs N the median of N
runs is reported; with --raw-limit PATH the raw-PostgreSQL limit is measured first by that
script (../shared/bench/raw-limit.sh) and each figure is also given as a ratio to it.
With --json, one JSON object per workload is printed on a line of its own.

W7 (outbox relay) runs once per --bus: a consumer in group "w7" subscribes to a fresh
topic, a relay publishes the feed to it, and 8 writers append 100,000 events
(--append-batch events per append). It reports delivered msgs/s (first append to last
message consumed) and append-to-consume p50/p99 (arrival minus the message's
recorded_at), every event id checked to have arrived; for the postgres bus also its
poll interval. Queues, exchanges, streams and keys it made on a broker are deleted.
Unpaced, the writers outrun most buses and the latency is mostly the backlog's age;
--append-rate paces them to read the latency below saturation (its lines say so).
W8 (sagas) starts 10,000 three-step sagas of local actions, one in ten failing at step
3 and compensating, and reports sagas/s (first start to last end) and p50/p99 saga
duration (saga.started to its end), every saga checked to have ended as expected.
W7 and W8 have no raw limit: with --raw-limit their lines carry the raw W1 events/s as
context only, and no ratio (a relayed message or a saga is not a single-row INSERT).`,
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
			if storeKind != "memory" && storeKind != "postgres" {
				return fmt.Errorf("--store %q: want memory or postgres", storeKind)
			}
			busList, err := bench.ParseBuses(buses)
			if err != nil {
				return err
			}
			allBuses := slices.ContainsFunc(buses, func(b string) bool {
				return slices.ContainsFunc(strings.Split(b, ","), func(v string) bool { return strings.EqualFold(strings.TrimSpace(v), "all") })
			})
			if storeKind == "memory" && slices.Contains(busList, "postgres") {
				if !allBuses {
					return errors.New("--bus postgres needs --store postgres (the bus lives in the bench's database)")
				}
				busList = slices.DeleteFunc(busList, func(b string) bool { return b == "postgres" })
				fmt.Fprintln(cmd.ErrOrStderr(), "bench: --store memory: W7 skips the postgres bus")
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
				perBus := []string{""}
				if name == "W7" {
					perBus = busList
				}
				for _, busURL := range perBus {
					o := opts
					o.Bus = busURL
					label := name
					if busURL != "" {
						label += " over " + bench.BusName(busURL)
					}
					var results []bench.Result
					for range runs {
						var res bench.Result
						var err error
						switch storeKind {
						case "memory":
							res, err = bench.RunWith(ctx, memstore.New(nil), bench.DB{}, name, scale, o)
							res.Store = "memory"
						case "postgres":
							c := cfg
							res, err = benchPostgres(ctx, g, name, scale, &c, o)
							res.Store, res.GroupCommit = "postgres/"+g.driver, groupCommit
							if g.tenant != "" {
								res.Store += "/tenant"
							}
						}
						if err != nil {
							return fmt.Errorf("%s: %w", label, err)
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
			}
			if !asJSON {
				printTable(w, summaries)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&workload, "workload", "all", "W1 to W8, or all")
	f.StringVar(&storeKind, "store", "postgres", "memory or postgres")
	f.Float64Var(&scale, "scale", 1, "multiply every workload's event count (0.1 for a smoke run; never quote those)")
	f.IntVar(&runs, "runs", 1, "run each workload N times and report the medians")
	f.StringVar(&rawLimit, "raw-limit", "", "measure the raw-PostgreSQL limit first with this script and report ratios to it (W7, W8: the raw W1 events/s as context, no ratio)")
	f.BoolVar(&asJSON, "json", false, "print one JSON object per workload (W7: per bus)")
	f.BoolVar(&groupCommit, "group-commit", true, "fold concurrent appends into shared commits (pgstore's default)")
	f.IntVar(&flushers, "group-commit-flushers", 0, "group commits in flight at once (0: pgstore's default)")
	f.DurationVar(&linger, "group-commit-linger", 0, "how long a flusher waits for the callers it just answered (0: pgstore's default; negative: off)")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a Go CPU profile of the client to this file")
	f.StringSliceVar(&buses, "bus", []string{"gochannel"}, "W7's buses, repeatable or comma-separated: gochannel, postgres (the bench's own --dsn), amqp://…, nats://…, redis://…, or all ("+strings.Join(bench.AllBuses, ", ")+")")
	f.DurationVar(&opts.PollInterval, "bus-poll-interval", broker.DefaultPollInterval, "W7: how often the postgres bus's subscriber polls when idle")
	f.IntVar(&opts.AppendBatch, "append-batch", bench.DefaultAppendBatch, "W7: events per append (8 writers)")
	f.Float64Var(&opts.AppendRate, "append-rate", 0, "W7: pace the writers to this many events/s in all, to read latency below saturation (0: unpaced, the standard W7)")
	f.IntVar(&opts.RelayBatch, "relay-batch", bench.DefaultRelayBatch, "W7: the relay's BatchSize (events read, published and checkpointed together)")
	f.IntVar(&opts.RelayLanes, "relay-lanes", bench.DefaultRelayLanes, "W7: the relay's Lanes (batches published in parallel by stream)")
	f.IntVar(&opts.SagaWorkers, "saga-workers", bench.DefaultSagaWorkers, "W8: sagas driven at once (saga.Config.Workers)")
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
// benchSchemaPrefix names the schemas a benchmark makes (and drops); a test
// sets its own, so it can check its run left none behind while other runs
// share the server.
var benchSchemaPrefix = "stele_bench_"

func benchPostgres(ctx context.Context, g *globalOpts, name string, scale float64, cfg *pgstore.Config, opts bench.Options) (bench.Result, error) {
	db, err := g.openDB(ctx)
	if err != nil {
		return bench.Result{}, err
	}
	defer db.Close()
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(32)
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	cfg.Schema = benchSchemaPrefix + hex.EncodeToString(b)
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
	if g.tenant != "" {
		// --tenant: the workload runs on a store bound to that tenant (one
		// transaction and SET LOCAL per group commit and per read).
		bound, err := store.ForTenant(g.tenant)
		if err != nil {
			return bench.Result{}, err
		}
		defer bound.Close()
		s = bound
	}
	return bench.RunWith(ctx, s, bench.DB{DB: db, Schema: cfg.Schema}, name, scale, opts)
}

// printTable prints W1–W6 in one table, then W7 (a row per bus) and W8 in
// tables of their own columns.
func printTable(w io.Writer, results []bench.Summary) {
	var std, w7, w8 []bench.Summary
	for _, r := range results {
		switch {
		case r.W7Result != nil:
			w7 = append(w7, r)
		case r.W8Result != nil:
			w8 = append(w8, r)
		default:
			std = append(std, r)
		}
	}
	raw := func(r bench.Summary) string {
		if r.RawW1EventsPerSec == nil {
			return "-"
		}
		return fmt.Sprintf("%.0f", *r.RawW1EventsPerSec)
	}
	sep := false
	if len(std) > 0 {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "workload\tstore\truns\tevents\tseconds\tevents/s\t× raw\tp50 ms\tp99 ms\tpeak RSS MB\t")
		for _, r := range std {
			ratio := "-"
			if r.RatioToRaw != nil {
				ratio = fmt.Sprintf("%.2f", *r.RatioToRaw)
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.2f\t%.0f\t%s\t%.2f\t%.2f\t%.0f\t\n", r.Workload, r.Store, r.Runs, r.Events, r.Seconds, r.EventsPerSec, ratio, r.P50ms, r.P99ms, r.PeakRSSMB)
		}
		tw.Flush()
		sep = true
	}
	if len(w7) > 0 {
		if sep {
			fmt.Fprintln(w)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "workload\tstore\tbus\truns\tmsgs\tseconds\tmsgs/s\tp50 ms\tp99 ms\tpoll ms\tdups\tappend s\tpace ev/s\twriters×batch\trelay batch\tlanes\traw W1 ev/s\tpeak RSS MB\t")
		for _, r := range w7 {
			poll, pace := "-", "-"
			if r.PollIntervalMs > 0 {
				poll = fmt.Sprintf("%.0f", r.PollIntervalMs)
			}
			if r.AppendRate > 0 {
				pace = fmt.Sprintf("%.0f", r.AppendRate)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%.2f\t%.0f\t%.2f\t%.2f\t%s\t%d\t%.2f\t%s\t%d×%d\t%d\t%d\t%s\t%.0f\t\n",
				r.Workload, r.Store, r.Bus, r.Runs, r.Delivered, r.Seconds, r.MsgsPerSec, r.P50ms, r.P99ms, poll, r.Duplicates,
				r.AppendSeconds, pace, r.Writers, r.AppendBatch, r.RelayBatch, r.RelayLanes, raw(r), r.PeakRSSMB)
		}
		tw.Flush()
		sep = true
	}
	if len(w8) > 0 {
		if sep {
			fmt.Fprintln(w)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "workload\tstore\truns\tsagas\tcompensated\tevents\tseconds\tsagas/s\tp50 ms\tp99 ms\tstarts span s\tworkers\traw W1 ev/s\tpeak RSS MB\t")
		for _, r := range w8 {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%.2f\t%.0f\t%.2f\t%.2f\t%.2f\t%d\t%s\t%.0f\t\n",
				r.Workload, r.Store, r.Runs, r.Sagas, r.Compensated, r.Events, r.Seconds, r.SagasPerSec, r.P50ms, r.P99ms, r.StartSpanSeconds, r.SagaWorkers, raw(r), r.PeakRSSMB)
		}
		tw.Flush()
	}
}
