package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/testdb"
	"github.com/stele-dev/stele/internal/wait"
	"github.com/stele-dev/stele/saga"
)

var (
	errDeclined  = errors.New("card declined")
	errWarehouse = errors.New("the warehouse refuses releases")
)

var sagasHeader = []string{"DEFINITION", "ID", "STATUS", "STEP", "STARTED_AT", "UPDATED_AT", "REASON"}

// orderWorld is what the order saga acts on: each effect is applied once per
// idempotency key, as a well-behaved service does. The payment service
// declines order-2 and order-3; the charge of order-4 blocks until release
// is closed; the warehouse refuses to release order-3's stock until fixed.
type orderWorld struct {
	mu      sync.Mutex
	keys    map[string]bool
	effects []string // "<saga>:<effect>"

	entered      chan struct{} // closed when order-4's charge is under way
	enteredOnce  sync.Once
	release      chan struct{} // closing it lets order-4's charge finish
	releaseFixed bool
}

func newOrderWorld() *orderWorld {
	return &orderWorld{keys: map[string]bool{}, entered: make(chan struct{}), release: make(chan struct{})}
}

func (w *orderWorld) apply(sc saga.StepContext, effect string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.keys[sc.Key] {
		w.keys[sc.Key] = true
		w.effects = append(w.effects, sc.SagaID+":"+effect)
	}
}

func (w *orderWorld) effectsOf(id string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, e := range w.effects {
		if rest, ok := strings.CutPrefix(e, id+":"); ok {
			out = append(out, rest)
		}
	}
	return out
}

func (w *orderWorld) do(effect string) saga.Action {
	return saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
		w.apply(sc, effect)
		return []byte(effect), nil
	})
}

// orderSaga is the definition as deployed; releaseFixed is the version
// with the warehouse's fix.
func orderSaga(w *orderWorld, releaseFixed bool) saga.Definition {
	charge := saga.Do(func(ctx context.Context, sc saga.StepContext) ([]byte, error) {
		switch sc.SagaID {
		case "order-2", "order-3":
			return nil, bus.Permanent(errDeclined)
		case "order-4":
			w.enteredOnce.Do(func() { close(w.entered) })
			select {
			case <-w.release:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		w.apply(sc, "charge")
		return []byte("charged"), nil
	})
	release := saga.Do(func(_ context.Context, sc saga.StepContext) ([]byte, error) {
		if sc.SagaID == "order-3" && !releaseFixed {
			return nil, bus.Permanent(errWarehouse)
		}
		w.apply(sc, "release")
		return []byte("released"), nil
	})
	return saga.Definition{
		Name: "order", StartedBy: "order_placed", Category: "order",
		StepTimeout: 2 * time.Minute,
		Retry:       saga.RetryPolicy{MaxAttempts: 2, Initial: 10 * time.Millisecond},
		Steps: []saga.Step{
			{Name: "reserve", Action: w.do("reserve"), Compensation: release},
			{Name: "charge", Action: charge, Compensation: w.do("refund")},
			{Name: "ship", Action: w.do("ship")},
		},
	}
}

// startSagaRunner runs def until the returned stop is called (or the test
// ends).
func startSagaRunner(t *testing.T, store eventstore.Store, def saga.Definition, cfg saga.Config) (stop func()) {
	t.Helper()
	r, err := saga.NewRunner(store, def, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	stop = sync.OnceFunc(func() {
		if err := r.Stop(context.Background()); err != nil {
			t.Errorf("stopping the saga runner: %v", err)
		}
		if err := r.Err(); err != nil {
			t.Errorf("the saga runner failed: %v", err)
		}
	})
	t.Cleanup(stop)
	return stop
}

// sagaShown is stele sagas show's output: its fields by label, and its
// history rows split in fields.
type sagaShown struct {
	fields  map[string]string
	history [][]string
}

func (c cli) showSaga(definition, id string) sagaShown {
	c.t.Helper()
	out := c.mustRun("sagas", "show", definition, id)
	head, history, ok := strings.Cut(out, "\nHistory:\n")
	if !ok {
		c.t.Fatalf("sagas show printed no history:\n%s", out)
	}
	s := sagaShown{fields: map[string]string{}}
	for line := range strings.Lines(head) {
		label, value, ok := strings.Cut(line, ":")
		if !ok {
			c.t.Fatalf("sagas show printed %q, not label: value", line)
		}
		s.fields[label] = strings.TrimSpace(value)
	}
	rows := fields(history)
	if len(rows) == 0 || strings.Join(rows[0], " ") != "AT EVENT STEP ATTEMPT DETAIL" {
		c.t.Fatalf("sagas show's history has no header:\n%s", out)
	}
	s.history = rows[1:]
	prev := time.Time{}
	for _, r := range s.history {
		at, err := time.Parse(sagaTime, r[0])
		if err != nil || at.Before(prev) {
			c.t.Fatalf("history out of order at %q (%v):\n%s", r, err, out)
		}
		prev = at
	}
	return s
}

// events is the history's EVENT, STEP and ATTEMPT columns, one string a row.
func (s sagaShown) events() []string {
	var out []string
	for _, r := range s.history {
		out = append(out, strings.Join(r[1:4], " "))
	}
	return out
}

// detail is the DETAIL column of history row i.
func (s sagaShown) detail(i int) string { return strings.Join(s.history[i][4:], " ") }

// sagasByID runs sagas ls --json and decodes its lines by saga id.
func (c cli) sagasByID(args ...string) map[string]sagaJSON {
	c.t.Helper()
	out := c.mustRun(append([]string{"sagas", "ls", "--json"}, args...)...)
	got := map[string]sagaJSON{}
	for line := range strings.Lines(out) {
		var s sagaJSON
		if err := json.Unmarshal([]byte(line), &s); err != nil {
			c.t.Fatalf("%v in %q", err, out)
		}
		got[s.ID] = s
	}
	return got
}

// TestSagas runs real sagas against the schema and operates them through
// the CLI: one completes, one is compensated, one needs attention (its
// compensation fails for good) and one is under way. The one that needs
// attention is retried once its compensation is fixed, and the one under way
// is aborted.
func TestSagas(t *testing.T) {
	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			c, store := newCLI(t, driver)
			db := testdb.Open(t, driver)
			cfg := saga.Config{DB: db, Schema: c.schema, Logger: slog.New(slog.DiscardHandler)}
			world := newOrderWorld()
			stopDeployed := startSagaRunner(t, store, orderSaga(world, false), cfg)
			status := func(id string) saga.Status {
				in, err := saga.Load(ctx, store, "order", id)
				if err != nil {
					return ""
				}
				return in.Status
			}
			for i, want := range []saga.Status{saga.Completed, saga.Compensated, saga.NeedsAttention} {
				id := "order-" + strconv.Itoa(i+1)
				appendEvents(t, store, id, "order_placed")
				wait.Until(t, id+" to end "+string(want), func() bool { return status(id) == want })
			}
			appendEvents(t, store, "order-4", "order_placed")
			select {
			case <-world.entered:
			case <-time.After(wait.Timeout):
				t.Fatal("order-4's charge never started")
			}
			// A saga of another definition, that no runner drives.
			if _, err := store.Append(ctx, saga.StreamID("refund", "r-1"), eventstore.NoStream,
				[]eventstore.EventData{{Type: saga.TypeStarted, Data: []byte(`{"input":{}}`)}}); err != nil {
				t.Fatal(err)
			}

			t.Run("ls", func(t *testing.T) {
				out := c.mustRun("sagas", "ls")
				assertRows(t, out, [][]string{
					sagasHeader,
					{"order", "order-1", "completed", "ship"},
					{"order", "order-2", "compensated", "reserve(undo)"},
					{"order", "order-3", "needs_attention", "reserve(undo)"},
					{"order", "order-4", "running", "charge"},
					{"refund", "r-1", "running", "-"},
				})
				rows := fields(out)
				for _, r := range rows[1:] {
					for _, cell := range r[4:6] {
						if at, err := time.Parse(time.RFC3339, cell); err != nil || time.Since(at) > time.Minute {
							t.Errorf("row %q: STARTED_AT and UPDATED_AT should be recent times, got %q", r, cell)
						}
					}
				}
				reason := strings.Join(rows[3][6:], " ")
				if !strings.HasPrefix(reason, "compensation of step reserve failed permanently: the ware") ||
					!strings.HasSuffix(reason, "...") || utf8.RuneCountInString(reason) != maxSagaReason {
					t.Errorf("REASON of order-3 %q, want the reason cut at %d characters", reason, maxSagaReason)
				}
				for _, r := range [][]string{rows[1], rows[2], rows[4], rows[5]} {
					if len(r) != len(sagasHeader) || r[6] != "-" {
						t.Errorf("row %q, want no reason", r)
					}
				}
			})

			t.Run("ls filters", func(t *testing.T) {
				assertRows(t, c.mustRun("sagas", "ls", "--status", "needs_attention"), [][]string{
					sagasHeader, {"order", "order-3", "needs_attention"},
				})
				assertRows(t, c.mustRun("sagas", "ls", "--status", "running"), [][]string{
					sagasHeader, {"order", "order-4", "running"}, {"refund", "r-1", "running"},
				})
				assertRows(t, c.mustRun("sagas", "ls", "--status", "running", "--definition", "order"), [][]string{
					sagasHeader, {"order", "order-4", "running"},
				})
				assertRows(t, c.mustRun("sagas", "ls", "--definition", "refund"), [][]string{
					sagasHeader, {"refund", "r-1", "running"},
				})
				assertRows(t, c.mustRun("sagas", "ls", "--definition", "invoice"), [][]string{sagasHeader})
				if out := c.mustRun("sagas", "ls", "--status", "compensating", "--json"); out != "" {
					t.Errorf("ls --json with nothing to list printed %q", out)
				}
			})

			t.Run("ls --json", func(t *testing.T) {
				all := c.sagasByID("--definition", "order")
				if len(all) != 4 {
					t.Fatalf("ls --json --definition order: %+v", all)
				}
				if s := all["order-1"]; s.Status != saga.Completed || s.Definition != "order" || s.Version != 8 ||
					s.Step == nil || *s.Step != (sagaStepJSON{Name: "ship", Attempt: 1}) ||
					s.InFlight || s.Deadline != nil || s.RetryAt != nil || s.Reason != "" || s.LastError != "" ||
					s.StartedAt.IsZero() || s.UpdatedAt.Before(s.StartedAt) {
					t.Errorf("order-1: %+v", s)
				}
				if s := all["order-3"]; s.Status != saga.NeedsAttention ||
					s.Step == nil || *s.Step != (sagaStepJSON{Name: "reserve", Compensating: true, Attempt: 1, UnderWay: true}) ||
					s.Reason != "compensation of step reserve failed permanently: "+errWarehouse.Error() ||
					s.LastError != errWarehouse.Error() || s.InFlight || s.RetryAt != nil {
					t.Errorf("order-3: %+v", s)
				}
				if s := all["order-4"]; s.Status != saga.Running || !s.InFlight || s.Deadline == nil ||
					s.Deadline.Before(time.Now()) || s.Step == nil || *s.Step != (sagaStepJSON{Name: "charge", Attempt: 1, UnderWay: true}) {
					t.Errorf("order-4: %+v", s)
				}
			})

			t.Run("show", func(t *testing.T) {
				s := c.showSaga("order", "order-3")
				for label, want := range map[string]string{
					"Definition": "order", "ID": "order-3", "Status": "needs_attention", "Input": `{"type":"order_placed"}`,
					"Done": "reserve", "Undone": "-",
					"Under way":  "reserve(undo), attempt 1: failed for good; waiting for stele sagas retry",
					"Last error": errWarehouse.Error(),
					"Reason":     "compensation of step reserve failed permanently: " + errWarehouse.Error(),
				} {
					if got := s.fields[label]; got != want {
						t.Errorf("%s: %q, want %q", label, got, want)
					}
				}
				if !strings.HasSuffix(s.fields["Updated"], "(version 9)") {
					t.Errorf("Updated: %q", s.fields["Updated"])
				}
				if want := []string{
					"started - -",
					"step_started reserve 1", "step_succeeded reserve 1",
					"step_started charge 1", "step_failed charge 1",
					"compensating charge -",
					"step_started reserve(undo) 1", "step_failed reserve(undo) 1",
					"needs_attention reserve(undo) -",
				}; !slices.Equal(s.events(), want) {
					t.Fatalf("history of order-3:\n%q\nwant\n%q", s.events(), want)
				}
				if d := s.detail(1); !strings.HasPrefix(d, "deadline ") {
					t.Errorf("a start's detail %q, want its deadline", d)
				}
				for i, want := range map[int]string{
					4: errDeclined.Error(),
					5: "step charge failed permanently: " + errDeclined.Error(),
					7: errWarehouse.Error(),
					8: "compensation of step reserve failed permanently: " + errWarehouse.Error(),
				} {
					if got := s.detail(i); got != want {
						t.Errorf("detail of %q: %q, want %q", s.history[i][1], got, want)
					}
				}

				s = c.showSaga("order", "order-2")
				for label, want := range map[string]string{
					"Status": "compensated", "Done": "reserve", "Undone": "reserve", "Under way": "-",
					"Reason": "step charge failed permanently: " + errDeclined.Error(),
				} {
					if got := s.fields[label]; got != want {
						t.Errorf("order-2's %s: %q, want %q", label, got, want)
					}
				}
				if _, ok := s.fields["Last error"]; ok {
					t.Errorf("order-2 shows a last error after its compensation succeeded: %q", s.fields)
				}
				if got := s.events(); got[len(got)-1] != "compensated - -" {
					t.Errorf("order-2's history ends with %q", got[len(got)-1])
				}

				s = c.showSaga("order", "order-4")
				if !strings.HasPrefix(s.fields["Under way"], "charge, attempt 1: in flight, deadline ") || s.fields["Done"] != "reserve" {
					t.Errorf("order-4 under way: %q", s.fields)
				}
				s = c.showSaga("refund", "r-1")
				if s.fields["Status"] != "running" || !strings.HasPrefix(s.fields["Under way"], "nothing") || s.fields["Input"] != "{}" {
					t.Errorf("refund r-1: %q", s.fields)
				}
			})

			t.Run("show --json", func(t *testing.T) {
				out := c.mustRun("sagas", "show", "order", "order-3", "--json")
				var d sagaDetailJSON
				if err := json.Unmarshal([]byte(out), &d); err != nil {
					t.Fatalf("%v in %q", err, out)
				}
				if d.ID != "order-3" || d.Status != saga.NeedsAttention || !slices.Equal(d.Done, []string{"reserve"}) ||
					d.Undone == nil || len(d.Undone) != 0 || string(d.Input) != `{"type":"order_placed"}` || len(d.History) != 9 {
					t.Fatalf("show --json: %s", out)
				}
				if h := d.History[7]; h.Event != "step_failed" || h.Step != "reserve" || !h.Compensating || h.Attempt != 1 ||
					h.Detail != errWarehouse.Error() || h.At.Before(d.History[6].At) {
					t.Errorf("history[7]: %+v", h)
				}
			})

			t.Run("requests the state refuses", func(t *testing.T) {
				for _, tc := range []struct {
					args []string
					want string
				}{
					{[]string{"retry", "order", "order-1"}, "saga order order-1 is completed; only a saga that needs attention can be retried"},
					{[]string{"retry", "order", "order-4"}, "saga order order-4 is running; only a saga that needs attention can be retried"},
					{[]string{"abort", "order", "order-1"}, "saga order order-1 is completed; only a running saga can be aborted"},
					{[]string{"abort", "order", "order-3", "--reason", "x"}, "saga order order-3 is needs_attention; only a running saga can be aborted"},
				} {
					var out strings.Builder
					err := c.run(ctx, &out, append([]string{"sagas"}, tc.args...)...)
					var se *saga.StateError
					if !errors.As(err, &se) || err.Error() != tc.want || out.Len() != 0 {
						t.Errorf("sagas %s: %v (printed %q), want %q", strings.Join(tc.args, " "), err, out.String(), tc.want)
					}
				}
				if v := c.sagasByID("--definition", "order")["order-1"].Version; v != 8 {
					t.Errorf("order-1 at version %d after refused requests, want 8", v)
				}
			})

			t.Run("abort", func(t *testing.T) {
				out := c.mustRun("sagas", "abort", "order", "order-4", "--reason", "customer called")
				if want := "requested the abort of saga order order-4 (customer called): the step under way finishes, "; !strings.HasPrefix(out, want) ||
					!strings.Contains(out, "The running saga runner of order picks the request up from the feed") {
					t.Errorf("abort printed %q", out)
				}
				// The charge under way has not finished: the saga still runs.
				assertRows(t, c.mustRun("sagas", "ls", "--status", "running", "--definition", "order"), [][]string{
					sagasHeader, {"order", "order-4", "running", "charge"},
				})
				if row := fields(c.mustRun("sagas", "ls", "--status", "running", "--definition", "order"))[1]; strings.Join(row[6:], " ") != "abort requested: customer called" {
					t.Errorf("REASON of the saga being aborted: %q", row[6:])
				}
				if s := c.showSaga("order", "order-4"); s.fields["Abort"] != "abort requested: customer called; the step under way finishes, then the saga compensates" {
					t.Errorf("show of the saga being aborted: %q", s.fields)
				}

				close(world.release)
				wait.Until(t, "order-4 to be compensated", func() bool { return status("order-4") == saga.Compensated })
				s := c.showSaga("order", "order-4")
				for label, want := range map[string]string{
					"Status": "compensated", "Done": "reserve, charge", "Undone": "charge, reserve",
					"Reason": "aborted: customer called", "Under way": "-",
				} {
					if got := s.fields[label]; got != want {
						t.Errorf("order-4's %s: %q, want %q", label, got, want)
					}
				}
				if want := []string{
					"started - -",
					"step_started reserve 1", "step_succeeded reserve 1",
					"step_started charge 1", "abort_requested - -", "step_succeeded charge 1",
					"compensating - -",
					"step_started charge(undo) 1", "step_succeeded charge(undo) 1",
					"step_started reserve(undo) 1", "step_succeeded reserve(undo) 1",
					"compensated - -",
				}; !slices.Equal(s.events(), want) {
					t.Errorf("history of order-4:\n%q\nwant\n%q", s.events(), want)
				}
				if d := s.detail(4); d != "customer called" {
					t.Errorf("detail of the abort request: %q", d)
				}
				if got, want := world.effectsOf("order-4"), []string{"reserve", "charge", "refund", "release"}; !slices.Equal(got, want) {
					t.Errorf("effects of order-4: %q, want %q", got, want)
				}
			})

			t.Run("retry", func(t *testing.T) {
				stopDeployed()
				out := c.mustRun("sagas", "retry", "order", "order-3", "--reason", "warehouse fixed")
				if want := "requested a retry of saga order order-3: the compensation of reserve gets a fresh set of attempts"; !strings.HasPrefix(out, want) {
					t.Errorf("retry printed %q, want it to start with %q", out, want)
				}
				// No runner is up: the saga waits, compensating.
				assertRows(t, c.mustRun("sagas", "ls", "--status", "compensating"), [][]string{
					sagasHeader, {"order", "order-3", "compensating"},
				})
				if s := c.showSaga("order", "order-3"); s.fields["Status"] != "compensating" ||
					!strings.HasPrefix(s.fields["Under way"], "nothing") || s.events()[len(s.history)-1] != "retry_requested - -" {
					t.Errorf("order-3 after the retry request: %q %q", s.fields, s.events())
				}

				// The fix is deployed: a runner with a compensation that works.
				stopFixed := startSagaRunner(t, store, orderSaga(world, true), cfg)
				defer stopFixed()
				var s sagaShown
				wait.Until(t, "stele sagas show to tell order-3 compensated", func() bool {
					s = c.showSaga("order", "order-3")
					return s.fields["Status"] == "compensated"
				})
				if s.fields["Undone"] != "reserve" || s.fields["Done"] != "reserve" || s.fields["Under way"] != "-" {
					t.Errorf("order-3 retried: %q", s.fields)
				}
				ev := s.events()
				if want := []string{
					"needs_attention reserve(undo) -", "retry_requested - -",
					"step_started reserve(undo) 1", "step_succeeded reserve(undo) 1", "compensated - -",
				}; len(ev) != 13 || !slices.Equal(ev[8:], want) {
					t.Errorf("history of order-3:\n%q\nwant it to end with\n%q", ev, want)
				}
				if d := s.detail(9); d != "warehouse fixed" {
					t.Errorf("detail of the retry request: %q", d)
				}
				if got, want := world.effectsOf("order-3"), []string{"reserve", "release"}; !slices.Equal(got, want) {
					t.Errorf("effects of order-3: %q, want %q", got, want)
				}
				assertRows(t, c.mustRun("sagas", "ls", "--definition", "order"), [][]string{
					sagasHeader,
					{"order", "order-1", "completed"},
					{"order", "order-2", "compensated"},
					{"order", "order-3", "compensated"},
					{"order", "order-4", "compensated"},
				})
			})

			t.Run("unknown saga", func(t *testing.T) {
				for _, cmd := range []string{"show", "retry", "abort"} {
					err := c.run(ctx, io.Discard, "sagas", cmd, "order", "order-404")
					if !errors.Is(err, saga.ErrNoSaga) || !strings.Contains(err.Error(), "no saga order order-404 in schema "+c.schema) {
						t.Errorf("sagas %s of an unknown saga: %v", cmd, err)
					}
				}
			})
		})
	}
}

func TestSagasBadInput(t *testing.T) {
	db := testdb.Open(t, "postgres")
	bare := cli{t: t, driver: "postgres", schema: testdb.Schema(t, db)} // never migrated
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"sagas", "ls"}, "has no event store tables; run stele migrate --schema " + bare.schema},
		{[]string{"sagas", "show", "order", "order-1"}, "has no event store tables"},
		{[]string{"sagas", "ls", "--status", "failed"}, `--status "failed": want one of running, compensating, completed, compensated, needs_attention`},
		{[]string{"sagas", "ls", "--definition", "Order-Saga"}, `saga definition "Order-Saga": want the name of a saga.Definition`},
		{[]string{"sagas", "show", "order"}, "accepts 2 arg(s)"},
		{[]string{"sagas", "show", "order-x", "1"}, `saga definition "order-x"`},
		{[]string{"sagas", "retry", "order"}, "accepts 2 arg(s)"},
		{[]string{"sagas", "abort", "order", "a", "b"}, "accepts 2 arg(s)"},
	} {
		err := bare.run(context.Background(), io.Discard, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("stele %s: %v, want an error containing %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}

func TestSagaCells(t *testing.T) {
	for _, tc := range []struct {
		name         string
		compensating bool
		attempt      int
		want         string
	}{
		{"", false, 0, "-"},
		{"charge", false, 1, "charge"},
		{"charge", true, 1, "charge(undo)"},
		{"charge", false, 3, "charge(attempt=3)"},
		{"charge", true, 2, "charge(undo,attempt=2)"},
	} {
		if got := stepText(tc.name, tc.compensating, tc.attempt); got != tc.want {
			t.Errorf("stepText(%q, %v, %d) = %q, want %q", tc.name, tc.compensating, tc.attempt, got, tc.want)
		}
	}
	for in, want := range map[string]string{
		"":                                 "-",
		"  refused\n  at line 2":           "refused",
		strings.Repeat("é", 70):            strings.Repeat("é", 57) + "...",
		"a  b\tc":                          "a b c",
		strings.Repeat("x", maxSagaReason): strings.Repeat("x", maxSagaReason),
	} {
		if got := cutText(in, maxSagaReason); got != want {
			t.Errorf("cutText(%q) = %q, want %q", in, got, want)
		}
	}
	if got := detailText("\xff\x00"); got != "<2 bytes: ff00>" {
		t.Errorf("detailText of bytes: %q", got)
	}
	if got := detailText(strings.Repeat("y", 200)); utf8.RuneCountInString(got) != maxSagaDetail {
		t.Errorf("detailText of a long detail: %d characters", utf8.RuneCountInString(got))
	}
	// The store is not needed: a saga's state comes from its history alone.
	in := &saga.Instance{Status: saga.Running, Current: 1, Attempt: 1, RetryAt: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC),
		History: []saga.HistoryEntry{
			{Type: "started"}, {Type: "step_started", Step: "a", Attempt: 1}, {Type: "step_succeeded", Step: "a", Attempt: 1},
			{Type: "step_started", Step: "b", Attempt: 1}, {Type: "step_failed", Step: "b", Attempt: 1, Detail: "boom"},
		}}
	s := sagaJSONOf(in)
	if s.Step == nil || *s.Step != (sagaStepJSON{Name: "b", Attempt: 1, UnderWay: true}) || s.RetryAt == nil {
		t.Errorf("sagaJSONOf: %+v", s)
	}
	if got := underWayText(s); got != "b, attempt 1: failed, retried at 2030-01-01T00:00:00.000Z" {
		t.Errorf("underWayText: %q", got)
	}
}
