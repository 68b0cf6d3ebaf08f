package projection

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
)

// RebuildRequest is a rebuild asked for by `stele projections rebuild`, and
// its progress as the serving application reports it.
type RebuildRequest struct {
	Name        string     `db:"name" json:"name"`
	Slot        string     `db:"slot" json:"slot"`
	RequestedAt time.Time  `db:"requested_at" json:"requested_at"`
	StartedAt   *time.Time `db:"started_at" json:"started_at,omitempty"`
	Done        int64      `db:"done" json:"done"`
	Total       int64      `db:"total" json:"total"`
	Rate        float64    `db:"rate" json:"rate"`
	FinishedAt  *time.Time `db:"finished_at" json:"finished_at,omitempty"`
	Error       *string    `db:"error" json:"error,omitempty"`
}

// RequestRebuild asks the application serving rebuilds (ServeRebuilds) to
// rebuild projection name into slot. A request replaces any earlier,
// finished one; one still pending or running is an error unless force is set
// (for a request whose application died while serving it).
func RequestRebuild(ctx context.Context, db *sqlx.DB, schema, name, slot string, force bool) error {
	if !nameRE.MatchString(name) || !nameRE.MatchString(slot) {
		return fmt.Errorf("projection: rebuild %q into %q: names are 1-100 of [a-z0-9_.@-]", name, slot)
	}
	q, err := newQueries(schema)
	if err != nil {
		return err
	}
	res, err := db.ExecContext(ctx, `INSERT INTO `+q.rebuilds+` (name, slot) VALUES ($1, $2)
		ON CONFLICT (name) DO UPDATE SET slot = excluded.slot, requested_at = now(), started_at = NULL, done = 0,
		total = 0, rate = 0, finished_at = NULL, error = NULL
		WHERE `+q.rebuilds+`.finished_at IS NOT NULL OR $3`, name, slot, force)
	if err != nil {
		return fmt.Errorf("projection: requesting a rebuild of %s: %w", name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("projection: a rebuild of %s is already under way (force a new request if the application serving it died)", name)
	}
	return nil
}

// GetRebuild returns the latest rebuild request of name.
func GetRebuild(ctx context.Context, db *sqlx.DB, schema, name string) (RebuildRequest, error) {
	q, err := newQueries(schema)
	if err != nil {
		return RebuildRequest{}, err
	}
	var r RebuildRequest
	err = db.GetContext(ctx, &r, `SELECT name, slot, requested_at, started_at, done, total, rate, finished_at, error FROM `+q.rebuilds+` WHERE name = $1`, name)
	if errors.Is(err, errNoRows) {
		return r, fmt.Errorf("projection: no rebuild of %s was requested", name)
	}
	return r, err
}

// ServeConfig says which projections an application can rebuild on request.
type ServeConfig struct {
	DB     *sqlx.DB
	Schema string
	// Rebuilds maps a projection name to how to rebuild it.
	Rebuilds map[string]RebuildConfig
	// Switched is called with the new slot's runner after each successful
	// rebuild: keep it as the live projection and stop the old one.
	Switched func(name, slot string, r *Runner)
	// Poll is how often requests are looked for. Defaults to 1s.
	Poll   time.Duration
	Logger *slog.Logger
}

// ServeRebuilds performs the rebuilds requested with `stele projections
// rebuild` (RequestRebuild) for the projections in cfg.Rebuilds, reporting
// progress where the CLI reads it, until ctx ends. Run it in the application
// that owns the projections' handlers.
func ServeRebuilds(ctx context.Context, store eventstore.Store, cfg ServeConfig) error {
	q, err := newQueries(cfg.Schema)
	if err != nil {
		return err
	}
	if cfg.Poll == 0 {
		cfg.Poll = time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	for {
		var pending []RebuildRequest
		err := cfg.DB.SelectContext(ctx, &pending, `SELECT name, slot, requested_at, started_at, done, total, rate, finished_at, error
			FROM `+q.rebuilds+` WHERE started_at IS NULL ORDER BY requested_at`)
		if err != nil && ctx.Err() == nil {
			cfg.Logger.WarnContext(ctx, "projection: reading rebuild requests failed", "err", err)
		}
		for _, req := range pending {
			rc, ok := cfg.Rebuilds[req.Name]
			if !ok {
				continue // another application may serve it
			}
			// Claim it, so one application of several performs it.
			res, err := cfg.DB.ExecContext(ctx, `UPDATE `+q.rebuilds+` SET started_at = now() WHERE name = $1 AND started_at IS NULL`, req.Name)
			if err != nil {
				cfg.Logger.WarnContext(ctx, "projection: claiming a rebuild request failed", "projection", req.Name, "err", err)
				continue
			}
			if n, _ := res.RowsAffected(); n == 0 {
				continue
			}
			serveOne(ctx, store, cfg, q, req, rc)
		}
		if !sleep(ctx, cfg.Poll) {
			return ctx.Err()
		}
	}
}

func serveOne(ctx context.Context, store eventstore.Store, cfg ServeConfig, q queries, req RebuildRequest, rc RebuildConfig) {
	rc.Name, rc.DB, rc.Schema = req.Name, cfg.DB, cfg.Schema
	report := func(p Progress) {
		cfg.DB.ExecContext(ctx, `UPDATE `+q.rebuilds+` SET done = $2, total = $3, rate = $4 WHERE name = $1`, req.Name, p.Done, p.Total, p.Rate)
	}
	user := rc.Progress
	rc.Progress = func(p Progress) {
		report(p)
		if user != nil {
			user(p)
		}
	}
	cfg.Logger.InfoContext(ctx, "projection rebuild started", "projection", req.Name, "slot", req.Slot)
	r, err := Rebuild(ctx, store, rc, req.Slot)
	var msg *string
	if err != nil {
		m := err.Error()
		msg = &m
	}
	cfg.DB.ExecContext(context.WithoutCancel(ctx), `UPDATE `+q.rebuilds+` SET finished_at = now(), error = $2,
		done = CASE WHEN $2::text IS NULL THEN greatest(done, total) ELSE done END WHERE name = $1`, req.Name, msg)
	cfg.Logger.InfoContext(ctx, "projection rebuild finished", "projection", req.Name, "slot", req.Slot, "err", err)
	if err == nil && cfg.Switched != nil {
		cfg.Switched(req.Name, req.Slot, r)
	}
}
