package pgstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/lib/pq"

	"github.com/stele-dev/stele/eventstore"
)

// request is one append on its way to the database.
type request struct {
	streamID string
	expected eventstore.ExpectedVersion
	events   []eventstore.PreparedEvent

	attempts int
	alone    bool // its last group failed as a whole: run it by itself
	res      eventstore.AppendResult
	err      error
	done     chan struct{}
}

// outcome of one request inside an append_events call (see the migration).
const (
	statusAppended = 0
	statusConflict = 1
	statusNewer    = 2
	statusIDsExist = 3
)

// errCheckStored is an internal outcome: some ids are stored already and the
// caller must decide between an idempotent retry and a mismatch.
var errCheckStored = errors.New("pgstore: event ids already stored")

// Append appends events to a stream if expected holds. It returns after the
// transaction holding them has committed. With group commit (the default)
// appends arriving while a commit is in flight share the next transaction;
// each keeps its own checks and its own outcome.
func (s *Store) Append(ctx context.Context, streamID string, expected eventstore.ExpectedVersion, events []eventstore.EventData) (eventstore.AppendResult, error) {
	prepared, err := eventstore.PrepareAppend(streamID, expected, events, s.cfg.Limits)
	if err != nil {
		return eventstore.AppendResult{}, err
	}
	r := &request{streamID: streamID, expected: expected, events: prepared, done: make(chan struct{})}
	if s.commit != nil {
		if err := s.commit.submit(ctx, r); err != nil {
			return eventstore.AppendResult{}, err
		}
	} else {
		for {
			r.err = nil
			s.runGroup(ctx, []*request{r})
			if r.err == nil || !eventstore.IsRetryable(r.err) || r.attempts > s.cfg.MaxAppendRetries || ctx.Err() != nil {
				break
			}
		}
	}
	if errors.Is(r.err, errCheckStored) {
		return s.checkStored(ctx, pool{s.db}, r)
	}
	return r.res, r.err
}

// Tx is a caller's transaction: *sql.Tx and *sqlx.Tx both are one.
type Tx interface {
	StmtContext(ctx context.Context, stmt *sql.Stmt) *sql.Stmt
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// AppendTx appends inside the caller's transaction, so business rows and
// events commit or roll back together. Refusals (conflict, bad input,
// idempotency mismatch) leave tx usable. An error for which
// eventstore.IsRetryable holds means this transaction cannot append to the
// stream; roll it back and run it again.
//
// Keep such transactions short: the global feed waits for every transaction
// older than the ones it shows.
//
// A store bound to a tenant sets the tenant of tx (SetTenant) first, so the
// rest of tx, read-model rows included, belongs to that tenant too.
func (s *Store) AppendTx(ctx context.Context, tx Tx, streamID string, expected eventstore.ExpectedVersion, events []eventstore.EventData) (eventstore.AppendResult, error) {
	prepared, err := eventstore.PrepareAppend(streamID, expected, events, s.cfg.Limits)
	if err != nil {
		return eventstore.AppendResult{}, err
	}
	if s.tenant != "" {
		if err := SetTenant(ctx, tx, s.tenant); err != nil {
			return eventstore.AppendResult{}, err
		}
	}
	r := &request{streamID: streamID, expected: expected, events: prepared}
	p, err := s.stmt(ctx, stmtAppend)
	if err != nil {
		return eventstore.AppendResult{}, fmt.Errorf("pgstore: appending to %q: %w", streamID, err)
	}
	if err := s.execGroup(ctx, tx.StmtContext(ctx, p), []*request{r}, true); err != nil {
		terr := translate(streamID, err)
		if s.tenant != "" && isUniqueViolation(err) {
			// Under row-level security another tenant's id is invisible to
			// the id check: no retry can succeed (see runGroup).
			terr = s.idsOfOtherTenant(ctx, r, terr)
		}
		return eventstore.AppendResult{}, terr
	}
	if errors.Is(r.err, errCheckStored) {
		return s.checkStored(ctx, tx, r)
	}
	return r.res, r.err
}

// runGroup appends a group in one autocommit statement: one round trip, one
// commit. The fast path leaves duplicate event ids to the unique index; a
// statement that fails as a whole (that index, a deadlock with some other
// transaction) is run again request by request with the id check on, so each
// error reaches the append that caused it.
func (s *Store) runGroup(ctx context.Context, group []*request) {
	defer s.wake.Notify()
	name, extra := stmtAppend, []any(nil)
	if s.tenant != "" {
		name, extra = stmtAppendTenant, []any{s.tenant}
	}
	p, err := s.stmt(ctx, name)
	if err != nil {
		for _, r := range group {
			r.err = fmt.Errorf("pgstore: appending to %q: %w", r.streamID, err)
		}
		return
	}
	exec := func(group []*request, checkIDs bool) error { return s.execGroup(ctx, p, group, checkIDs, extra...) }
	if err := exec(group, false); err == nil {
		return
	}
	for _, r := range group {
		if err := exec([]*request{r}, true); err != nil {
			r.err = translate(r.streamID, err)
			if s.tenant != "" && isUniqueViolation(err) {
				r.err = s.idsOfOtherTenant(ctx, r, r.err)
			}
		}
	}
}

// sortByStream orders a group by stream id, so that every group locks its
// streams in the same order and groups cannot deadlock each other.
func sortByStream(group []*request) []*request {
	if len(group) < 2 {
		return group
	}
	sorted := slices.Clone(group)
	// Stable: a stream's requests keep their arrival order.
	slices.SortStableFunc(sorted, func(a, b *request) int { return strings.Compare(a.streamID, b.streamID) })
	return sorted
}

// execGroup runs append_events for group (extra: the arguments a statement
// takes after append_events' own, the tenant) and sets each request's outcome. It
// returns the statement's error, if the statement failed as a whole.
func (s *Store) execGroup(ctx context.Context, stmt *sql.Stmt, group []*request, checkIDs bool, extra ...any) error {
	for _, r := range group {
		r.attempts++
	}
	sorted := sortByStream(group)
	rows, err := stmt.QueryContext(ctx, append(buildArgs(sorted, checkIDs), extra...)...)
	if err != nil {
		return err
	}
	return s.readOutcomes(rows, sorted)
}

func (s *Store) readOutcomes(rows *sql.Rows, sorted []*request) error {
	defer rows.Close()
	seen := 0
	for rows.Next() {
		var req, status int
		var actual, firstPos, lastPos sql.NullInt64
		var xid sql.NullString
		if err := rows.Scan(&req, &status, &actual, &firstPos, &lastPos, &xid); err != nil {
			return err
		}
		if req < 1 || req > len(sorted) {
			return fmt.Errorf("pgstore: append_events returned request %d of %d", req, len(sorted))
		}
		r := sorted[req-1]
		seen++
		switch status {
		case statusAppended:
			tx, err := strconv.ParseUint(xid.String, 10, 64)
			if err != nil {
				return fmt.Errorf("pgstore: parsing transaction id %q: %w", xid.String, err)
			}
			r.res = eventstore.AppendResult{
				StreamID:      r.streamID,
				FirstVersion:  eventstore.Version(actual.Int64 + 1),
				LastVersion:   eventstore.Version(actual.Int64 + int64(len(r.events))),
				FirstPosition: eventstore.Position{TxID: tx, GlobalPosition: firstPos.Int64},
				LastPosition:  eventstore.Position{TxID: tx, GlobalPosition: lastPos.Int64},
			}
			r.err = nil
		case statusConflict:
			r.err = &eventstore.ConcurrencyError{StreamID: r.streamID, Expected: r.expected, Actual: eventstore.Version(actual.Int64)}
		case statusNewer:
			r.err = &eventstore.RetryableError{StreamID: r.streamID, Reason: "the stream's last writer is a newer transaction"}
		case statusIDsExist:
			r.err = errCheckStored
		default:
			return fmt.Errorf("pgstore: append_events returned status %d", status)
		}
	}
	if err := rows.Err(); err != nil {
		return err
	}
	if seen != len(sorted) {
		return fmt.Errorf("pgstore: append_events answered %d of %d requests", seen, len(sorted))
	}
	return nil
}

func buildArgs(group []*request, checkIDs bool) []any {
	n := 0
	for _, r := range group {
		n += len(r.events)
	}
	streams := make([]string, len(group))
	expected := make([]int64, len(group))
	counts := make([]int64, len(group))
	layers := make([]int64, len(group))
	evReq := make([]int64, 0, n)
	evOrd := make([]int64, 0, n)
	ids := make([]string, 0, n)
	types := make([]string, 0, n)
	ctypes := make([]string, 0, n)
	data := make([][]byte, 0, n)
	meta := make([]string, 0, n)
	for i, r := range group {
		streams[i] = r.streamID
		layers[i] = 1
		if i > 0 && group[i-1].streamID == r.streamID { // sorted: a stream's requests are adjacent
			layers[i] = layers[i-1] + 1
		}
		expected[i] = int64(r.expected)
		counts[i] = int64(len(r.events))
		for j, e := range r.events {
			evReq = append(evReq, int64(i+1))
			evOrd = append(evOrd, int64(j+1))
			ids = append(ids, e.ID.String())
			types = append(types, e.Type)
			ctypes = append(ctypes, e.ContentType)
			d := e.Data
			if d == nil {
				d = []byte{} // NULL is not an empty payload
			}
			data = append(data, d)
			meta = append(meta, string(e.MetadataJSON))
		}
	}
	return []any{pq.StringArray(streams), pq.Int64Array(expected), pq.Int64Array(counts), pq.Int64Array(layers),
		pq.Int64Array(evReq), pq.Int64Array(evOrd),
		pq.StringArray(ids), pq.StringArray(types), pq.StringArray(ctypes), pq.ByteaArray(data), pq.StringArray(meta),
		checkIDs}
}

// checkStored settles an append whose ids are already stored: the same batch
// again is an idempotent retry and returns the first result; anything else
// is an IdempotencyError.
func (s *Store) checkStored(ctx context.Context, q Tx, r *request) (eventstore.AppendResult, error) {
	ids := make([]string, len(r.events))
	for i, e := range r.events {
		ids[i] = e.ID.String()
	}
	rows, err := q.QueryContext(ctx, s.stmts.text[s.form(stmtStoredByID)], pq.StringArray(ids), s.tenant)
	if err != nil {
		return eventstore.AppendResult{}, fmt.Errorf("pgstore: checking stored events of %q: %w", r.streamID, err)
	}
	events, err := scanEvents(rows, len(ids))
	if err != nil {
		return eventstore.AppendResult{}, fmt.Errorf("pgstore: checking stored events of %q: %w", r.streamID, err)
	}
	stored := make(map[uuid.UUID]eventstore.Event, len(events))
	for _, e := range events {
		stored[e.ID] = e
	}
	return eventstore.MatchStored(r.streamID, r.events, stored)
}

// sqlState is implemented by lib/pq's and pgx's error types alike.
type sqlState interface{ SQLState() string }

func isUniqueViolation(err error) bool {
	var st sqlState
	return errors.As(err, &st) && st.SQLState() == "23505"
}

// idsOfOtherTenant tells apart, for a store bound to a tenant, the two
// reasons an append checked by id can still hit the unique index on event
// ids: another append of this tenant stored one of them meanwhile (retry:
// the retry finds it), or another tenant holds it, where row-level security
// hides it and no retry can succeed.
func (s *Store) idsOfOtherTenant(ctx context.Context, r *request, err error) error {
	ids := make([]string, len(r.events))
	for i, e := range r.events {
		ids[i] = e.ID.String()
	}
	rows, qerr := s.db.QueryContext(ctx, s.stmts.text[s.form(stmtStoredByID)], pq.StringArray(ids), s.tenant)
	if qerr != nil {
		return err
	}
	visible, qerr := scanEvents(rows, len(ids))
	if qerr != nil || len(visible) > 0 {
		return err
	}
	return fmt.Errorf("%w: appending to %q: an event id of this append is already stored outside tenant %q",
		eventstore.ErrIdempotencyMismatch, r.streamID, s.tenant)
}

// translate maps driver errors at the edge: the ones a fresh transaction can
// clear become retryable.
func translate(streamID string, err error) error {
	var st sqlState
	if errors.As(err, &st) {
		switch st.SQLState() {
		case "40001":
			return &eventstore.RetryableError{StreamID: streamID, Reason: "serialization failure", Err: err}
		case "40P01":
			return &eventstore.RetryableError{StreamID: streamID, Reason: "deadlock", Err: err}
		case "23505": // an event id raced in from another stream
			return &eventstore.RetryableError{StreamID: streamID, Reason: "event id written concurrently", Err: err}
		}
	}
	return fmt.Errorf("pgstore: appending to %q: %w", streamID, err)
}

// committer folds concurrent appends into shared transactions. Up to
// `flushers` group commits run at once; a request that arrives when one is
// free is sent at once, and requests arriving while all are busy wait for the
// next free one and go together.
type committer struct {
	s         *Store
	maxEvents int
	linger    time.Duration

	mu     sync.Mutex
	cond   *sync.Cond
	queue  []*request
	closed bool
	wg     sync.WaitGroup
}

func newCommitter(s *Store) *committer {
	c := &committer{s: s, maxEvents: s.cfg.GroupCommitMaxEvents, linger: s.cfg.GroupCommitLinger}
	c.cond = sync.NewCond(&c.mu)
	for i := range s.cfg.GroupCommitFlushers {
		c.wg.Add(1)
		go c.run(i > 0)
	}
	return c
}

// ErrClosed is returned by Append on a Store that was closed.
var ErrClosed = errors.New("pgstore: store is closed")

func (c *committer) submit(ctx context.Context, r *request) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("pgstore: appending to %q: %w", r.streamID, err)
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	c.queue = append(c.queue, r)
	c.cond.Broadcast()
	c.mu.Unlock()
	select {
	case <-r.done:
		return nil
	case <-ctx.Done():
		// The append may still commit; an idempotent retry (same event ids)
		// finds out which.
		return fmt.Errorf("pgstore: appending to %q: outcome unknown: %w", r.streamID, ctx.Err())
	}
}

// extraFlusherMinEvents is the queue a second (third, ...) flusher waits for
// before it sends a commit beside one in flight. A commit costs a round trip
// and a WAL flush; running two at once pays off only when there is enough
// work to keep both cores busy (measured: W2, ten events per append, gains
// about a quarter; W1, one event per append, loses a tenth).
const extraFlusherMinEvents = 32

// maxPerStream caps the appends to one stream in one group.
const maxPerStream = 16

func (c *committer) run(extra bool) {
	defer c.wg.Done()
	var answered time.Time // when this flusher last returned results
	expect := 0            // callers active then: the group just answered plus those queued behind it
	for {
		c.mu.Lock()
		for (len(c.queue) == 0 || extra && c.queuedEvents() < extraFlusherMinEvents) && !c.closed {
			c.cond.Wait()
		}
		if len(c.queue) == 0 {
			c.mu.Unlock()
			return
		}
		// The callers just answered usually append again within microseconds.
		// Give them up to Linger to join, so the writers settle into one
		// group per commit rather than two half groups taking turns.
		if deadline := answered.Add(c.linger); len(c.queue) < expect && time.Now().Before(deadline) {
			t := time.AfterFunc(time.Until(deadline), func() {
				c.mu.Lock()
				c.cond.Broadcast()
				c.mu.Unlock()
			})
			for len(c.queue) < expect && !c.closed && time.Now().Before(deadline) {
				c.cond.Wait()
			}
			t.Stop()
			if len(c.queue) == 0 { // another flusher took them
				c.mu.Unlock()
				continue
			}
		}
		group := c.take()
		c.mu.Unlock()

		c.s.runGroup(context.Background(), group)

		var retry []*request
		for _, r := range group {
			if r.err != nil && eventstore.IsRetryable(r.err) && r.attempts <= c.s.cfg.MaxAppendRetries {
				r.alone = true
				retry = append(retry, r)
				continue
			}
			close(r.done)
		}
		c.mu.Lock()
		// Active callers: those just answered, and those that queued meanwhile.
		expect = len(group) - len(retry) + len(c.queue)
		c.queue = append(retry, c.queue...)
		answered = time.Now()
		if len(retry) > 0 {
			c.cond.Broadcast()
		}
		c.mu.Unlock()
	}
}

func (c *committer) queuedEvents() int {
	n := 0
	for _, r := range c.queue {
		n += len(r.events)
		if n >= extraFlusherMinEvents {
			break
		}
	}
	return n
}

// take removes the next group from the queue: requests in arrival order up
// to maxEvents, or one request by itself if it must run alone.
func (c *committer) take() []*request {
	if c.queue[0].alone {
		r := c.queue[0]
		r.alone = false
		c.queue = c.queue[1:]
		return []*request{r}
	}
	// Appends to one stream are applied one layer after another inside the
	// function, which is cheap for a few and slow for thousands: at most
	// maxPerStream of them share a group, the rest wait for the next one.
	var group, rest []*request
	perStream := make(map[string]int)
	events := 0
	for i, r := range c.queue {
		if r.alone || events+len(r.events) > c.maxEvents {
			rest = append(rest, c.queue[i:]...)
			break
		}
		if perStream[r.streamID] == maxPerStream {
			rest = append(rest, r)
			continue
		}
		perStream[r.streamID]++
		events += len(r.events)
		group = append(group, r)
	}
	c.queue = rest
	return group
}

func (c *committer) close() {
	c.mu.Lock()
	c.closed = true
	c.cond.Broadcast()
	c.mu.Unlock()
	c.wg.Wait()
}
