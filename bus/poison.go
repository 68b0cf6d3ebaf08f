package bus

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore/pgstore"
)

// Poisoned is a message a handler gave up on.
type Poisoned struct {
	ID            int64
	UUID          string
	Topic         string // the topic it was consumed from; Republish sends it back there
	Handler       string
	Reason        string
	Payload       []byte
	Metadata      map[string]string
	PoisonedAt    time.Time
	RepublishedAt time.Time // zero until re-published
}

// ErrNoPoisoned is returned for an id the poison box does not hold.
var ErrNoPoisoned = errors.New("bus: no such poisoned message")

// PoisonBox keeps poisoned messages. The router's poison-queue middleware
// publishes into it (it is a message.Publisher); operators list the messages
// and re-publish them once the cause is fixed.
type PoisonBox interface {
	message.Publisher
	// List returns poisoned messages oldest first; with pending, only those
	// not re-published yet.
	List(ctx context.Context, pending bool, limit int) ([]Poisoned, error)
	// Republish publishes message id to its original topic through pub,
	// with its UUID and metadata (minus the poison notes), and marks it.
	// The handler sees it as a redelivery, so an inbox dedupes it if it had
	// in fact been handled.
	Republish(ctx context.Context, id int64, pub message.Publisher) error
}

// poisonNotes are the keys the poison-queue middleware adds.
var poisonNotes = []string{middleware.ReasonForPoisonedKey, middleware.PoisonedTopicKey,
	middleware.PoisonedHandlerKey, middleware.PoisonedSubscriberKey}

func toPoisoned(msg *message.Message) Poisoned {
	md := make(map[string]string, len(msg.Metadata))
	for k, v := range msg.Metadata {
		md[k] = v
	}
	// Never a nil payload: bus_poison.payload is NOT NULL, and a message
	// without a body (a ReplyError, a bare command) must still be kept.
	p := Poisoned{UUID: msg.UUID, Payload: append([]byte{}, msg.Payload...),
		Topic: md[middleware.PoisonedTopicKey], Handler: md[middleware.PoisonedHandlerKey],
		Reason: md[middleware.ReasonForPoisonedKey], PoisonedAt: time.Now()}
	for _, k := range poisonNotes {
		delete(md, k)
	}
	p.Metadata = md
	return p
}

func republish(p Poisoned, pub message.Publisher) error {
	if p.Topic == "" {
		return fmt.Errorf("bus: poisoned message %d has no topic to go back to", p.ID)
	}
	msg := message.NewMessage(p.UUID, p.Payload)
	for k, v := range p.Metadata {
		msg.Metadata[k] = v
	}
	if err := pub.Publish(p.Topic, msg); err != nil {
		return fmt.Errorf("bus: re-publishing poisoned message %d to %s: %w", p.ID, p.Topic, err)
	}
	return nil
}

// MemoryPoisonBox keeps poisoned messages in memory: the embedded default.
type MemoryPoisonBox struct {
	mu   sync.Mutex
	msgs []Poisoned
}

// NewMemoryPoisonBox returns an empty box.
func NewMemoryPoisonBox() *MemoryPoisonBox { return &MemoryPoisonBox{} }

// Publish records messages; topic is always PoisonTopic.
func (b *MemoryPoisonBox) Publish(_ string, msgs ...*message.Message) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range msgs {
		p := toPoisoned(m)
		p.ID = int64(len(b.msgs) + 1)
		b.msgs = append(b.msgs, p)
	}
	return nil
}

// Close does nothing.
func (b *MemoryPoisonBox) Close() error { return nil }

// List implements PoisonBox.
func (b *MemoryPoisonBox) List(_ context.Context, pending bool, limit int) ([]Poisoned, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []Poisoned
	for _, p := range b.msgs {
		if pending && !p.RepublishedAt.IsZero() {
			continue
		}
		if limit > 0 && len(out) == limit {
			break
		}
		out = append(out, p)
	}
	return out, nil
}

// Republish implements PoisonBox.
func (b *MemoryPoisonBox) Republish(_ context.Context, id int64, pub message.Publisher) error {
	b.mu.Lock()
	if id < 1 || id > int64(len(b.msgs)) {
		b.mu.Unlock()
		return ErrNoPoisoned
	}
	p := b.msgs[id-1]
	b.mu.Unlock()
	if err := republish(p, pub); err != nil {
		return err
	}
	b.mu.Lock()
	b.msgs[id-1].RepublishedAt = time.Now()
	b.mu.Unlock()
	return nil
}

// PostgresPoisonBox keeps poisoned messages in the bus_poison table of a
// schema pgstore migrated, where `stele bus poison` finds them.
type PostgresPoisonBox struct {
	db     *sqlx.DB
	schema string
}

// NewPostgresPoisonBox returns the box in schema, which pgstore migrated.
func NewPostgresPoisonBox(db *sqlx.DB, schema string) (*PostgresPoisonBox, error) {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return nil, err
	}
	return &PostgresPoisonBox{db: db, schema: `"` + schema + `"`}, nil
}

// Publish records messages in one transaction.
func (b *PostgresPoisonBox) Publish(_ string, msgs ...*message.Message) error {
	ctx := context.Background()
	if len(msgs) > 0 && msgs[0].Context() != nil {
		ctx = context.WithoutCancel(msgs[0].Context()) // a timed-out attempt must still be recorded
	}
	tx, err := b.db.BeginTxx(ctx, nil)
	if err != nil {
		return fmt.Errorf("bus: poison box: %w", err)
	}
	defer func() { _ = tx.Rollback() }()
	for _, m := range msgs {
		p := toPoisoned(m)
		md := make(map[string]string, len(p.Metadata))
		for k, v := range p.Metadata {
			md[pgText(k)] = pgText(v)
		}
		mdJSON, err := json.Marshal(md)
		if err != nil {
			return fmt.Errorf("bus: poison box: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+b.schema+`.bus_poison (message_uuid, topic, handler, reason, payload, metadata)
			VALUES ($1, $2, $3, $4, $5, $6)`, pgText(p.UUID), pgText(p.Topic), pgText(p.Handler), pgText(p.Reason), p.Payload, mdJSON); err != nil {
			return fmt.Errorf("bus: poison box: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("bus: poison box: %w", err)
	}
	return nil
}

// pgText makes s storable in a text or jsonb column, which refuse NUL and
// invalid UTF-8: the box is the last stop, and a message it refused would be
// nacked and redelivered for ever. Such bytes become U+FFFD, so the stored
// UUID or metadata of a message that carried them is not byte-exact; the
// payload (bytea) always is.
func pgText(s string) string {
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
}

// Close does nothing; the pool belongs to the caller.
func (b *PostgresPoisonBox) Close() error { return nil }

const poisonCols = `id, message_uuid, topic, handler, reason, payload, metadata, poisoned_at, republished_at`

func scanPoisoned(row interface{ Scan(...any) error }) (Poisoned, error) {
	var p Poisoned
	var md []byte
	var rep sql.NullTime // neither driver scans '-infinity' into a time.Time
	if err := row.Scan(&p.ID, &p.UUID, &p.Topic, &p.Handler, &p.Reason, &p.Payload, &md, &p.PoisonedAt, &rep); err != nil {
		return p, err
	}
	if rep.Valid {
		p.RepublishedAt = rep.Time
	}
	return p, json.Unmarshal(md, &p.Metadata)
}

// List implements PoisonBox.
func (b *PostgresPoisonBox) List(ctx context.Context, pending bool, limit int) ([]Poisoned, error) {
	if limit <= 0 {
		limit = 1000
	}
	q := `SELECT ` + poisonCols + ` FROM ` + b.schema + `.bus_poison`
	if pending {
		q += ` WHERE republished_at IS NULL`
	}
	rows, err := b.db.QueryContext(ctx, q+` ORDER BY id LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("bus: listing poisoned messages: %w", err)
	}
	defer rows.Close()
	var out []Poisoned
	for rows.Next() {
		p, err := scanPoisoned(rows)
		if err != nil {
			return nil, fmt.Errorf("bus: listing poisoned messages: %w", err)
		}
		out = append(out, p)
	}
	return out, rows.Err()
}

// Republish implements PoisonBox. The row is marked after the publish is
// confirmed; if marking fails the message may be re-published twice, which
// the consumer's inbox absorbs.
func (b *PostgresPoisonBox) Republish(ctx context.Context, id int64, pub message.Publisher) error {
	// The row stays locked while the message is published, so two operators
	// re-publishing the same message at once publish it once after another,
	// not at the same moment from the same read.
	tx, err := b.db.BeginTxx(ctx, nil)
	if err != nil {
		return fmt.Errorf("bus: reading poisoned message %d: %w", id, err)
	}
	defer func() { _ = tx.Rollback() }()
	p, err := scanPoisoned(tx.QueryRowContext(ctx, `SELECT `+poisonCols+` FROM `+b.schema+`.bus_poison WHERE id = $1 FOR UPDATE`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return ErrNoPoisoned
	}
	if err != nil {
		return fmt.Errorf("bus: reading poisoned message %d: %w", id, err)
	}
	if err := republish(p, pub); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE `+b.schema+`.bus_poison SET republished_at = now() WHERE id = $1`, id); err != nil {
		return fmt.Errorf("bus: marking poisoned message %d re-published: %w", id, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("bus: marking poisoned message %d re-published: %w", id, err)
	}
	return nil
}
