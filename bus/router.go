package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
)

// PoisonTopic is the topic name recorded for the poison box.
const PoisonTopic = "stele.poison"

// RetryPolicy is how a failing handler is retried while its message is held:
// exponential backoff from Initial, times Multiplier each attempt, never
// above Max, each wait spread by ±Jitter (a fraction) so consumers that
// failed together do not retry together.
type RetryPolicy struct {
	MaxRetries int           // default 5; a negative value means none
	Initial    time.Duration // default 100ms
	Max        time.Duration // default 10s
	Multiplier float64       // default 2
	Jitter     float64       // default 0.5
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.MaxRetries == 0 {
		p.MaxRetries = 5
	}
	if p.MaxRetries < 0 {
		p.MaxRetries = 0
	}
	if p.Initial <= 0 {
		p.Initial = 100 * time.Millisecond
	}
	if p.Max <= 0 {
		p.Max = 10 * time.Second
	}
	if p.Multiplier < 1 {
		p.Multiplier = 2
	}
	if p.Jitter <= 0 || p.Jitter >= 1 {
		p.Jitter = 0.5
	}
	return p
}

// RouterConfig tunes the router NewRouter builds.
type RouterConfig struct {
	Retry RetryPolicy
	// Poison receives messages whose handler failed permanently or ran out
	// of retries; the original is then acknowledged, so one bad message does
	// not block the ones behind it. Defaults to a new MemoryPoisonBox; give a
	// PostgresPoisonBox in production so they survive a restart and can be
	// re-published with `stele bus poison`.
	Poison PoisonBox
	// HandlerTimeout, when set, cancels the message context of an attempt
	// that runs longer; each retry gets a fresh context.
	HandlerTimeout time.Duration
	// CloseTimeout is how long Close waits for running handlers. Default 30s.
	CloseTimeout time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// NewRouter returns a Watermill router with stele's defaults, outermost first:
//
//  1. poison queue: a message whose handler still fails after the retries
//     (or fails permanently, see IsPermanent) goes to cfg.Poison, with the
//     reason, topic and handler, and is acknowledged;
//  2. retry: exponential backoff with jitter and a cap, skipped for
//     permanent errors, with a fresh context per attempt; a message still
//     being retried when the router stops is nacked, not poisoned, so the
//     broker delivers it again;
//  3. timeout (when cfg.HandlerTimeout is set);
//  4. recoverer: a panic becomes a permanent error carrying its stack, so it
//     reaches the poison box instead of crashing the process or looping.
//
// Add handlers with AddConsumerHandler or AddHandler, then Run.
func NewRouter(cfg RouterConfig) (*message.Router, PoisonBox, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Poison == nil {
		cfg.Poison = NewMemoryPoisonBox()
	}
	retry := cfg.Retry.withDefaults()
	logger := watermill.NewSlogLogger(cfg.Logger)
	r, err := message.NewRouter(message.RouterConfig{CloseTimeout: cfg.CloseTimeout}, logger)
	if err != nil {
		return nil, nil, fmt.Errorf("bus: router: %w", err)
	}
	poison, err := middleware.PoisonQueueWithFilter(cfg.Poison, PoisonTopic, func(err error) bool {
		var stopped *stoppedError
		return !errors.As(err, &stopped) // nacked instead: the broker delivers it again
	})
	if err != nil {
		return nil, nil, fmt.Errorf("bus: poison queue: %w", err)
	}
	r.AddMiddleware(poison, retry.middleware)
	if cfg.HandlerTimeout > 0 {
		r.AddMiddleware(middleware.Timeout(cfg.HandlerTimeout))
	}
	r.AddMiddleware(recoverPermanent)
	return r, cfg.Poison, nil
}

// middleware retries the handler while it fails with an error that is not
// permanent, waiting Initial, then Initial×Multiplier, ... (at most Max),
// each wait spread by ±Jitter. Every attempt starts from the message's own
// context, so a timed-out attempt does not cancel the next one.
//
// Watermill's middleware.Retry is not used: with a ShouldRetry hook it
// advances its backoff twice per attempt (the waits grow by Multiplier² and
// start at Initial×Multiplier), and when the router stops during a wait it
// returns context.Canceled, which the poison queue would then shelve.
func (p RetryPolicy) middleware(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		ctx := msg.Context()
		defer msg.SetContext(ctx) // the poison queue publishes with it
		interval := min(p.Initial, p.Max)
		for attempt := 0; ; attempt++ {
			msg.SetContext(ctx)
			out, err := h(msg)
			if err == nil || IsPermanent(err) {
				return out, err
			}
			if ctx.Err() != nil {
				return out, &stoppedError{err: err, cause: context.Cause(ctx)}
			}
			if attempt >= p.MaxRetries {
				return out, err
			}
			t := time.NewTimer(p.jittered(interval))
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return out, &stoppedError{err: err, cause: context.Cause(ctx)}
			}
			if next := float64(interval) * p.Multiplier; next < float64(p.Max) {
				interval = time.Duration(next)
			} else {
				interval = p.Max // compared as floats: no overflow
			}
		}
	}
}

// jittered spreads d uniformly over [d×(1-Jitter), d×(1+Jitter)].
func (p RetryPolicy) jittered(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (1 + p.Jitter*(2*rand.Float64()-1)))
}

// stoppedError is what the retry middleware returns when the message's
// context ends (the router is closing) before the handler succeeded. The
// poison queue lets it through, so the message is nacked rather than
// poisoned, and it matches context.Canceled, so the router does not log it
// as a handler failure.
type stoppedError struct{ err, cause error }

func (e *stoppedError) Error() string {
	return fmt.Sprintf("bus: stopped before the handler succeeded (%v): %v", e.cause, e.err)
}

func (e *stoppedError) Unwrap() []error { return []error{e.err, e.cause} }

// recoverPermanent turns a handler's panic into a permanent error: the same
// input would panic again, so retrying it only delays the poison box.
func recoverPermanent(h message.HandlerFunc) message.HandlerFunc {
	rec := middleware.Recoverer(h)
	return func(msg *message.Message) ([]*message.Message, error) {
		out, err := rec(msg)
		var panicked middleware.RecoveredPanicError
		if errors.As(err, &panicked) {
			return out, Permanent(err)
		}
		return out, err
	}
}
