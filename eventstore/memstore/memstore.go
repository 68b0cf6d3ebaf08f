// Package memstore is the in-memory event store: the reference implementation
// of eventstore.Store and the embedded default, for unit tests and examples.
//
// It models PostgreSQL's behaviour rather than simplifying it: transactions
// (Begin) take an id at their first append, lock the streams they write until
// they end, and become visible only when they commit; the global feed shows
// only events of transactions older than the oldest one still open. So a test
// that passes here passes against pgstore too.
package memstore

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/internal/notify"
)

// Config tunes a Store. A nil *Config means all defaults.
type Config struct {
	// Limits bound appends; zero fields take eventstore.DefaultLimits.
	Limits eventstore.Limits
	// Now stamps RecordedAt. Defaults to time.Now.
	Now func() time.Time
}

// maxAppendRetries bounds Append's own retries of retryable refusals, as
// pgstore.Config.MaxAppendRetries does.
const maxAppendRetries = 50

// ErrTxDone is returned by a Tx used after Commit or Rollback.
var ErrTxDone = errors.New("memstore: transaction already committed or rolled back")

// Store keeps the log in memory. It is safe for concurrent use.
type Store struct {
	limits eventstore.Limits
	now    func() time.Time
	wake   *notify.Notifier

	mu      sync.Mutex
	streams map[string]*stream
	feed    []*eventstore.Event // committed, sorted by Position
	byID    map[uuid.UUID]*eventstore.Event
	pending map[uuid.UUID]*Tx // ids written by open transactions
	open    map[*Tx]struct{}  // open transactions holding an id
	lastTx  uint64
	lastPos int64
}

type stream struct {
	id        string
	events    []*eventstore.Event // committed, by version
	lastTx    uint64
	lockedBy  *Tx
	createdAt time.Time
	updatedAt time.Time
}

// New returns an empty Store.
func New(config *Config) *Store {
	var c Config
	if config != nil {
		c = *config
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return &Store{
		limits:  c.Limits.WithDefaults(),
		now:     c.Now,
		wake:    notify.New(0),
		streams: make(map[string]*stream),
		byID:    make(map[uuid.UUID]*eventstore.Event),
		pending: make(map[uuid.UUID]*Tx),
		open:    make(map[*Tx]struct{}),
	}
}

var _ eventstore.Store = (*Store)(nil)

// Tx is a transaction: its appends commit or roll back together, and it holds
// the streams it wrote until it ends, like a PostgreSQL transaction.
type Tx struct {
	s      *Store
	id     uint64
	done   chan struct{}
	ended  bool
	writes map[string][]*eventstore.Event // stream id -> events appended, in order
	order  []string                       // streams in first-write order
}

// Begin starts a transaction.
func (s *Store) Begin() *Tx {
	return &Tx{s: s, done: make(chan struct{}), writes: make(map[string][]*eventstore.Event)}
}

// Append appends in a transaction of its own, retrying a retryable refusal.
func (s *Store) Append(ctx context.Context, streamID string, expected eventstore.ExpectedVersion, events []eventstore.EventData) (eventstore.AppendResult, error) {
	prepared, err := eventstore.PrepareAppend(streamID, expected, events, s.limits)
	if err != nil {
		return eventstore.AppendResult{}, err
	}
	if res, done, err := s.appendNow(streamID, expected, prepared); done {
		return res, err
	}
	for attempt := 1; ; attempt++ {
		tx := s.Begin()
		res, err := tx.append(ctx, streamID, expected, prepared)
		if err != nil {
			tx.Rollback()
			if eventstore.IsRetryable(err) && ctx.Err() == nil && attempt < maxAppendRetries {
				continue
			}
			return eventstore.AppendResult{}, err
		}
		if err := tx.Commit(); err != nil {
			return eventstore.AppendResult{}, err
		}
		return res, nil
	}
}

// appendNow is Append's fast path: when no open transaction holds the stream
// or any of the ids, the append takes an id and commits at once under the
// store's lock, which is what a transaction of its own would do. done is
// false when the slow path must handle it.
func (s *Store) appendNow(streamID string, expected eventstore.ExpectedVersion, prepared []eventstore.PreparedEvent) (res eventstore.AppendResult, done bool, err error) {
	s.mu.Lock()
	st := s.streams[streamID]
	if st != nil && st.lockedBy != nil {
		s.mu.Unlock()
		return res, false, nil
	}
	for _, p := range prepared {
		if _, ok := s.pending[p.ID]; ok {
			s.mu.Unlock()
			return res, false, nil
		}
	}
	if res, found, err := s.replay(nil, streamID, prepared); found {
		s.mu.Unlock()
		return res, true, err
	}
	current := eventstore.Version(0)
	if st != nil {
		current = eventstore.Version(len(st.events))
	}
	if !expected.Satisfied(current) {
		s.mu.Unlock()
		return res, true, &eventstore.ConcurrencyError{StreamID: streamID, Expected: expected, Actual: current}
	}
	now := s.now()
	if st == nil {
		st = &stream{id: streamID, createdAt: now}
		s.streams[streamID] = st
	}
	s.lastTx++
	added := make([]*eventstore.Event, len(prepared))
	for i, p := range prepared {
		e := s.newEvent(streamID, current+eventstore.Version(i)+1, s.lastTx, p, now)
		added[i] = e
		st.events = append(st.events, e)
		s.byID[e.ID] = e
		s.insertFeed(e)
	}
	st.lastTx, st.updatedAt = s.lastTx, now
	s.mu.Unlock()
	s.wake.Notify()
	return result(added), true, nil
}

// Append appends within the transaction. A refusal leaves the transaction
// usable, as pgstore's AppendTx does.
func (tx *Tx) Append(ctx context.Context, streamID string, expected eventstore.ExpectedVersion, events []eventstore.EventData) (eventstore.AppendResult, error) {
	prepared, err := eventstore.PrepareAppend(streamID, expected, events, tx.s.limits)
	if err != nil {
		return eventstore.AppendResult{}, err
	}
	return tx.append(ctx, streamID, expected, prepared)
}

func (tx *Tx) append(ctx context.Context, streamID string, expected eventstore.ExpectedVersion, prepared []eventstore.PreparedEvent) (eventstore.AppendResult, error) {
	s := tx.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if tx.ended {
		return eventstore.AppendResult{}, ErrTxDone
	}
	if tx.id == 0 { // like an xid, taken at the first write
		s.lastTx++
		tx.id = s.lastTx
		s.open[tx] = struct{}{}
	}
	// Wait, as PostgreSQL does, for another transaction that holds the
	// stream or is writing one of these event ids, then look again.
	for {
		var wait <-chan struct{}
		if st := s.streams[streamID]; st != nil && st.lockedBy != nil && st.lockedBy != tx {
			wait = st.lockedBy.done
		} else if owner := s.pendingOwner(prepared, tx); owner != nil {
			wait = owner.done
		} else {
			break
		}
		s.mu.Unlock()
		select {
		case <-wait:
			s.mu.Lock()
		case <-ctx.Done():
			s.mu.Lock()
			return eventstore.AppendResult{}, ctx.Err()
		}
		if tx.ended {
			return eventstore.AppendResult{}, ErrTxDone
		}
	}
	st := s.streams[streamID]
	mine := tx.writes[streamID]
	current := eventstore.Version(len(mine))
	if st != nil {
		current += eventstore.Version(len(st.events))
	}
	if res, found, err := s.replay(tx, streamID, prepared); found || err != nil {
		return res, err
	}
	// A refused append neither locks nor creates the stream.
	if !expected.Satisfied(current) {
		return eventstore.AppendResult{}, &eventstore.ConcurrencyError{StreamID: streamID, Expected: expected, Actual: current}
	}
	if st != nil && st.lastTx > tx.id {
		return eventstore.AppendResult{}, &eventstore.RetryableError{StreamID: streamID, Reason: "the stream's last writer is a newer transaction"}
	}
	if st == nil {
		now := s.now()
		st = &stream{id: streamID, createdAt: now, updatedAt: now}
		s.streams[streamID] = st
	}
	st.lockedBy = tx
	if _, ok := tx.writes[streamID]; !ok {
		tx.order = append(tx.order, streamID)
	}
	now := s.now()
	for i, p := range prepared {
		e := s.newEvent(streamID, current+eventstore.Version(i)+1, tx.id, p, now)
		mine = append(mine, e)
		s.pending[p.ID] = tx
	}
	tx.writes[streamID] = mine
	added := mine[len(mine)-len(prepared):]
	return result(added), nil
}

// newEvent stores a copy of p at the next global position. Called with s.mu held.
func (s *Store) newEvent(streamID string, v eventstore.Version, txID uint64, p eventstore.PreparedEvent, now time.Time) *eventstore.Event {
	s.lastPos++
	return &eventstore.Event{
		StreamID:    streamID,
		Version:     v,
		Position:    eventstore.Position{TxID: txID, GlobalPosition: s.lastPos},
		ID:          p.ID,
		Type:        p.Type,
		Data:        bytes.Clone(p.Data),
		ContentType: p.ContentType,
		Metadata:    cloneMetadata(p.Metadata),
		RecordedAt:  now,
	}
}

// pendingOwner returns another open transaction writing one of the ids.
func (s *Store) pendingOwner(prepared []eventstore.PreparedEvent, tx *Tx) *Tx {
	for _, p := range prepared {
		if owner, ok := s.pending[p.ID]; ok && owner != tx {
			return owner
		}
	}
	return nil
}

// replay looks for events already stored (or written earlier in this
// transaction) with the ids of prepared; found reports whether there were any.
// Called with s.mu held.
func (s *Store) replay(tx *Tx, streamID string, prepared []eventstore.PreparedEvent) (res eventstore.AppendResult, found bool, err error) {
	known := false
	for _, p := range prepared {
		_, stored := s.byID[p.ID]
		_, pending := s.pending[p.ID]
		known = known || stored || pending
	}
	if !known {
		return res, false, nil
	}
	stored := make(map[uuid.UUID]eventstore.Event)
	for _, p := range prepared {
		if e, ok := s.byID[p.ID]; ok {
			stored[p.ID] = *e
			continue
		}
		owner, ok := s.pending[p.ID]
		if !ok {
			continue
		}
		if owner != tx {
			return res, true, &eventstore.RetryableError{StreamID: streamID, Reason: "event " + p.ID.String() + " is being written by another transaction"}
		}
		for _, w := range tx.writes {
			for _, e := range w {
				if e.ID == p.ID {
					stored[p.ID] = *e
				}
			}
		}
	}
	if len(stored) == 0 {
		return res, false, nil
	}
	res, err = eventstore.MatchStored(streamID, prepared, stored)
	return res, true, err
}

func result(events []*eventstore.Event) eventstore.AppendResult {
	first, last := events[0], events[len(events)-1]
	return eventstore.AppendResult{
		StreamID:      first.StreamID,
		FirstVersion:  first.Version,
		LastVersion:   last.Version,
		FirstPosition: first.Position,
		LastPosition:  last.Position,
	}
}

// Commit makes the transaction's events visible and releases its streams.
func (tx *Tx) Commit() error {
	s := tx.s
	s.mu.Lock()
	if tx.ended {
		s.mu.Unlock()
		return ErrTxDone
	}
	now := s.now()
	for _, id := range tx.order {
		st := s.streams[id]
		for _, e := range tx.writes[id] {
			st.events = append(st.events, e)
			s.byID[e.ID] = e
			delete(s.pending, e.ID)
			s.insertFeed(e)
		}
		if len(tx.writes[id]) > 0 {
			st.lastTx = tx.id
			st.updatedAt = now
		}
	}
	tx.end()
	s.mu.Unlock()
	s.wake.Notify()
	return nil
}

// Rollback discards the transaction's events; their positions stay unused.
func (tx *Tx) Rollback() error {
	s := tx.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if tx.ended {
		return ErrTxDone
	}
	for _, id := range tx.order {
		for _, e := range tx.writes[id] {
			delete(s.pending, e.ID)
		}
		if st := s.streams[id]; len(st.events) == 0 {
			delete(s.streams, id) // the stream row was never committed
		}
	}
	tx.end()
	s.wake.Notify() // the feed's horizon may have moved
	return nil
}

// end releases the transaction's locks. Called with s.mu held.
func (tx *Tx) end() {
	for _, id := range tx.order {
		if st := tx.s.streams[id]; st != nil && st.lockedBy == tx {
			st.lockedBy = nil
		}
	}
	delete(tx.s.open, tx)
	tx.ended = true
	close(tx.done)
}

// insertFeed keeps the feed sorted by Position. Transactions usually commit
// in id order, so this is nearly always an append at the end.
func (s *Store) insertFeed(e *eventstore.Event) {
	n := len(s.feed)
	if n == 0 || s.feed[n-1].Position.Less(e.Position) {
		s.feed = append(s.feed, e)
		return
	}
	i := sort.Search(n, func(i int) bool { return e.Position.Less(s.feed[i].Position) })
	s.feed = slices.Insert(s.feed, i, e)
}

// horizon is the smallest id of an open transaction: the feed shows only
// events of older transactions, which can no longer be preceded by a commit.
func (s *Store) horizon() uint64 {
	h := s.lastTx + 1
	for tx := range s.open {
		if tx.id < h {
			h = tx.id
		}
	}
	return h
}

// ReadStream reads one page of a stream's committed events.
func (s *Store) ReadStream(ctx context.Context, streamID string, opts eventstore.ReadStreamOpts) ([]eventstore.Event, error) {
	if err := eventstore.ValidateStreamID(streamID); err != nil {
		return nil, err
	}
	limit := pageLimit(opts.Limit)
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[streamID]
	if st == nil {
		return nil, nil
	}
	var out []eventstore.Event
	n := eventstore.Version(len(st.events))
	if opts.Direction == eventstore.Backward {
		from := opts.From
		if from <= 0 || from > n {
			from = n
		}
		for v := from; v >= 1 && len(out) < limit; v-- {
			out = append(out, clone(st.events[v-1]))
		}
		return out, nil
	}
	from := max(opts.From, 1)
	for v := from; v <= n && len(out) < limit; v++ {
		out = append(out, clone(st.events[v-1]))
	}
	return out, nil
}

// StreamVersion returns the stream's committed version.
func (s *Store) StreamVersion(ctx context.Context, streamID string) (eventstore.Version, error) {
	if err := eventstore.ValidateStreamID(streamID); err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.streams[streamID]; st != nil {
		return eventstore.Version(len(st.events)), nil
	}
	return 0, nil
}

// ReadAll reads one page of the global feed.
func (s *Store) ReadAll(ctx context.Context, opts eventstore.ReadAllOpts) ([]eventstore.Event, error) {
	limit := pageLimit(opts.Limit)
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.horizon()
	i := sort.Search(len(s.feed), func(i int) bool { return opts.After.Less(s.feed[i].Position) })
	var out []eventstore.Event
	for ; i < len(s.feed) && len(out) < limit; i++ {
		e := s.feed[i]
		if e.Position.TxID >= h {
			break
		}
		if opts.Category != "" && eventstore.Category(e.StreamID) != opts.Category {
			continue
		}
		if !opts.Since.IsZero() && e.RecordedAt.Before(opts.Since) {
			continue
		}
		out = append(out, clone(e))
	}
	return out, nil
}

// Head returns the position of the last event the feed shows now.
func (s *Store) Head(ctx context.Context) (eventstore.Position, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.horizon()
	i := sort.Search(len(s.feed), func(i int) bool { return s.feed[i].Position.TxID >= h })
	if i == 0 {
		return eventstore.Start, nil
	}
	return s.feed[i-1].Position, nil
}

// ListStreams pages through committed streams in id order.
func (s *Store) ListStreams(ctx context.Context, opts eventstore.ListStreamsOpts) ([]eventstore.StreamInfo, error) {
	limit := pageLimit(opts.Limit)
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := slices.Sorted(maps.Keys(s.streams))
	var out []eventstore.StreamInfo
	for _, id := range ids {
		st := s.streams[id]
		if len(st.events) == 0 || strings.Compare(id, opts.After) <= 0 {
			continue
		}
		if opts.Category != "" && eventstore.Category(id) != opts.Category {
			continue
		}
		out = append(out, eventstore.StreamInfo{
			StreamID: id, Category: eventstore.Category(id), Version: eventstore.Version(len(st.events)),
			CreatedAt: st.createdAt, UpdatedAt: st.updatedAt,
		})
		if len(out) == limit {
			break
		}
	}
	return out, nil
}

// WaitForAppend returns a channel closed when the next transaction ends.
func (s *Store) WaitForAppend() <-chan struct{} { return s.wake.Wait() }

func pageLimit(n int) int {
	if n <= 0 {
		return eventstore.DefaultPageSize
	}
	return n
}

func clone(e *eventstore.Event) eventstore.Event {
	c := *e
	c.Data = bytes.Clone(e.Data)
	c.Metadata = cloneMetadata(e.Metadata)
	return c
}

func cloneMetadata(m eventstore.Metadata) eventstore.Metadata {
	if m.Keys != nil {
		m.Keys = maps.Clone(m.Keys)
	}
	return m
}
