package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/saga"
)

func newSagasCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "sagas",
		Short: "List and inspect sagas; retry or abort them",
		Long: `A saga (package saga) runs a multi-step workflow: its steps run in order, and
when one fails for good the steps already done are compensated (undone), last
first. Each saga is the event stream saga_<definition>-<id>; these commands
read those streams, and retry and abort append an operator's request to them,
which the saga runner of the definition carries out.

A saga is in one of these states:

  running          its steps are under way. A saga stuck running is not being
                   driven: check in stele sagas show that its step's deadline
                   has not long passed, that a runner of its definition is up,
                   that the outbox relay saga.<definition> has no backlog
                   (stele outbox status) and that the service answers.
  compensating     a step failed for good (or an operator aborted the saga):
                   the completed steps are being undone, last first.
  completed        every step succeeded. Nothing to do.
  compensated      a step failed for good and every completed step was undone.
                   Nothing to do; REASON in stele sagas show says why.
  needs_attention  a compensation failed for good: the saga waits for a
                   person. Read why in stele sagas show, fix the cause (the
                   service that refuses the refund, say), then
                   stele sagas retry: the failed compensation gets a fresh set
                   of attempts and the saga goes on to compensated.

See docs/sagas.md, "Operating sagas".`,
	}
	cmd.AddCommand(newSagasLsCmd(g), newSagasShowCmd(g), newSagasRetryCmd(g), newSagasAbortCmd(g))
	return cmd
}

// sagaStatuses are the values --status takes, in the order a saga meets them.
var sagaStatuses = []saga.Status{saga.Running, saga.Compensating, saga.Completed, saga.Compensated, saga.NeedsAttention}

// definitionRE is what saga.Definition.Name allows. A name with a "-" in it
// would name another saga's stream, so it is refused rather than looked up.
var definitionRE = regexp.MustCompile(`^[a-z0-9_]{1,50}$`)

func checkDefinition(name string) error {
	if !definitionRE.MatchString(name) {
		return fmt.Errorf("saga definition %q: want the name of a saga.Definition: [a-z0-9_], 1 to 50 bytes", name)
	}
	return nil
}

func parseSagaStatus(s string) (saga.Status, error) {
	names := make([]string, len(sagaStatuses))
	for i, st := range sagaStatuses {
		if string(st) == s {
			return st, nil
		}
		names[i] = string(st)
	}
	return "", fmt.Errorf("--status %q: want one of %s", s, strings.Join(names, ", "))
}

// openSagaStore opens the store and checks that the schema has one.
func (g *globalOpts) openSagaStore(ctx context.Context) (*pgstore.Store, func(), error) {
	store, closeStore, err := g.openStore(ctx)
	if err != nil {
		return nil, nil, err
	}
	if err := requireTable(ctx, store.DB(), g.schema, "events", "event store"); err != nil {
		closeStore()
		return nil, nil, err
	}
	return store, closeStore, nil
}

// openSaga checks a definition name given on the command line and opens the
// store its sagas live in: what show, retry and abort start with.
func (g *globalOpts) openSaga(ctx context.Context, definition string) (*pgstore.Store, func(), error) {
	if err := checkDefinition(definition); err != nil {
		return nil, nil, err
	}
	return g.openSagaStore(ctx)
}

// noSaga explains ErrNoSaga; other errors pass through.
func noSaga(err error, definition, id, schema string) error {
	if errors.Is(err, saga.ErrNoSaga) {
		return fmt.Errorf("no saga %s %s in schema %s: nothing started it, or its definition or id is misspelt (stele sagas ls lists them): %w",
			definition, id, schema, saga.ErrNoSaga)
	}
	return err
}

// sagaStepJSON is a step of a saga: the one under way, or the last done.
type sagaStepJSON struct {
	Name         string `json:"name"`
	Compensating bool   `json:"compensating"` // its compensation, not its action
	Attempt      int    `json:"attempt"`
	// UnderWay: the step is in flight or waits to be retried (or, in
	// needs_attention, is the compensation that failed); otherwise it is the
	// last one done.
	UnderWay bool `json:"under_way"`
}

type sagaJSON struct {
	Definition  string        `json:"definition"`
	ID          string        `json:"id"`
	Status      saga.Status   `json:"status"`
	Version     int64         `json:"version"`
	StartedAt   time.Time     `json:"started_at"`
	UpdatedAt   time.Time     `json:"updated_at"`
	Step        *sagaStepJSON `json:"step"`      // null: no step has started
	InFlight    bool          `json:"in_flight"` // an attempt started, no outcome yet
	Deadline    *time.Time    `json:"deadline"`  // of the attempt in flight
	RetryAt     *time.Time    `json:"retry_at"`  // when a failed attempt is retried
	LastError   string        `json:"last_error"`
	Reason      string        `json:"reason"`                 // why it compensates, compensated or needs attention
	AbortReason string        `json:"abort_reason,omitempty"` // an abort was requested, not yet carried out
	Uncertain   string        `json:"uncertain,omitempty"`    // a step that timed out for good, so may have acted: compensated first
	abort       string        // that request, with the reason as the operator gave it
}

type sagaHistoryJSON struct {
	At           time.Time `json:"at"`
	Event        string    `json:"event"`
	Step         string    `json:"step"`
	Compensating bool      `json:"compensating"`
	Attempt      int       `json:"attempt"`
	Detail       string    `json:"detail"`
}

type sagaDetailJSON struct {
	sagaJSON
	Input       json.RawMessage   `json:"input,omitempty"`        // the starting event's data, when JSON
	InputBase64 []byte            `json:"input_base64,omitempty"` // ...when not
	Done        []string          `json:"done"`                   // steps completed, in order
	Undone      []string          `json:"undone"`                 // compensations that succeeded, in order
	History     []sagaHistoryJSON `json:"history"`
}

func sagaJSONOf(in *saga.Instance) sagaJSON {
	s := sagaJSON{
		Definition: in.Definition, ID: in.ID, Status: in.Status, Version: int64(in.Version),
		StartedAt: in.StartedAt, UpdatedAt: in.UpdatedAt, Step: sagaStep(in), InFlight: in.InFlight,
		LastError: in.LastError, Reason: in.FailedReason,
	}
	if in.Status == saga.NeedsAttention {
		s.Reason = in.AttentionReason
	}
	if in.Uncertain >= 0 {
		for i := len(in.History) - 1; i >= 0; i-- {
			if h := in.History[i]; h.Type == "compensating" {
				s.Uncertain = h.Step
				break
			}
		}
	}
	if in.InFlight && !in.Deadline.IsZero() {
		d := in.Deadline
		s.Deadline = &d
	}
	if !in.RetryAt.IsZero() {
		r := in.RetryAt
		s.RetryAt = &r
	}
	if in.Status == saga.Running && in.AbortReason != "" {
		s.AbortReason, s.abort = in.AbortReason, "abort requested"
		for i := len(in.History) - 1; i >= 0; i-- {
			if h := in.History[i]; h.Type == "abort_requested" {
				if h.Detail != "" {
					s.abort += ": " + h.Detail
				}
				break
			}
		}
	}
	return s
}

// sagaStep is the step under way or, when none is, the last one done. The
// Instance numbers steps; only its history names them.
func sagaStep(in *saga.Instance) *sagaStepJSON {
	var started, succeeded *saga.HistoryEntry
	for i := range in.History {
		switch h := &in.History[i]; h.Type {
		case "step_started":
			started = h
		case "step_succeeded":
			succeeded = h
		}
	}
	switch {
	case in.Current >= 0 && started != nil:
		return &sagaStepJSON{Name: started.Step, Compensating: started.Compensating, Attempt: in.Attempt, UnderWay: true}
	case succeeded != nil:
		return &sagaStepJSON{Name: succeeded.Step, Compensating: succeeded.Compensating, Attempt: succeeded.Attempt}
	}
	return nil
}

// stepText is a step in one table cell: "charge", "charge(undo)",
// "charge(attempt=3)", "charge(undo,attempt=3)".
func stepText(name string, compensating bool, attempt int) string {
	if name == "" {
		return "-"
	}
	var notes []string
	if compensating {
		notes = append(notes, "undo")
	}
	if attempt > 1 {
		notes = append(notes, "attempt="+strconv.Itoa(attempt))
	}
	if len(notes) == 0 {
		return oneLine(name)
	}
	return oneLine(name) + "(" + strings.Join(notes, ",") + ")"
}

// maxSagaReason is how much of a reason's first line sagas ls shows.
const maxSagaReason = 60

// maxSagaDetail is how much of a history entry's detail sagas show shows.
const maxSagaDetail = 120

// cutText is the first line of s, on one line, cut to n characters.
func cutText(s string, n int) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	line = oneLine(line)
	if line == "" {
		return "-"
	}
	if utf8.RuneCountInString(line) > n {
		r := []rune(line)
		line = strings.TrimSpace(string(r[:n-3])) + "..."
	}
	return line
}

// detailText is a history entry's detail in a table cell. A step's output
// may be anything: bytes that are not text are shown as such.
func detailText(s string) string {
	if !utf8.ValidString(s) {
		return dataText([]byte(s))
	}
	s = oneLine(s)
	if s == "" {
		return "-"
	}
	if utf8.RuneCountInString(s) > maxSagaDetail {
		r := []rune(s)
		s = strings.TrimSpace(string(r[:maxSagaDetail-3])) + "..."
	}
	return s
}

func newSagasLsCmd(g *globalOpts) *cobra.Command {
	var definition, status string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List sagas, oldest first",
		Long: `List the sagas in the schema (of every definition, or of --definition), in the
order they started:

  DEFINITION  the saga.Definition's Name
  ID          the saga's id (by default the stream id of the event that
              started it)
  STATUS      running, compensating, completed, compensated or needs_attention
              (see below)
  STEP        the step under way or, when none is, the last one done:
              "(undo)" marks its compensation and "attempt=N" an attempt after
              the first. Of a saga that needs attention, the compensation
              that failed.
  STARTED_AT  when the saga started
  UPDATED_AT  when its stream last moved
  REASON      of a saga compensating or needing attention, why (the failure
              that made it compensate, or the compensation that failed); of a
              running saga with an abort requested, that abort. The first
              line, cut at 60 characters: stele sagas show gives it whole.

What to do, by status (--status filters on it):

  running          nothing, while it moves. A saga whose UPDATED_AT is old is
                   waiting for a reply, a deadline or a retry: stele sagas
                   show tells which. Past its deadline plus the runner's
                   RescanInterval, no runner is driving it: is a runner of
                   its definition up? Does the outbox relay saga.<definition>
                   have a backlog (stele outbox status)? Does the service
                   answer on its topic?
  compensating     nothing, while it moves; the same checks as running if it
                   does not.
  completed        nothing: every step succeeded.
  compensated      nothing: a step failed for good and every completed step
                   was undone.
  needs_attention  a compensation failed for good and the saga waits for you.
                   Read its history (stele sagas show), fix the cause, then
                   stele sagas retry.

--json prints one object per saga with every field: the step as name,
compensating, attempt and under_way; the deadline of the attempt in flight,
the retry time of a failed one, the last error and the whole reason.

This reads every saga stream of the schema (of the definition, with
--definition): on a large store, give --definition.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var st saga.Status
			if status != "" {
				var err error
				if st, err = parseSagaStatus(status); err != nil {
					return err
				}
			}
			if definition != "" {
				if err := checkDefinition(definition); err != nil {
					return err
				}
			}
			ctx := cmd.Context()
			store, closeStore, err := g.openSagaStore(ctx)
			if err != nil {
				return err
			}
			defer closeStore()
			sagas, err := saga.List(ctx, store, definition, st)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			tw := newTable(w)
			if !asJSON {
				fmt.Fprintln(tw, "DEFINITION\tID\tSTATUS\tSTEP\tSTARTED_AT\tUPDATED_AT\tREASON")
			}
			for _, in := range sagas {
				s := sagaJSONOf(in)
				if asJSON {
					err = writeJSONLine(w, s)
				} else {
					step := "-"
					if s.Step != nil {
						step = stepText(s.Step.Name, s.Step.Compensating, s.Step.Attempt)
					}
					reason := "-"
					if s.Status == saga.Compensating || s.Status == saga.NeedsAttention {
						reason = cutText(s.Reason, maxSagaReason)
					} else if s.abort != "" {
						reason = cutText(s.abort, maxSagaReason)
					}
					_, err = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Definition, cellText(s.ID), s.Status, step,
						s.StartedAt.Format(time.RFC3339), s.UpdatedAt.Format(time.RFC3339), reason)
				}
				if err != nil {
					return err
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&definition, "definition", "", "only the sagas of this definition")
	cmd.Flags().StringVar(&status, "status", "", "only the sagas in this status: running, compensating, completed, compensated or needs_attention")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per saga")
	return cmd
}

// sagaTime is precise enough to tell a saga's events apart.
const sagaTime = "2006-01-02T15:04:05.000Z07:00"

func newSagasShowCmd(g *globalOpts) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show DEFINITION ID",
		Short: "Print a saga's state and its whole history",
		Long: `Print saga ID of definition DEFINITION (as stele sagas ls shows them):

  Status      running, compensating, completed, compensated or needs_attention
              (stele sagas --help says what each asks of you)
  Started     when it started; Updated, when its stream last moved
  Input       the data of the event that started it
  Done        the steps completed, in order
  Undone      the compensations that succeeded, in the order they ran (last
              step first); "(nothing to undo)" marks a step without one
  Under way   the step (or compensation, "(undo)") under way and its attempt:
              in flight until its deadline, or failed and retried at a time,
              or, in needs_attention, the compensation that failed
  Last error  the error of the last failed attempt, until a step succeeds
  Reason      why the saga compensates (the step that failed for good, or
              the operator's abort) or needs attention (the compensation
              that failed)
  Abort       an abort requested and not yet carried out: the step under way
              finishes first

then its history, one event of the saga's stream per row, oldest first:

  AT       when it was recorded
  EVENT    started, step_started, step_succeeded, step_failed, compensating,
           completed, compensated, needs_attention, retry_requested or
           abort_requested
  STEP     the step, "(undo)" for its compensation
  ATTEMPT  the attempt, counted from 1 for each step and compensation
  DETAIL   a start's deadline, a success's output, a failure's error, a
           reason (cut at 120 characters; --json gives it whole)

A saga stuck running or compensating shows its deadline or retry time under
"Under way": once that time is past (plus the runner's RescanInterval), no
runner is driving the saga. --json prints it all as one object.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			definition, id := args[0], args[1]
			ctx := cmd.Context()
			store, closeStore, err := g.openSaga(ctx, definition)
			if err != nil {
				return err
			}
			defer closeStore()
			in, err := saga.Load(ctx, store, definition, id)
			if err != nil {
				return noSaga(err, definition, id, g.schema)
			}
			d := sagaDetailOf(in)
			if asJSON {
				return writeJSONLine(cmd.OutOrStdout(), d)
			}
			return writeSagaDetail(cmd.OutOrStdout(), d)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the saga as one JSON object")
	return cmd
}

func sagaDetailOf(in *saga.Instance) sagaDetailJSON {
	d := sagaDetailJSON{sagaJSON: sagaJSONOf(in), Done: []string{}, Undone: []string{}, History: []sagaHistoryJSON{}}
	if json.Valid(in.Input) {
		d.Input = json.RawMessage(in.Input)
	} else if len(in.Input) > 0 {
		d.InputBase64 = in.Input
	}
	for _, h := range in.History {
		d.History = append(d.History, sagaHistoryJSON{At: h.At, Event: h.Type, Step: h.Step, Compensating: h.Compensating,
			Attempt: h.Attempt, Detail: h.Detail})
		// The Instance lists the steps done by number; their successes, in
		// the same order, name them.
		if h.Type != "step_succeeded" {
			continue
		}
		if !h.Compensating {
			d.Done = append(d.Done, h.Step)
		} else if h.Detail == "nothing to undo" {
			d.Undone = append(d.Undone, h.Step+" (nothing to undo)")
		} else {
			d.Undone = append(d.Undone, h.Step)
		}
	}
	return d
}

func writeSagaDetail(w io.Writer, d sagaDetailJSON) error {
	tw := newTable(w)
	line := func(key, value string) { fmt.Fprintf(tw, "%s:\t%s\n", key, value) }
	line("Definition", d.Definition)
	line("ID", d.ID)
	line("Status", string(d.Status))
	line("Started", d.StartedAt.Format(sagaTime))
	line("Updated", fmt.Sprintf("%s (version %d)", d.UpdatedAt.Format(sagaTime), d.Version))
	switch {
	case d.Input != nil:
		line("Input", detailText(string(d.Input)))
	case d.InputBase64 != nil:
		line("Input", dataText(d.InputBase64))
	}
	list := func(steps []string) string {
		if len(steps) == 0 {
			return "-"
		}
		return strings.Join(steps, ", ")
	}
	line("Done", list(d.Done))
	line("Undone", list(d.Undone))
	if d.Uncertain != "" {
		line("Uncertain", oneLine(d.Uncertain)+" (timed out for good, so it may have acted: compensated first)")
	}
	line("Under way", underWayText(d.sagaJSON))
	if d.LastError != "" {
		line("Last error", oneLine(d.LastError))
	}
	if d.Reason != "" {
		line("Reason", oneLine(d.Reason))
	}
	if d.abort != "" {
		line("Abort", oneLine(d.abort)+"; the step under way finishes, then the saga compensates")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if _, err := fmt.Fprintln(w, "\nHistory:"); err != nil {
		return err
	}
	fmt.Fprintln(tw, "AT\tEVENT\tSTEP\tATTEMPT\tDETAIL")
	for _, h := range d.History {
		attempt := "-"
		if h.Attempt > 0 {
			attempt = strconv.Itoa(h.Attempt)
		}
		step := "-"
		if h.Step != "" {
			step = oneLine(h.Step)
			if h.Compensating {
				step += "(undo)"
			}
		}
		if _, err := fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", h.At.Format(sagaTime), h.Event, step, attempt, detailText(h.Detail)); err != nil {
			return err
		}
	}
	return tw.Flush()
}

// underWayText says what the saga is doing, or waiting for.
func underWayText(s sagaJSON) string {
	st := s.Step
	if st == nil || !st.UnderWay {
		switch s.Status {
		case saga.Running, saga.Compensating:
			return "nothing (a runner starts the next step, or ends the saga, at once)"
		}
		return "-"
	}
	step := stepText(st.Name, st.Compensating, 0) + ", attempt " + strconv.Itoa(st.Attempt)
	switch {
	case s.InFlight && s.Deadline != nil:
		return step + ": in flight, deadline " + s.Deadline.Format(sagaTime)
	case s.InFlight:
		return step + ": in flight"
	case s.RetryAt != nil:
		return step + ": failed, retried at " + s.RetryAt.Format(sagaTime)
	case s.Status == saga.NeedsAttention:
		return step + ": failed for good; waiting for stele sagas retry"
	}
	return step + ": failed"
}

func newSagasRetryCmd(g *globalOpts) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "retry DEFINITION ID",
		Short: "Send a saga that needs attention back to compensating",
		Long: `Ask the saga runner of DEFINITION to compensate saga ID again. Only a saga in
needs_attention can be retried: one whose compensation failed for good.

Fix the cause first (stele sagas show says which compensation failed, and
why): the compensation's code lives in your application, not in this CLI, so
this only records the request (a saga.retry_requested event, with --reason)
in the saga's stream. The saga is compensating again at once. The running saga
runner of DEFINITION picks the request up from the feed: the compensation that
failed gets a fresh set of attempts, then the remaining compensations run, and
the saga ends compensated, or in needs_attention again if the compensation
still fails. If no runner of DEFINITION is running, the request waits until
one starts. Follow it with stele sagas show DEFINITION ID.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			definition, id := args[0], args[1]
			ctx := cmd.Context()
			store, closeStore, err := g.openSaga(ctx, definition)
			if err != nil {
				return err
			}
			defer closeStore()
			// Read first, to say which compensation is retried.
			in, err := saga.Load(ctx, store, definition, id)
			if err != nil {
				return noSaga(err, definition, id, g.schema)
			}
			err = saga.RequestRetry(ctx, store, definition, id, reason) // retried on a conflict with the runner
			if err != nil {
				return noSaga(err, definition, id, g.schema)
			}
			what := "the compensation that failed"
			if st := sagaStep(in); st != nil && st.UnderWay && in.Status == saga.NeedsAttention {
				what = "the compensation of " + oneLine(st.Name)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "requested a retry of saga %s %s: %s gets a fresh set of attempts, then the remaining compensations run.\n"+
				"The running saga runner of %s picks the request up from the feed (or the next one to start does); follow it with: stele sagas show %s %s\n",
				definition, id, what, definition, definition, id)
			return err
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, recorded in the saga's history")
	return cmd
}

func newSagasAbortCmd(g *globalOpts) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "abort DEFINITION ID",
		Short: "Ask a running saga to stop and compensate",
		Long: `Ask the saga runner of DEFINITION to abort saga ID. Only a running saga can be
aborted (not one already compensating, or ended).

This records the request (a saga.abort_requested event, with --reason) in the
saga's stream. The running saga runner of DEFINITION picks it up from the
feed. The step under way, if any, finishes first: its effect may already have
happened (a command the service received), so it is not cut short. Then the
saga compensates: the steps it completed, that one included, are undone, last
first, and it ends compensated (or in needs_attention, if a compensation fails
for good). If no runner of DEFINITION is running, the request waits until one
starts. Follow it with stele sagas show DEFINITION ID.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			definition, id := args[0], args[1]
			ctx := cmd.Context()
			store, closeStore, err := g.openSaga(ctx, definition)
			if err != nil {
				return err
			}
			defer closeStore()
			err = saga.Abort(ctx, store, definition, id, reason) // retried on a conflict with the runner
			if err != nil {
				return noSaga(err, definition, id, g.schema)
			}
			why := ""
			if reason != "" {
				why = " (" + oneLine(reason) + ")"
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "requested the abort of saga %s %s%s: the step under way finishes, then the completed steps are compensated, last first.\n"+
				"The running saga runner of %s picks the request up from the feed (or the next one to start does); follow it with: stele sagas show %s %s\n",
				definition, id, why, definition, definition, id)
			return err
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, recorded in the saga's history")
	return cmd
}
