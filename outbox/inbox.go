package outbox

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/eventstore/pgstore"
)

// Inbox gives a consumer exactly-once effect over an at-least-once bus: the
// message id is recorded in the same database transaction as the handler's
// own writes, so a message delivered again finds its id and is acknowledged
// without running the handler. Use it as Watermill handler middleware:
//
//	router.AddConsumerHandler("billing", topic, sub, handler).AddMiddleware(inbox.Middleware)
//
// and write through the transaction it opens: TxFromContext(msg.Context()).
type Inbox struct {
	db       *sqlx.DB
	insert   string
	consumer string
}

// NewInbox returns the inbox of consumer (a name, one per logical consumer:
// two consumers of one message each handle it once) in schema, which
// pgstore migrated.
func NewInbox(db *sqlx.DB, schema, consumer string) (*Inbox, error) {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return nil, fmt.Errorf("outbox: inbox schema: %w", err)
	}
	if consumer == "" {
		return nil, &ConfigError{"consumer", "required"}
	}
	return &Inbox{db: db, consumer: consumer,
		insert: `INSERT INTO "` + schema + `".inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`}, nil
}

type txKey struct{}

// TxFromContext returns the inbox transaction a handler must write through
// for its effects to count once. It is committed when the handler returns
// nil and rolled back when it returns an error.
func TxFromContext(ctx context.Context) (*sqlx.Tx, bool) {
	tx, ok := ctx.Value(txKey{}).(*sqlx.Tx)
	return tx, ok
}

// ErrReturnedMessages is returned when a handler behind an inbox returns
// messages for the router to publish: they would be lost if the publish
// failed after the inbox committed. Append events in the inbox transaction
// instead (the relay publishes them) or publish from the handler.
var ErrReturnedMessages = errors.New("outbox: a handler behind an inbox must not return messages")

// Middleware is the Watermill handler middleware.
func (in *Inbox) Middleware(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		ctx := msg.Context()
		tx, err := in.db.BeginTxx(ctx, nil)
		if err != nil {
			return nil, fmt.Errorf("outbox: inbox %s: %w", in.consumer, err)
		}
		defer func() { _ = tx.Rollback() }()
		// A concurrent delivery of the same message waits here on the first
		// one's row, then finds it committed (and skips) or rolled back.
		res, err := tx.ExecContext(ctx, in.insert, in.consumer, msg.UUID)
		if err != nil {
			return nil, fmt.Errorf("outbox: inbox %s: %w", in.consumer, err)
		}
		if n, err := res.RowsAffected(); err != nil || n == 0 {
			return nil, err // seen before: acknowledge, no second effect
		}
		msg.SetContext(context.WithValue(ctx, txKey{}, tx))
		out, err := h(msg)
		msg.SetContext(ctx)
		if err != nil {
			return nil, err
		}
		if len(out) > 0 {
			return nil, bus.Permanent(ErrReturnedMessages)
		}
		if err := tx.Commit(); err != nil {
			return nil, fmt.Errorf("outbox: inbox %s: commit: %w", in.consumer, err)
		}
		return nil, nil
	}
}

// MemoryInbox dedupes in memory, for the embedded default: a message id
// handled successfully is skipped when it comes again while the process
// lives. It cannot make the handler's own effects atomic with that record;
// use Inbox against PostgreSQL for that.
type MemoryInbox struct {
	mu       sync.Mutex
	done     map[string]bool
	inflight map[string]*sync.Mutex
}

// NewMemoryInbox returns an empty inbox.
func NewMemoryInbox() *MemoryInbox {
	return &MemoryInbox{done: map[string]bool{}, inflight: map[string]*sync.Mutex{}}
}

// Middleware is the Watermill handler middleware.
func (in *MemoryInbox) Middleware(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		in.mu.Lock()
		lock := in.inflight[msg.UUID]
		if lock == nil {
			lock = &sync.Mutex{}
			in.inflight[msg.UUID] = lock
		}
		in.mu.Unlock()
		lock.Lock() // one delivery of an id at a time
		defer lock.Unlock()
		in.mu.Lock()
		seen := in.done[msg.UUID]
		in.mu.Unlock()
		if seen {
			return nil, nil
		}
		out, err := h(msg)
		if err == nil && len(out) > 0 {
			return nil, bus.Permanent(ErrReturnedMessages)
		}
		if err == nil {
			in.mu.Lock()
			in.done[msg.UUID] = true
			delete(in.inflight, msg.UUID)
			in.mu.Unlock()
		}
		return out, err
	}
}

// Seen reports whether id was handled.
func (in *MemoryInbox) Seen(id string) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.done[id]
}
