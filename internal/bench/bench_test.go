package bench

import (
	"slices"
	"testing"
)

// TestBenchParseBuses: --bus takes repeats and comma lists, "all" is the
// five buses, repeats are dropped, and buses W7 cannot run or clean up after
// are refused.
func TestBenchParseBuses(t *testing.T) {
	got, err := ParseBuses([]string{"nats://127.0.0.1:4222, memory", "all", "Postgres"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"nats://127.0.0.1:4222", "gochannel", "postgres", "amqp://guest:guest@127.0.0.1:5672/", "redis://127.0.0.1:6379/0"}
	if !slices.Equal(got, want) {
		t.Errorf("ParseBuses = %v, want %v", got, want)
	}
	if got, err := ParseBuses(nil); err != nil || !slices.Equal(got, []string{"gochannel"}) {
		t.Errorf("ParseBuses(nil) = %v, %v; want the default gochannel", got, err)
	}
	for _, bad := range []string{"postgres://postgres@127.0.0.1/postgres", "kafka://127.0.0.1:9092", "pigeon", "ftp://x"} {
		if _, err := ParseBuses([]string{bad}); err == nil {
			t.Errorf("ParseBuses(%q): no error", bad)
		}
	}
	for b, name := range map[string]string{"gochannel": "gochannel", "memory": "gochannel", "postgres": "postgres",
		"amqp://guest:guest@h:5672/": "amqp", "nats://h:4222": "nats", "redis://h:6379/0": "redis"} {
		if got := BusName(b); got != name {
			t.Errorf("BusName(%q) = %q, want %q", b, got, name)
		}
	}
}

// TestBenchSummarizeW7W8: W7's and W8's own figures are medians too (the
// runs are left alone), duplicates the most seen, and a raw limit only adds
// the raw W1 events/s as context, never a ratio.
func TestBenchSummarizeW7W8(t *testing.T) {
	w7 := func(msgs, app float64, dups int) Result {
		return Result{Workload: "W7", EventsPerSec: msgs, W7Result: &W7Result{Bus: "nats", MsgsPerSec: msgs, AppendSeconds: app, Duplicates: dups}}
	}
	runs := []Result{w7(300, 3, 0), w7(100, 1, 5), w7(200, 2, 0)}
	s := Summarize(runs, &RawLimit{W1EventsPerSec: 5000})
	if s.MsgsPerSec != 200 || s.AppendSeconds != 2 || s.Duplicates != 5 || s.Bus != "nats" || s.EventsPerSec != 200 {
		t.Errorf("W7 summary %+v", *s.W7Result)
	}
	if runs[0].W7Result.MsgsPerSec != 300 {
		t.Error("Summarize changed a run")
	}
	if s.RatioToRaw != nil || s.RawW1EventsPerSec == nil || *s.RawW1EventsPerSec != 5000 {
		t.Errorf("W7 raw context: ratio %v, raw W1 %v", s.RatioToRaw, s.RawW1EventsPerSec)
	}
	w8 := func(sagas, span float64) Result {
		return Result{Workload: "W8", W8Result: &W8Result{Sagas: 10, SagasPerSec: sagas, StartSpanSeconds: span}}
	}
	s = Summarize([]Result{w8(1, 9), w8(3, 7), w8(2, 8)}, nil)
	if s.SagasPerSec != 2 || s.StartSpanSeconds != 8 || s.RawW1EventsPerSec != nil || s.W7Result != nil {
		t.Errorf("W8 summary %+v", *s.W8Result)
	}
}
