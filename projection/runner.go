package projection

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

// Runner feeds one projection. Start it, Stop it; Status says how far it is.
type Runner struct {
	store eventstore.Store
	h     Handler        // nil for a TxHandler
	th    BatchTxHandler // nil for a Handler
	cfg   Config
	sql   queries

	mu      sync.Mutex
	state   State
	pos     eventstore.Position
	err     error
	parked  []DeadLetter // without a DB
	cancel  context.CancelFunc
	done    chan struct{}
	started bool
	held    bool // has held the lease: may record its state
}

// NewRunner returns a runner that feeds handler (a Handler, a TxHandler or
// a BatchTxHandler) from store.
func NewRunner(store eventstore.Store, handler any, cfg Config) (*Runner, error) {
	r := &Runner{store: store, state: StateIdle}
	switch h := handler.(type) {
	case BatchTxHandler:
		r.th = h
	case TxHandler:
		r.th = oneByOne{h}
	case Handler:
		r.h = h
	default:
		return nil, fmt.Errorf("projection: NewRunner: handler %T is neither a Handler nor a TxHandler", handler)
	}
	if store == nil {
		return nil, errors.New("projection: NewRunner: store is nil")
	}
	// The feed comes from the store: the runner's tenant must be the store's.
	storeTenant := ""
	if t, ok := store.(interface{ Tenant() string }); ok {
		storeTenant = t.Tenant()
	}
	if cfg.Tenant == "" {
		cfg.Tenant = storeTenant
	} else if cfg.Tenant != storeTenant {
		return nil, fmt.Errorf("projection: NewRunner: Config.Tenant %q but the store is bound to tenant %q (use pgstore.Store.ForTenant)", cfg.Tenant, storeTenant)
	}
	var err error
	if r.cfg, err = cfg.withDefaults(r.th != nil); err != nil {
		return nil, err
	}
	if r.cfg.DB != nil {
		if r.sql, err = newQueries(r.cfg.Schema); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Start begins feeding in the background and returns at once. The runner
// first waits for the lease (with a DB), then catches up from its checkpoint
// and follows the feed live until Stop, ctx's end, or a failure under
// PolicyStop.
func (r *Runner) Start(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started {
		return errors.New("projection: runner already started")
	}
	r.started = true
	ctx, r.cancel = context.WithCancel(ctx)
	r.done = make(chan struct{})
	go func() {
		defer close(r.done)
		r.run(ctx)
	}()
	return nil
}

// Stop ends the runner and waits for it (or for ctx). Stopping twice is fine.
func (r *Runner) Stop(ctx context.Context) error {
	r.mu.Lock()
	if !r.started {
		r.mu.Unlock()
		return nil
	}
	r.cancel()
	done := r.done
	r.mu.Unlock()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Done is closed when the runner has ended; Err then says why if it failed.
func (r *Runner) Done() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.done
}

// Err is the failure that stopped the runner, if any.
func (r *Runner) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

func (r *Runner) setState(ctx context.Context, s State) {
	r.mu.Lock()
	changed := r.state != s
	r.state = s
	r.held = r.held || s == StateRunning
	held, err := r.held, r.err
	r.mu.Unlock()
	// A runner waiting for the lease must not overwrite what the holder said.
	if changed && r.cfg.DB != nil && held {
		r.reportState(ctx, s, err)
	}
}

// reportState records the state for `stele projections status`; only the
// running process knows it. Best effort: the projection does not depend on it.
func (r *Runner) reportState(ctx context.Context, s State, cause error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	var msg *string
	if cause != nil {
		m := cause.Error()
		msg = &m
	}
	if err := r.onDB(ctx, func(q querier) error {
		_, err := q.ExecContext(ctx, r.sql.setState, r.cfg.Name, string(s), msg)
		return err
	}); err != nil {
		r.cfg.Logger.WarnContext(ctx, "projection: recording state failed", "projection", r.cfg.Name, "state", s, "err", err)
	}
}

func (r *Runner) run(ctx context.Context) {
	for ctx.Err() == nil {
		err := r.session(ctx)
		if ctx.Err() != nil {
			break
		}
		var fatal *failedError
		if errors.As(err, &fatal) {
			r.mu.Lock()
			r.err = fatal.err
			r.mu.Unlock()
			r.setState(ctx, StateFailed)
			r.cfg.Logger.ErrorContext(ctx, "projection stopped", "projection", r.cfg.Name, "err", fatal.err)
			return
		}
		// The database went away or the lease was lost: start over.
		r.cfg.Logger.WarnContext(ctx, "projection session ended; retrying", "projection", r.cfg.Name, "err", err)
		if !sleep(ctx, r.cfg.LeaseRetry) {
			break
		}
	}
	r.setState(ctx, StateStopped)
}

// failedError is an event that failed every retry under PolicyStop.
type failedError struct{ err error }

func (e *failedError) Error() string { return e.err.Error() }

// session holds the lease (with a DB) and feeds until an error.
func (r *Runner) session(ctx context.Context) error {
	var conn *sqlx.Conn
	if r.cfg.DB != nil {
		r.setState(ctx, StateWaiting)
		var err error
		if conn, err = r.acquireLease(ctx); err != nil {
			return err
		}
		defer r.releaseLease(ctx, conn)
	}
	pos, err := r.loadCheckpoint(ctx, conn)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.pos = pos
	r.mu.Unlock()
	r.setState(ctx, StateRunning)
	read := eventstore.ReadAllOpts{After: pos, Category: r.cfg.Category, Since: r.cfg.Since, Limit: r.cfg.BatchSize}
	var lastRetryCheck time.Time
	for {
		wake := r.store.WaitForAppend()
		page, err := r.store.ReadAll(ctx, read)
		if err != nil {
			return fmt.Errorf("reading the feed after %s: %w", read.After, err)
		}
		if conn != nil && time.Since(lastRetryCheck) > time.Second {
			lastRetryCheck = time.Now()
			r.retryRequested(ctx)
		}
		if len(page) == 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-wake:
				continue
			case <-time.After(retryRequestPoll):
				continue
			}
		}
		if r.th != nil {
			err = r.txBatch(ctx, conn, page)
		} else {
			err = r.batch(ctx, conn, page)
		}
		if err != nil {
			return err
		}
		read.After = page[len(page)-1].Position
		r.mu.Lock()
		r.pos = read.After
		r.mu.Unlock()
	}
}

// retryRequestPoll bounds how long a requested dead-letter retry waits while
// the projection is idle.
const retryRequestPoll = 2 * time.Second

// retryRequested handles the dead letters an operator asked to retry. A
// failure leaves the dead letter with its new error, not the runner stopped.
func (r *Runner) retryRequested(ctx context.Context) {
	var ids []int64
	if err := r.onDB(ctx, func(q querier) error {
		return sqlx.SelectContext(ctx, q, &ids, r.sql.requested, r.cfg.Name)
	}); err != nil {
		r.cfg.Logger.WarnContext(ctx, "projection: reading retry requests failed", "projection", r.cfg.Name, "err", err)
		return
	}
	var handler any = r.h
	if r.th != nil {
		handler = r.th
		if o, ok := r.th.(oneByOne); ok {
			handler = o.h
		}
	}
	for _, id := range ids {
		err := retryDeadLetter(ctx, r.sql, r.store, r.cfg.DB, r.cfg.Tenant, id, handler)
		if err != nil {
			r.onDB(ctx, func(q querier) error { //nolint:errcheck // the next request retries
				_, err := q.ExecContext(ctx, `UPDATE `+r.sql.table+` SET retry_requested_at = NULL, error = $2, attempts = attempts + 1, failed_at = now() WHERE id = $1`, id, err.Error())
				return err
			})
		}
		r.cfg.Logger.InfoContext(ctx, "projection retried a dead letter", "projection", r.cfg.Name, "id", id, "err", err)
	}
}

// acquireLease takes the projection's advisory lock on a connection of its
// own, waiting while another runner holds it. The runner writes through this
// connection, so one that lost its connection (and with it the lease) can no
// longer write: fencing.
func (r *Runner) acquireLease(ctx context.Context) (*sqlx.Conn, error) {
	for {
		conn, err := r.cfg.DB.Connx(ctx)
		if err != nil {
			return nil, fmt.Errorf("connecting for the lease: %w", err)
		}
		var got bool
		err = conn.GetContext(ctx, &got, `SELECT pg_try_advisory_lock(hashtextextended($1, 0))`, r.leaseKey())
		if err == nil && got && r.cfg.Tenant != "" {
			// Session-wide on this connection, which the runner alone
			// uses; releaseLease discards the connection rather than hand
			// the setting back to the pool (RESET would not restore a
			// tenant the pool itself set, as pgstore.OpenForTenant does).
			_, err = conn.ExecContext(ctx, `SELECT set_config('`+pgstore.TenantSetting+`', $1, false)`, r.cfg.Tenant)
			if err != nil {
				conn.Raw(func(any) error { return driver.ErrBadConn }) //nolint:errcheck // drops the session and its lock
			}
		}
		if err == nil && got {
			r.cfg.Logger.InfoContext(ctx, "projection lease taken", "projection", r.cfg.Name)
			return conn, nil
		}
		conn.Close()
		if err != nil {
			return nil, fmt.Errorf("taking the lease: %w", err)
		}
		if !sleep(ctx, r.cfg.LeaseRetry) {
			return nil, ctx.Err()
		}
	}
}

// releaseLease unlocks and returns the connection. Returning a connection to
// the pool does not end its session, so the lock must be let go explicitly;
// if the connection is broken, the server has already dropped the lock.
func (r *Runner) releaseLease(ctx context.Context, conn *sqlx.Conn) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	var unlocked bool
	err := conn.GetContext(ctx, &unlocked, `SELECT pg_advisory_unlock(hashtextextended($1, 0))`, r.leaseKey())
	if err == nil && unlocked && r.cfg.Tenant != "" {
		conn.Raw(func(any) error { return driver.ErrBadConn }) //nolint:errcheck // the session's tenant goes with it
		conn.Close()
		return
	}
	if err != nil || !unlocked {
		// Do not hand a session that may still hold the lock back to the
		// pool: make database/sql throw the connection away.
		level := slog.LevelWarn
		if errors.Is(err, sql.ErrConnDone) || errors.Is(err, driver.ErrBadConn) {
			// The connection died with the runner's context (pgx closes it
			// on cancel); its session, and the lock with it, is gone.
			level = slog.LevelDebug
		}
		r.cfg.Logger.Log(ctx, level, "projection: releasing the lease failed; dropping the connection", "projection", r.cfg.Name, "err", err)
		conn.Raw(func(any) error { return driver.ErrBadConn })
	}
	conn.Close()
}

// batch hands a page to a Handler (at least once) and then checkpoints it.
func (r *Runner) batch(ctx context.Context, conn *sqlx.Conn, page []eventstore.Event) error {
	for _, e := range page {
		err := r.retry(ctx, func() error { return r.h.Handle(ctx, e) })
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if r.cfg.Policy == PolicyStop {
			// Checkpoint what went through, so a restart resumes at e.
			if cerr := r.saveCheckpoint(ctx, conn, e.Position, true); cerr != nil {
				return cerr
			}
			return &failedError{fmt.Errorf("projection %s: %s v%d (%s) at %s: %w", r.cfg.Name, e.StreamID, e.Version, e.Type, e.Position, err)}
		}
		if err := r.park(ctx, conn, nil, e, err); err != nil {
			return err
		}
	}
	return r.saveCheckpoint(ctx, conn, page[len(page)-1].Position, false)
}

// txBatch handles a page in one transaction with its checkpoint. If a handler
// fails, the page is rolled back and handled again one event per transaction,
// so the failing event is retried (and parked or stopped at) by itself.
func (r *Runner) txBatch(ctx context.Context, conn *sqlx.Conn, page []eventstore.Event) error {
	err := r.inTx(ctx, conn, func(tx *sqlx.Tx) error {
		if err := r.th.HandleBatchTx(ctx, tx, page); err != nil {
			return &handlerError{err}
		}
		return r.sql.saveCheckpoint(ctx, tx, r.cfg.Name, page[len(page)-1].Position)
	})
	var he *handlerError
	if err == nil || !errors.As(err, &he) {
		return err
	}
	for _, e := range page {
		err := r.retry(ctx, func() error {
			return r.inTx(ctx, conn, func(tx *sqlx.Tx) error {
				if err := r.th.HandleBatchTx(ctx, tx, []eventstore.Event{e}); err != nil {
					return &handlerError{err}
				}
				return r.sql.saveCheckpoint(ctx, tx, r.cfg.Name, e.Position)
			})
		})
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !errors.As(err, &he) {
			return err // the database, not the handler: the session starts over
		}
		err = he.err
		if r.cfg.Policy == PolicyStop {
			return &failedError{fmt.Errorf("projection %s: %s v%d (%s) at %s: %w", r.cfg.Name, e.StreamID, e.Version, e.Type, e.Position, err)}
		}
		if err := r.inTx(ctx, conn, func(tx *sqlx.Tx) error {
			if err := r.park(ctx, nil, tx, e, err); err != nil {
				return err
			}
			return r.sql.saveCheckpoint(ctx, tx, r.cfg.Name, e.Position)
		}); err != nil {
			return err
		}
	}
	return nil
}

// oneByOne runs a TxHandler as a BatchTxHandler.
type oneByOne struct{ h TxHandler }

func (o oneByOne) HandleBatchTx(ctx context.Context, tx *sqlx.Tx, events []eventstore.Event) error {
	for _, e := range events {
		if err := o.h.HandleTx(ctx, tx, e); err != nil {
			return err
		}
	}
	return nil
}

type handlerError struct{ err error }

func (e *handlerError) Error() string { return e.err.Error() }
func (e *handlerError) Unwrap() error { return e.err }

func (r *Runner) inTx(ctx context.Context, conn *sqlx.Conn, fn func(*sqlx.Tx) error) error {
	tx, err := conn.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// retry runs fn until it succeeds, ctx ends, or Config.Retries retries have
// failed, waiting with exponential backoff and full jitter between tries.
func (r *Runner) retry(ctx context.Context, fn func() error) error {
	wait := r.cfg.Backoff
	for attempt := 0; ; attempt++ {
		err := fn()
		if err == nil || attempt == r.cfg.Retries || ctx.Err() != nil {
			return err
		}
		if !sleep(ctx, rand.N(wait)+time.Millisecond) {
			return err
		}
		wait = min(2*wait, r.cfg.MaxBackoff)
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (r *Runner) loadCheckpoint(ctx context.Context, conn *sqlx.Conn) (eventstore.Position, error) {
	if conn == nil {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.pos == eventstore.Start {
			return r.cfg.From, nil
		}
		return r.pos, nil
	}
	p, err := r.sql.loadCheckpoint(ctx, conn, r.cfg.Name)
	if err == nil && p == eventstore.Start {
		p = r.cfg.From
	}
	return p, err
}

// saveCheckpoint records pos; with before, the checkpoint goes just before
// pos (a failed event is handled again on restart).
func (r *Runner) saveCheckpoint(ctx context.Context, conn *sqlx.Conn, pos eventstore.Position, before bool) error {
	if before {
		r.mu.Lock()
		pos = r.pos // the last page's end: every event before the failed one of this page is handled again (at least once)
		r.mu.Unlock()
	}
	if conn == nil {
		r.mu.Lock()
		r.pos = pos
		r.mu.Unlock()
		return nil
	}
	return r.sql.saveCheckpoint(ctx, conn, r.cfg.Name, pos)
}

// park records e as a dead letter, in tx or conn (or memory without a DB).
func (r *Runner) park(ctx context.Context, conn *sqlx.Conn, tx *sqlx.Tx, e eventstore.Event, cause error) error {
	r.cfg.Logger.WarnContext(ctx, "projection parked an event", "projection", r.cfg.Name, "stream", e.StreamID, "version", e.Version, "err", cause)
	attempts := r.cfg.Retries + 1
	switch {
	case tx != nil:
		return r.sql.park(ctx, tx, r.cfg.Name, e, cause, attempts)
	case conn != nil:
		return r.sql.park(ctx, conn, r.cfg.Name, e, cause, attempts)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.parked = append(r.parked, DeadLetter{
		ID: int64(len(r.parked) + 1), Projection: r.cfg.Name, StreamID: e.StreamID, Version: e.Version,
		Position: e.Position, EventID: e.ID.String(), EventType: e.Type, Error: cause.Error(),
		Attempts: attempts, FailedAt: time.Now(),
	})
	return nil
}

// Status reports the runner's position, lag, state and dead letters.
func (r *Runner) Status(ctx context.Context) (Status, error) {
	r.mu.Lock()
	st := Status{Name: r.cfg.Name, State: r.state, Position: r.pos, Err: r.err, DeadLetters: len(r.parked)}
	r.mu.Unlock()
	if r.cfg.DB != nil {
		var n int
		err := r.onDB(ctx, func(q querier) error {
			var err error
			n, err = r.sql.countDeadLetters(ctx, q, r.cfg.Name)
			return err
		})
		if err != nil {
			return st, err
		}
		st.DeadLetters = n
	}
	lag, age, err := Lag(ctx, r.store, st.Position, r.cfg.Category)
	st.LagEvents, st.LagSeconds = lag, age
	return st, err
}

// MaxLagCount caps Lag's count: past it the answer is "at least".
const MaxLagCount = 100_000

// Lag counts the events readable after pos (up to 100,000) and the age in
// seconds of the first of them (0 when caught up).
func Lag(ctx context.Context, store eventstore.Store, pos eventstore.Position, category string) (int, float64, error) {
	return lagUpTo(ctx, store, pos, category, MaxLagCount)
}

// lagUpTo is Lag counting at most limit events.
func lagUpTo(ctx context.Context, store eventstore.Store, pos eventstore.Position, category string, limit int) (int, float64, error) {
	n, age := 0, 0.0
	for e, err := range eventstore.IterAll(ctx, store, eventstore.ReadAllOpts{After: pos, Category: category, Limit: min(limit, 1000)}) {
		if err != nil {
			return n, age, err
		}
		if n == 0 {
			age = time.Since(e.RecordedAt).Seconds()
		}
		if n++; n == limit {
			break
		}
	}
	return n, age, nil
}

// progress is the runner's position and state without measuring lag.
func (r *Runner) progress() (eventstore.Position, State, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pos, r.state, r.err
}

// DeadLetters lists the dead letters parked by a runner without a DB (with a
// DB, use ListDeadLetters).
func (r *Runner) DeadLetters() []DeadLetter {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]DeadLetter(nil), r.parked...)
}

// leaseKey names the projection's advisory lock: one per schema, tenant and
// name.
func (r *Runner) leaseKey() string {
	if r.cfg.Tenant == "" {
		return r.sql.leaseKey + ":" + r.cfg.Name
	}
	return r.sql.leaseKey + ":" + r.cfg.Tenant + ":" + r.cfg.Name
}

// onDB runs fn on the pool, or for a runner bound to a tenant in a
// transaction that set the tenant first.
func (r *Runner) onDB(ctx context.Context, fn func(q querier) error) error {
	if r.cfg.Tenant == "" {
		return fn(r.cfg.DB)
	}
	tx, err := r.cfg.DB.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // a no-op after Commit
	if err := pgstore.SetTenant(ctx, tx, r.cfg.Tenant); err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}
