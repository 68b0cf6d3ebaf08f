package main

// The three services the order saga talks to. Each listens on its command
// topic, does its work once per idempotency key (a repeated command gets the
// first answer again), and replies. They keep their state in memory: they
// stand for other teams' services, whose storage is theirs to choose.

import (
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/stele-dev/stele/bus"
)

// Command topics.
const (
	InventoryTopic = "inventory.commands"
	PaymentsTopic  = "payments.commands"
	ShippingTopic  = "shipping.commands"
)

// Command is what the saga sends: an action on an order.
type Command struct {
	Action string `json:"action"` // reserve, release, charge, refund, schedule
	Order  string `json:"order"`
	Item   string `json:"item,omitempty"`
	Qty    int    `json:"qty,omitempty"`
	Amount int    `json:"amount,omitempty"`
	Card   string `json:"card,omitempty"`
}

// service answers commands once per idempotency key.
type service struct {
	name string
	pub  message.Publisher
	do   func(Command) (string, error)

	mu      sync.Mutex
	answers map[string]answer // by idempotency key
	effects int               // commands that changed something
}

type answer struct {
	out string
	err error
}

// handle is the router handler: do the work (or recall the answer for a key
// seen before) and reply.
func (s *service) handle(msg *message.Message) error {
	var cmd Command
	if err := json.Unmarshal(msg.Payload, &cmd); err != nil {
		return bus.Permanent(err)
	}
	key := msg.Metadata.Get(bus.KeyIdempotency)
	s.mu.Lock()
	a, seen := s.answers[key]
	if !seen || (a.err != nil && !bus.IsPermanent(a.err)) {
		out, err := s.do(cmd)
		a = answer{out, err}
		s.answers[key] = a
		if err == nil {
			s.effects++
		}
	}
	s.mu.Unlock()
	if a.err != nil {
		return bus.ReplyError(s.pub, msg, a.err)
	}
	return bus.Reply(s.pub, msg, message.NewMessage("", []byte(a.out)))
}

// Inventory keeps stock per item, and what each order holds. A release
// gives back only what the order holds: the saga also releases after a
// reservation that timed out, which may never have happened.
type Inventory struct {
	mu       sync.Mutex
	stock    map[string]int
	reserved map[string]int // by order
}

func (inv *Inventory) do(cmd Command) (string, error) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	switch cmd.Action {
	case "reserve":
		if inv.stock[cmd.Item] < cmd.Qty {
			return "", bus.Permanent(fmt.Errorf("only %d %s in stock", inv.stock[cmd.Item], cmd.Item))
		}
		inv.stock[cmd.Item] -= cmd.Qty
		inv.reserved[cmd.Order] += cmd.Qty
		return fmt.Sprintf("%d %s reserved", cmd.Qty, cmd.Item), nil
	case "release":
		n := inv.reserved[cmd.Order]
		delete(inv.reserved, cmd.Order)
		inv.stock[cmd.Item] += n
		return fmt.Sprintf("%d %s back in stock", n, cmd.Item), nil
	}
	return "", bus.Permanent(fmt.Errorf("inventory: unknown action %q", cmd.Action))
}

// Payments charges cards. Card "4000-0002" is declined; the gateway times
// out once on card "4000-0119", which the saga retries.
type Payments struct {
	mu       sync.Mutex
	timedOut map[string]bool
	charged  map[string]int
}

var errGatewayTimeout = errors.New("payment gateway timed out")

func (p *Payments) do(cmd Command) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch cmd.Action {
	case "charge":
		if cmd.Card == "4000-0119" && !p.timedOut[cmd.Order] {
			p.timedOut[cmd.Order] = true
			return "", errGatewayTimeout // transient: the saga retries
		}
		if cmd.Card == "4000-0002" {
			return "", bus.Permanent(errors.New("card declined"))
		}
		p.charged[cmd.Order] += cmd.Amount
		return fmt.Sprintf("%d charged", cmd.Amount), nil
	case "refund":
		// What was charged, if anything: the saga also refunds a charge
		// that timed out, which may never have gone through.
		n := p.charged[cmd.Order]
		delete(p.charged, cmd.Order)
		return fmt.Sprintf("%d refunded", n), nil
	}
	return "", bus.Permanent(fmt.Errorf("payments: unknown action %q", cmd.Action))
}

// Shipping schedules parcels.
type Shipping struct {
	mu        sync.Mutex
	scheduled []string
}

func (s *Shipping) do(cmd Command) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cmd.Action != "schedule" {
		return "", bus.Permanent(fmt.Errorf("shipping: unknown action %q", cmd.Action))
	}
	s.scheduled = append(s.scheduled, cmd.Order)
	return "parcel booked for tomorrow", nil
}
