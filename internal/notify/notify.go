// Package notify wakes goroutines that wait for the next append.
package notify

import (
	"sync"
	"sync/atomic"
	"time"
)

// Notifier hands out a channel that is closed at the next Notify. With a poll
// interval it also closes the channel after that interval, so waiters look
// again for what another process wrote.
type Notifier struct {
	poll  time.Duration
	armed atomic.Bool // someone holds a channel: lets Notify skip the lock on the append path
	mu    sync.Mutex
	ch    chan struct{}
	timer *time.Timer
}

// New returns a Notifier; poll 0 means waiters wake only on Notify.
func New(poll time.Duration) *Notifier { return &Notifier{poll: poll} }

// Wait returns a channel closed at the next Notify (or poll).
func (n *Notifier) Wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.ch == nil {
		n.ch = make(chan struct{})
	}
	n.armed.Store(true)
	if n.poll > 0 && n.timer == nil {
		n.timer = time.AfterFunc(n.poll, n.Notify)
	}
	return n.ch
}

// Notify wakes every current waiter.
func (n *Notifier) Notify() {
	// A waiter arms before it reads, so an append that committed after that
	// read sees armed set; one that committed before is in what it read.
	if !n.armed.Load() {
		return
	}
	n.mu.Lock()
	n.armed.Store(false)
	defer n.mu.Unlock()
	if n.timer != nil {
		n.timer.Stop()
		n.timer = nil
	}
	if n.ch != nil {
		close(n.ch)
		n.ch = nil
	}
}
