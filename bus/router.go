package bus

import (
	"errors"
	"fmt"
	"log/slog"
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
//     permanent errors, with a fresh context per attempt;
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
	poison, err := middleware.PoisonQueue(cfg.Poison, PoisonTopic)
	if err != nil {
		return nil, nil, fmt.Errorf("bus: poison queue: %w", err)
	}
	r.AddMiddleware(poison, middleware.Retry{
		MaxRetries:          retry.MaxRetries,
		InitialInterval:     retry.Initial,
		MaxInterval:         retry.Max,
		Multiplier:          retry.Multiplier,
		RandomizationFactor: retry.Jitter,
		ShouldRetry:         func(p middleware.RetryParams) bool { return !IsPermanent(p.Err) },
		ResetContextOnRetry: true,
	}.Middleware)
	if cfg.HandlerTimeout > 0 {
		r.AddMiddleware(middleware.Timeout(cfg.HandlerTimeout))
	}
	r.AddMiddleware(recoverPermanent)
	return r, cfg.Poison, nil
}

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
