// Package projection feeds read models from the event log. A Runner reads
// the global feed from its checkpoint, in order and in batches, hands each
// event to your handler, and moves the checkpoint on.
//
// Two kinds of handler:
//
//   - TxHandler writes a read model in the same PostgreSQL database through
//     the runner's transaction, and the checkpoint commits in that same
//     transaction: each event takes effect exactly once, whatever crashes.
//   - Handler writes anywhere else (a cache, an index, a file). Events arrive
//     at least once: after a crash the events since the last checkpoint come
//     again. Use Event.Position to make writes idempotent.
//
// A handler that keeps failing is retried with exponential backoff and
// jitter, then the event is parked in a dead-letter table and the runner goes
// on (PolicyPark), or the runner stops with the error (PolicyStop, the
// default). With a database the runner holds a lease (a PostgreSQL advisory
// lock on its own connection): of several runners with one name, one works and
// the others wait to take over when it dies.
package projection

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

// Handler receives events at least once, in feed order.
type Handler interface {
	Handle(ctx context.Context, e eventstore.Event) error
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, e eventstore.Event) error

// Handle calls f.
func (f HandlerFunc) Handle(ctx context.Context, e eventstore.Event) error { return f(ctx, e) }

// TxHandler writes through the runner's transaction; the checkpoint commits
// with it, so each event takes effect exactly once.
type TxHandler interface {
	HandleTx(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error
}

// TxHandlerFunc adapts a function to TxHandler.
type TxHandlerFunc func(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error

// HandleTx calls f.
func (f TxHandlerFunc) HandleTx(ctx context.Context, tx *sqlx.Tx, e eventstore.Event) error {
	return f(ctx, tx, e)
}

// BatchTxHandler is a TxHandler that takes a whole batch at once, to write
// the read model set-based (one multi-row statement instead of one per
// event): what a rebuild over millions of events needs. If a batch fails,
// the runner hands it the events one at a time.
type BatchTxHandler interface {
	HandleBatchTx(ctx context.Context, tx *sqlx.Tx, events []eventstore.Event) error
}

// Policy says what happens to an event whose handler fails every retry.
type Policy int

const (
	// PolicyStop stops the runner with the error; the checkpoint stays before
	// the event, so fixing the cause and starting again resumes there.
	PolicyStop Policy = iota
	// PolicyPark records the event as a dead letter and goes on.
	PolicyPark
)

// Config tunes a Runner.
type Config struct {
	// Name identifies the projection: its checkpoint, dead letters and lease.
	// Required; [a-z0-9_.@-], at most 100 bytes.
	Name string
	// Category, when set, feeds only that category's streams.
	Category string
	// From and Since say where a projection with no checkpoint yet starts:
	// after position From (default: the beginning of the log), and only with
	// events recorded at or after Since (default: all). Together with a new
	// Name they replay the log into a fresh read model, for audit, debugging
	// or time travel. Once a checkpoint exists they are ignored, except that
	// Since keeps filtering.
	From  eventstore.Position
	Since time.Time
	// BatchSize is how many events are read, handled and checkpointed
	// together. Defaults to 100.
	BatchSize int
	// Retries is how many times a failing event is retried before Policy
	// applies. Defaults to 5.
	Retries int
	// Backoff is the first wait before a retry; each next wait doubles, with
	// jitter, up to MaxBackoff. Defaults 50ms and 5s.
	Backoff, MaxBackoff time.Duration
	// Policy for an event that fails every retry. Defaults to PolicyStop.
	Policy Policy
	// DB and Schema hold the checkpoint, dead letters and lease: the schema
	// pgstore migrated. Required for a TxHandler. Without DB, checkpoints and
	// dead letters are kept in memory (tests, memstore).
	DB     *sqlx.DB
	Schema string
	// Tenant binds the runner to a tenant (pgstore.Store.ForTenant): its
	// checkpoint, dead letters and every transaction it opens, a TxHandler's
	// included, belong to that tenant, so read-model rows written there take
	// it too. Requires DB. When the store is bound to a tenant (it has a
	// Tenant method) and Tenant is empty, the store's tenant is used.
	Tenant string
	// LeaseRetry is how often a runner waiting for the lease tries to take
	// it. Defaults to 1s.
	LeaseRetry time.Duration
	// Logger receives parked events and lease changes. Defaults to slog.Default().
	Logger *slog.Logger
}

var nameRE = regexp.MustCompile(`^[a-z0-9_.@-]{1,100}$`) // '@' joins a name and a rebuild slot

func (c Config) withDefaults(tx bool) (Config, error) {
	var errs []error
	if !nameRE.MatchString(c.Name) {
		errs = append(errs, fmt.Errorf("projection: Config.Name %q: want 1-100 of [a-z0-9_.@-]", c.Name))
	}
	if tx && c.DB == nil {
		errs = append(errs, errors.New("projection: Config.DB is required for a TxHandler"))
	}
	if c.DB != nil && c.Schema == "" {
		errs = append(errs, errors.New("projection: Config.Schema is required with Config.DB"))
	}
	if c.Tenant != "" {
		if err := pgstore.ValidateTenant(c.Tenant); err != nil {
			errs = append(errs, fmt.Errorf("projection: Config.Tenant: %w", err))
		}
		if c.DB == nil {
			errs = append(errs, errors.New("projection: Config.DB is required with Config.Tenant"))
		}
	}
	if c.BatchSize < 0 || c.Retries < 0 || c.Backoff < 0 || c.MaxBackoff < 0 {
		errs = append(errs, errors.New("projection: Config.BatchSize, Retries, Backoff and MaxBackoff must not be negative"))
	}
	if c.Policy != PolicyStop && c.Policy != PolicyPark {
		errs = append(errs, fmt.Errorf("projection: Config.Policy %d: want PolicyStop or PolicyPark", c.Policy))
	}
	if err := errors.Join(errs...); err != nil {
		return c, err
	}
	if c.BatchSize == 0 {
		c.BatchSize = 100
	}
	if c.Retries == 0 {
		c.Retries = 5
	}
	if c.Backoff == 0 {
		c.Backoff = 50 * time.Millisecond
	}
	if c.MaxBackoff == 0 {
		c.MaxBackoff = 5 * time.Second
	}
	if c.LeaseRetry == 0 {
		c.LeaseRetry = time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c, nil
}

// State of a runner.
type State string

const (
	StateIdle    State = "idle"    // not started
	StateWaiting State = "waiting" // waiting for the lease
	StateRunning State = "running"
	StateStopped State = "stopped" // Stop was called
	StateFailed  State = "failed"  // an event failed every retry under PolicyStop
)

// Status is what `stele projections status` shows.
type Status struct {
	Name        string
	State       State
	Position    eventstore.Position // checkpoint: the last event handled
	LagEvents   int                 // events readable after the checkpoint (counted up to 100,000)
	LagSeconds  float64             // age of the oldest unhandled event
	DeadLetters int
	Err         error // why a failed runner stopped
}

// DeadLetter is an event parked after its handler failed every retry.
type DeadLetter struct {
	ID         int64
	Projection string
	StreamID   string
	Version    eventstore.Version
	Position   eventstore.Position
	EventID    string
	EventType  string
	Error      string
	Attempts   int
	FailedAt   time.Time
}

// errNoRows is sql.ErrNoRows, named for the checkpoint load.
var errNoRows = sql.ErrNoRows
