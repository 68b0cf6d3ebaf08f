package main

// The bank tells the world what happened to accounts: an outbox relay
// publishes every account event, as a public "money moved" message, to the
// bus (docs/outbox.md). On the other side a statements service, which knows
// nothing of the bank's events or store, keeps a statement line per message.
// It dedupes through an inbox, so a redelivered message is never a second
// line.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/bus/broker"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/outbox"
	"github.com/stele-dev/stele/telemetry"
)

// PublicTopic is where the bank publishes; MoneyMovedV1 is the public
// message, a contract with other teams that the bank's own events can
// change behind. (A variable so that tests on a shared broker can give
// each run a topic of its own.)
var PublicTopic = "bank.public"

type MoneyMovedV1 struct {
	Account string `json:"account"`
	Amount  int    `json:"amount"` // negative when money left
	Ref     string `json:"ref,omitempty"`
	Opened  bool   `json:"opened,omitempty"`
}

// publicMessage maps an account event to the public message.
func publicMessage(reg interface {
	Decode(eventstore.Event) (any, error)
}) func(context.Context, eventstore.Event) (*message.Message, error) {
	return func(_ context.Context, e eventstore.Event) (*message.Message, error) {
		v, err := reg.Decode(e)
		if err != nil {
			return nil, err
		}
		m := MoneyMovedV1{Account: strings.TrimPrefix(e.StreamID, "account-")}
		switch ev := v.(type) {
		case AccountOpened:
			m.Opened = true
		case Credited:
			m.Amount, m.Ref = ev.Amount, ev.Ref
		case Debited:
			m.Amount, m.Ref = -ev.Amount, ev.Ref
		default:
			return nil, nil // nothing public to say
		}
		payload, err := json.Marshal(m)
		if err != nil {
			return nil, err
		}
		msg := message.NewMessage("", payload) // the relay gives it the event id
		msg.Metadata.Set(bus.KeyEventType, "bank.money_moved.v1")
		return msg, nil
	}
}

// Statements is the consumer service's view: lines per account, in order.
type Statements struct {
	mu    sync.Mutex
	lines map[string][]string
	n     int
	db    *sqlx.DB // with PostgreSQL, lines live in a table written in the inbox transaction
	table string
}

func line(m MoneyMovedV1) string {
	switch {
	case m.Opened:
		return "account opened"
	case m.Amount >= 0:
		return fmt.Sprintf("+%d %s", m.Amount, m.Ref)
	default:
		return fmt.Sprintf("%d %s", m.Amount, m.Ref)
	}
}

func (s *Statements) handle(msg *message.Message) error {
	var m MoneyMovedV1
	if err := json.Unmarshal(msg.Payload, &m); err != nil {
		return bus.Permanent(err) // retrying will not make it parse
	}
	if s.db != nil {
		tx, ok := outbox.TxFromContext(msg.Context())
		if !ok {
			return errors.New("statements: no inbox transaction")
		}
		if _, err := tx.ExecContext(msg.Context(), `INSERT INTO `+s.table+` (account, line) VALUES ($1, $2)`, m.Account, line(m)); err != nil {
			return err
		}
	}
	s.mu.Lock()
	s.lines[m.Account] = append(s.lines[m.Account], line(m))
	s.n++
	s.mu.Unlock()
	return nil
}

// Handled is how many messages the service has handled.
func (s *Statements) Handled() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// Print writes the statements, accounts in name order.
func (s *Statements) Print(w interface{ Write([]byte) (int, error) }) {
	s.mu.Lock()
	defer s.mu.Unlock()
	accounts := make([]string, 0, len(s.lines))
	for a := range s.lines {
		accounts = append(accounts, a)
	}
	sort.Strings(accounts)
	for _, a := range accounts {
		fmt.Fprintf(w, "  %-4s %s\n", a, strings.Join(s.lines[a], ", "))
	}
}

// StartStatements subscribes the statements service to the bus, then starts
// the bank's relay. It returns the service and a stop function. With tel,
// the relay's publishes and the service's handling are traced.
func StartStatements(ctx context.Context, store eventstore.Store, b *broker.Broker, tel *telemetry.Telemetry) (*Statements, func(), error) {
	quiet := slog.New(slog.DiscardHandler)
	st := &Statements{lines: map[string][]string{}}
	var dedupe message.HandlerMiddleware
	pub := b.Publisher()
	if tel != nil {
		pub = tel.Publisher(pub, "bank.public")
	}
	relayCfg := outbox.Config{Name: "bank.public", Publisher: pub, Topic: PublicTopic,
		Categories: []string{"account"}, Map: publicMessage(eventCodec()), Logger: quiet}
	routerCfg := bus.RouterConfig{Logger: quiet}
	if pg, ok := store.(*pgstore.Store); ok {
		// Lease and checkpoint in PostgreSQL; exactly-once lines through the
		// inbox; poisoned messages kept for `stele bus poison`.
		relayCfg.DB, relayCfg.Schema = pg.DB(), pg.Schema()
		st.db, st.table = pg.DB(), `"`+pg.Schema()+`".statement_lines`
		if _, err := pg.DB().ExecContext(ctx, `CREATE TABLE IF NOT EXISTS `+st.table+` (
			id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account text NOT NULL, line text NOT NULL)`); err != nil {
			return nil, nil, err
		}
		inbox, err := outbox.NewInbox(pg.DB(), pg.Schema(), "statements")
		if err != nil {
			return nil, nil, err
		}
		dedupe = inbox.Middleware
		if routerCfg.Poison, err = bus.NewPostgresPoisonBox(pg.DB(), pg.Schema()); err != nil {
			return nil, nil, err
		}
	} else {
		dedupe = outbox.NewMemoryInbox().Middleware
	}
	router, _, err := bus.NewRouter(routerCfg)
	if err != nil {
		return nil, nil, err
	}
	if tel != nil {
		router.AddMiddleware(tel.Middleware)
	}
	sub, err := b.Subscriber("statements")
	if err != nil {
		return nil, nil, err
	}
	router.AddConsumerHandler("statements", PublicTopic, sub, st.handle).AddMiddleware(dedupe)
	relay, err := outbox.NewRelay(store, relayCfg)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = router.Run(ctx) })
	<-router.Running() // subscribed: nothing the relay publishes is missed
	wg.Go(func() { _ = relay.Run(ctx) })
	return st, func() { cancel(); _ = router.Close(); wg.Wait() }, nil
}
