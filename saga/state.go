package saga

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/stele-dev/stele/eventstore"
)

// Status is where a saga is.
type Status string

const (
	Running        Status = "running"
	Compensating   Status = "compensating"
	Completed      Status = "completed"
	Compensated    Status = "compensated"
	NeedsAttention Status = "needs_attention"
)

// Done reports whether s is an end state. NeedsAttention is one until an
// operator retries the saga.
func (s Status) Done() bool { return s == Completed || s == Compensated || s == NeedsAttention }

// Event types of a saga's stream.
const (
	TypeStarted        = "saga.started"
	TypeStepStarted    = "saga.step_started"
	TypeStepSucceeded  = "saga.step_succeeded"
	TypeStepFailed     = "saga.step_failed"
	TypeCompensating   = "saga.compensating"
	TypeCompleted      = "saga.completed"
	TypeCompensated    = "saga.compensated"
	TypeNeedsAttention = "saga.needs_attention"
	TypeRetryRequested = "saga.retry_requested"
	TypeEventReceived  = "saga.event_received"
	TypeAbortRequested = "saga.abort_requested"
)

// record is the body of every saga event; each type uses some fields.
type record struct {
	Input        json.RawMessage `json:"input,omitempty"`       // started: the starting event's data, when JSON
	InputBytes   []byte          `json:"input_bytes,omitempty"` // started: the starting event's data, when not
	InputType    string          `json:"input_type,omitempty"`
	Step         int             `json:"step"`
	StepName     string          `json:"step_name,omitempty"`
	Compensating bool            `json:"compensating,omitempty"`
	Attempt      int             `json:"attempt,omitempty"`
	Deadline     time.Time       `json:"deadline,omitzero"` // step_started: when the attempt times out
	RetryAt      time.Time       `json:"retry_at,omitzero"` // step_failed: when the next attempt may start (zero: none)
	Permanent    bool            `json:"permanent,omitempty"`
	Uncertain    bool            `json:"uncertain,omitempty"` // compensating: the failed step's outcome is unknown
	TimedOut     bool            `json:"timed_out,omitempty"` // step_failed (of a step): the attempt ended without an answer
	Error        string          `json:"error,omitempty"`
	Output       []byte          `json:"output,omitempty"`
	Reason       string          `json:"reason,omitempty"`
	// Command, for a Send action: where it goes and what it carries.
	Topic    string            `json:"topic,omitempty"`
	Payload  []byte            `json:"payload,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// HistoryEntry is one event of a saga's history, for people.
type HistoryEntry struct {
	At           time.Time
	Type         string
	Step         string
	Compensating bool
	Attempt      int
	Detail       string // an error, a reason, a deadline, or a step's output
}

// Instance is a saga as its stream tells it.
type Instance struct {
	Definition string
	ID         string
	Status     Status
	Version    eventstore.Version
	Input      []byte
	StartedAt  time.Time
	UpdatedAt  time.Time
	// Completed lists the steps whose action succeeded, in order;
	// Compensated those whose compensation did.
	Completed   []int
	Compensated map[int]bool
	// Uncertain is the step whose last attempt ended without an answer (it
	// timed out) when the saga began compensating, or -1. Its action may
	// have taken effect, so it is compensated first.
	Uncertain int
	Outputs   map[int][]byte
	// Received holds the data of awaited events that arrived, by step.
	Received map[int][]byte
	// The step (or compensation) under way.
	Current      int
	Attempt      int
	InFlight     bool      // started, no result yet
	Deadline     time.Time // of the attempt in flight
	RetryAt      time.Time // when a failed attempt may be retried (zero: not waiting)
	LastError    string
	FailedReason string // why the saga compensates: the step that failed for good, or an abort
	// AttentionReason says which compensation failed for good while the saga
	// needs attention; a retry clears it.
	AttentionReason string
	AbortReason     string // an operator asked to abort; set while the step under way finishes
	History         []HistoryEntry

	traceParent, traceState string // of the starting event
	// timedOut: the last attempt of the step under way (Current) failed
	// without an answer, so it may have acted.
	timedOut bool
}

// fold builds an Instance from a saga's events.
func fold(definition, id string, events []eventstore.Event) (*Instance, error) {
	in := &Instance{Definition: definition, ID: id, Compensated: map[int]bool{}, Outputs: map[int][]byte{}, Received: map[int][]byte{}, Current: -1, Uncertain: -1}
	for _, e := range events {
		if err := in.apply(e); err != nil {
			return nil, err
		}
	}
	return in, nil
}

func (in *Instance) apply(e eventstore.Event) error {
	var r record
	if err := json.Unmarshal(e.Data, &r); err != nil {
		return fmt.Errorf("saga %s: event %d (%s): %w", in.ID, e.Version, e.Type, err)
	}
	in.Version, in.UpdatedAt = e.Version, e.RecordedAt
	h := HistoryEntry{At: e.RecordedAt, Type: strings.TrimPrefix(e.Type, "saga."), Step: r.StepName,
		Compensating: r.Compensating, Attempt: r.Attempt}
	switch e.Type {
	case TypeStarted:
		in.Status, in.Input, in.StartedAt = Running, r.Input, e.RecordedAt
		in.traceParent, in.traceState = e.Metadata.TraceParent, e.Metadata.TraceState
		if r.InputBytes != nil {
			in.Input = r.InputBytes
		}
	case TypeStepStarted:
		in.Current, in.Attempt, in.InFlight, in.Deadline, in.RetryAt = r.Step, r.Attempt, true, r.Deadline, time.Time{}
		in.timedOut = false
		h.Detail = "deadline " + r.Deadline.Format(time.RFC3339Nano)
	case TypeStepSucceeded:
		h.Detail = string(r.Output)
		if r.Reason != "" {
			h.Detail = r.Reason
		}
		in.InFlight, in.RetryAt, in.LastError = false, time.Time{}, ""
		if r.Compensating {
			in.Compensated[r.Step] = true
		} else {
			in.Completed = append(in.Completed, r.Step)
			in.Outputs[r.Step] = r.Output
		}
		in.Current, in.Attempt = -1, 0
	case TypeStepFailed:
		in.InFlight, in.RetryAt, in.LastError, in.timedOut = false, r.RetryAt, r.Error, r.TimedOut
		h.Detail = r.Error
	case TypeCompensating:
		in.Status, in.FailedReason, in.Uncertain = Compensating, r.Reason, -1
		if r.Uncertain {
			in.Uncertain = r.Step
		}
		in.Current, in.Attempt, in.InFlight, in.RetryAt = -1, 0, false, time.Time{}
		h.Detail = r.Reason
	case TypeCompleted:
		in.Status = Completed
	case TypeCompensated:
		in.Status = Compensated
	case TypeNeedsAttention:
		in.Status, in.AttentionReason = NeedsAttention, r.Reason
		in.InFlight, in.RetryAt = false, time.Time{}
		h.Detail = r.Reason
	case TypeRetryRequested:
		// An operator sends a saga that needs attention back to work: the
		// compensation (or step) that failed gets a fresh set of attempts.
		// Only compensations end a saga in needs-attention.
		if in.Status == NeedsAttention {
			in.Status, in.AttentionReason, in.LastError = Compensating, "", ""
			in.Current, in.Attempt, in.RetryAt = -1, 0, time.Time{}
		}
		h.Detail = r.Reason
	case TypeEventReceived:
		if _, ok := in.Received[r.Step]; !ok {
			in.Received[r.Step] = r.Output
		}
		h.Detail = r.Reason
	case TypeAbortRequested:
		// The step under way, if any, finishes first (its effect may have
		// happened); then the runner compensates.
		if in.Status == Running && in.AbortReason == "" { // the first request's reason stands
			in.AbortReason = "aborted: " + r.Reason
			if r.Reason == "" {
				in.AbortReason = "aborted"
			}
		}
		h.Detail = r.Reason
	default:
		return fmt.Errorf("saga %s: unknown event type %s", in.ID, e.Type)
	}
	in.History = append(in.History, h)
	return nil
}

// nextCompensation is the step to undo next: the uncertain step, then the
// completed steps last first; -1 when every one is undone.
func (in *Instance) nextCompensation() int {
	if in.Uncertain >= 0 && !in.Compensated[in.Uncertain] {
		return in.Uncertain
	}
	for i := len(in.Completed) - 1; i >= 0; i-- {
		if s := in.Completed[i]; !in.Compensated[s] {
			return s
		}
	}
	return -1
}

// StepContext for step in this instance.
func (in *Instance) stepContext(def Definition, step int, compensating bool, attempt int) StepContext {
	outs := make(map[string][]byte, len(in.Outputs))
	for i, o := range in.Outputs {
		outs[def.Steps[i].Name] = o
	}
	key := in.Definition + ":" + in.ID + ":" + def.Steps[step].Name
	if compensating {
		key += ":compensate"
	}
	return StepContext{SagaID: in.ID, Step: def.Steps[step].Name, Compensating: compensating, Attempt: attempt,
		Uncertain: compensating && step == in.Uncertain, Key: key, Input: in.Input, Outputs: outs, TraceParent: in.traceParent, TraceState: in.traceState}
}
