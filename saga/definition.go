// Package saga runs multi-step workflows with compensations: an event starts
// a saga, its steps run in order, and when a step fails for good the steps
// already done are compensated in reverse order.
//
// A saga's state is its own event stream ("saga_<definition>-<saga id>"), so
// a runner that dies resumes every open saga from the log. Commands to other
// services are events in that stream, published by an outbox relay: a saga
// never writes to the database and the broker separately. Deadlines and retry
// times are recorded in the stream too, so they survive restarts.
package saga

import (
	"context"
	"fmt"
	"regexp"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/stele-dev/stele/eventstore"
)

// Definition describes a saga: what starts it and its steps.
type Definition struct {
	// Name identifies the saga type: [a-z0-9_], 1 to 50 bytes. Its
	// instances live in streams of category "saga_<Name>".
	Name string
	// StartedBy is the event type that starts a saga; Category, when set,
	// also requires the event's stream category.
	StartedBy string
	Category  string
	// ID returns the saga id for a starting event. Defaults to the event's
	// stream id: one saga per stream.
	ID func(eventstore.Event) string
	// Steps run in order.
	Steps []Step
	// StepTimeout is the default deadline of one attempt of a step or
	// compensation. Default 30s.
	StepTimeout time.Duration
	// Retry is the default retry policy of steps and compensations.
	Retry RetryPolicy
}

// Step is one step: an action and, optionally, the compensation that undoes
// it. A step without a compensation is skipped when compensating.
type Step struct {
	Name         string
	Action       Action
	Compensation Action
	// Timeout and Retry override the definition's defaults when set.
	Timeout time.Duration
	Retry   *RetryPolicy
}

// Action is what a step or compensation does: a local function (Do) or a
// command sent over the bus whose reply completes it (Send).
type Action struct {
	do    func(context.Context, StepContext) ([]byte, error)
	send  func(StepContext) (topic string, msg *message.Message, err error)
	await *awaited
}

// awaited is the event that completes a step.
type awaited struct {
	eventType string
	sagaID    func(eventstore.Event) string
}

// Await makes an action that waits for an event: the step completes when
// an event of eventType is appended (by any service sharing the store) and
// sagaID, given that event, names this saga. The event's data becomes the
// step's output. An event that comes before the saga reaches the step is
// kept and completes the step when it starts. The step's deadline and
// retries apply to the wait.
func Await(eventType string, sagaID func(eventstore.Event) string) Action {
	return Action{await: &awaited{eventType: eventType, sagaID: sagaID}}
}

// Until makes a Send action complete when an event of eventType for this
// saga is appended, as well as on a reply: for services that answer a
// command with an event in the shared store rather than a message.
func (a Action) Until(eventType string, sagaID func(eventstore.Event) string) Action {
	a.await = &awaited{eventType: eventType, sagaID: sagaID}
	return a
}

// Do makes an action of a function run by the saga runner. Its output is
// recorded and given to later steps. It must be idempotent by
// StepContext.Key: after a crash it may run again with the same key.
func Do(fn func(ctx context.Context, sc StepContext) ([]byte, error)) Action { return Action{do: fn} }

// Send makes an action of a command: fn returns the topic and message. The
// message leaves through the saga's stream and the outbox relay, carrying
// the idempotency key (metadata "idempotency_key"), a correlation id and
// "reply_to". The step completes when the reply arrives (bus.Reply; a
// bus.ReplyError fails it, permanently if the error was bus.Permanent). The
// receiving service must treat a repeated key as the same command, and
// answer it again.
func Send(fn func(sc StepContext) (topic string, msg *message.Message, err error)) Action {
	return Action{send: fn}
}

func (a Action) defined() bool { return a.do != nil || a.send != nil || a.await != nil }

// DoFunc is the function of an action made with Do (nil for others), and
// SendFunc the command builder of one made with Send. Decorators (package
// telemetry) use them to wrap an action in one of the same kind.
func (a Action) DoFunc() func(context.Context, StepContext) ([]byte, error) { return a.do }

// SendFunc: see DoFunc.
func (a Action) SendFunc() func(StepContext) (string, *message.Message, error) { return a.send }

// StepContext is what an action knows.
type StepContext struct {
	SagaID       string
	Step         string
	Compensating bool
	// Uncertain, in a compensation, says the step's action ended without an
	// answer (its last attempt timed out): it may or may not have taken
	// effect, and the compensation must be harmless if it did not.
	Uncertain bool
	Attempt   int
	// Key is the idempotency key: the same for every attempt of a step, and
	// different for its compensation.
	Key string
	// Input is the starting event's data.
	Input []byte
	// Outputs holds the outputs of the steps completed so far, by step name.
	Outputs map[string][]byte
	// TraceParent and TraceState are the W3C trace context of the event
	// that started the saga, so a step's work joins the business action's
	// trace (package telemetry uses them).
	TraceParent, TraceState string
}

// RetryPolicy says how often and how fast a failing step is retried before
// the saga compensates (or, for a compensation, needs attention).
type RetryPolicy struct {
	MaxAttempts int           // including the first; default 5
	Initial     time.Duration // default 100ms
	Max         time.Duration // default 30s
	Multiplier  float64       // default 2
	Jitter      float64       // fraction, default 0.2
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.MaxAttempts <= 0 {
		p.MaxAttempts = 5
	}
	if p.Initial <= 0 {
		p.Initial = 100 * time.Millisecond
	}
	if p.Max <= 0 {
		p.Max = 30 * time.Second
	}
	if p.Multiplier < 1 {
		p.Multiplier = 2
	}
	if p.Jitter <= 0 || p.Jitter >= 1 {
		p.Jitter = 0.2
	}
	return p
}

// delay is the wait before attempt+1, without jitter applied by the caller.
func (p RetryPolicy) delay(attempt int, jitter float64) time.Duration {
	d := float64(p.Initial)
	for range attempt - 1 {
		d *= p.Multiplier
		if d >= float64(p.Max) {
			d = float64(p.Max)
			break
		}
	}
	d *= 1 + p.Jitter*(2*jitter-1)
	return time.Duration(d)
}

var nameRE = regexp.MustCompile(`^[a-z0-9_]{1,50}$`)

// DefinitionError is a definition NewRunner refuses.
type DefinitionError struct{ Field, Reason string }

func (e *DefinitionError) Error() string { return "saga: Definition." + e.Field + ": " + e.Reason }

func (d Definition) validate() (Definition, error) {
	if !nameRE.MatchString(d.Name) {
		return d, &DefinitionError{"Name", fmt.Sprintf("%q: want [a-z0-9_], 1 to 50 bytes", d.Name)}
	}
	if d.StartedBy == "" {
		return d, &DefinitionError{"StartedBy", "required"}
	}
	if len(d.Steps) == 0 {
		return d, &DefinitionError{"Steps", "at least one"}
	}
	seen := map[string]bool{}
	for i, s := range d.Steps {
		if s.Name == "" || seen[s.Name] {
			return d, &DefinitionError{fmt.Sprintf("Steps[%d].Name", i), fmt.Sprintf("%q: want a unique, non-empty name", s.Name)}
		}
		seen[s.Name] = true
		if !s.Action.defined() {
			return d, &DefinitionError{fmt.Sprintf("Steps[%d].Action", i), "required (saga.Do, saga.Send or saga.Await)"}
		}
		if a := s.Action.await; a != nil && (a.eventType == "" || a.sagaID == nil || s.Action.do != nil) {
			return d, &DefinitionError{fmt.Sprintf("Steps[%d].Action", i), "an awaited event needs a type and a saga id function, and cannot complete a Do action"}
		}
		if s.Compensation.await != nil {
			return d, &DefinitionError{fmt.Sprintf("Steps[%d].Compensation", i), "a compensation cannot await an event"}
		}
	}
	if d.StepTimeout <= 0 {
		d.StepTimeout = 30 * time.Second
	}
	d.Retry = d.Retry.withDefaults()
	if d.ID == nil {
		d.ID = func(e eventstore.Event) string { return e.StreamID }
	}
	return d, nil
}

func (d Definition) timeout(step int) time.Duration {
	if t := d.Steps[step].Timeout; t > 0 {
		return t
	}
	return d.StepTimeout
}

func (d Definition) retry(step int) RetryPolicy {
	if r := d.Steps[step].Retry; r != nil {
		return r.withDefaults()
	}
	return d.Retry
}

// Category is the stream category of a definition's sagas.
func Category(definition string) string { return "saga_" + definition }

// StreamID is the stream of one saga.
func StreamID(definition, id string) string { return Category(definition) + "-" + id }
