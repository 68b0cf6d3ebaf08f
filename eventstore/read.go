package eventstore

import (
	"context"
	"fmt"
	"iter"
	"time"
)

// HandlerFunc receives the events of a subscription, one at a time, in feed
// order. Returning an error ends the subscription with that error.
type HandlerFunc func(ctx context.Context, e Event) error

// SubscribeOpts says where a subscription starts and what it sees.
type SubscribeOpts struct {
	// After is the checkpoint to continue from; Start reads the whole log.
	After Position
	// Category, when set, delivers only that category's streams.
	Category string
	// Since, when set, skips events recorded before it.
	Since time.Time
	// PageSize is how many events are read per query; 0 means DefaultPageSize.
	PageSize int
}

// Subscribe delivers the feed to fn: first everything after opts.After
// (catch-up), then each event as it becomes readable (live). Both phases are
// the same loop over ReadAll, so there is no hand-over where an event could be
// skipped or delivered twice. It returns when ctx ends (with ctx.Err()) or
// when fn fails (with fn's error, wrapped).
func Subscribe(ctx context.Context, s Store, opts SubscribeOpts, fn HandlerFunc) error {
	read := ReadAllOpts{After: opts.After, Category: opts.Category, Since: opts.Since, Limit: opts.PageSize}
	if read.Limit <= 0 {
		read.Limit = DefaultPageSize
	}
	for {
		// Take the wake-up channel before reading, so an append that commits
		// between the read and the wait still wakes us.
		wake := s.WaitForAppend()
		page, err := s.ReadAll(ctx, read)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("subscription reading after %s: %w", read.After, err)
		}
		for _, e := range page {
			if err := fn(ctx, e); err != nil {
				return fmt.Errorf("subscription handler at %s (%s v%d): %w", e.Position, e.StreamID, e.Version, err)
			}
			read.After = e.Position
		}
		if len(page) == read.Limit {
			continue // more is waiting
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-wake:
		}
	}
}

// IterAll yields the feed from opts.After to what is readable now, a page at
// a time, so memory stays bounded whatever the log's size.
func IterAll(ctx context.Context, s Store, opts ReadAllOpts) iter.Seq2[Event, error] {
	return func(yield func(Event, error) bool) {
		if opts.Limit <= 0 {
			opts.Limit = DefaultPageSize
		}
		for {
			page, err := s.ReadAll(ctx, opts)
			if err != nil {
				yield(Event{}, err)
				return
			}
			for _, e := range page {
				if !yield(e, nil) {
					return
				}
				opts.After = e.Position
			}
			if len(page) < opts.Limit {
				return
			}
		}
	}
}

// IterStream yields a stream's events page by page in opts.Direction.
func IterStream(ctx context.Context, s Store, streamID string, opts ReadStreamOpts) iter.Seq2[Event, error] {
	return func(yield func(Event, error) bool) {
		if opts.Limit <= 0 {
			opts.Limit = DefaultPageSize
		}
		for {
			page, err := s.ReadStream(ctx, streamID, opts)
			if err != nil {
				yield(Event{}, err)
				return
			}
			for _, e := range page {
				if !yield(e, nil) {
					return
				}
			}
			if len(page) < opts.Limit {
				return
			}
			last := page[len(page)-1].Version
			if opts.Direction == Backward {
				if last <= 1 {
					return
				}
				opts.From = last - 1
			} else {
				opts.From = last + 1
			}
		}
	}
}

// LoadStream reads a whole stream forwards into memory.
func LoadStream(ctx context.Context, s Store, streamID string) ([]Event, error) {
	var out []Event
	for e, err := range IterStream(ctx, s, streamID, ReadStreamOpts{Limit: 1000}) {
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// WaitForPosition blocks until the feed shows position p (an append's
// LastPosition, say), or ctx ends. The feed shows an event once every older
// transaction on the server has ended, so a read right after an append may
// not include it yet; use this when a test or a read-your-writes view needs it.
func WaitForPosition(ctx context.Context, s Store, p Position) error {
	for {
		wake := s.WaitForAppend()
		head, err := s.Head(ctx)
		if err != nil {
			return err
		}
		if !head.Less(p) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-wake:
		}
	}
}
