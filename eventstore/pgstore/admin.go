package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jmoiron/sqlx"
)

// AdminAction describes an administrative action for the audit trail.
type AdminAction struct {
	Actor  string // who asked: an operator's name; required
	Action string // what: "archive", "retention", "forget", "restore-repair", ...; required
	Target string // on what: a stream, a category, a subject
	Detail any    // anything else worth keeping, as JSON
}

// AuditEntry is one row of the audit trail.
type AuditEntry struct {
	ID     int64
	At     time.Time
	Actor  string
	Role   string // the database role that did it
	Action string
	Target string
	Detail json.RawMessage
}

// ErrAdminAction is returned for an AdminAction without actor or action.
var ErrAdminAction = errors.New("pgstore: an admin action needs an actor and an action")

// Admin runs fn in a transaction that first records a in the audit trail
// (table admin_audit) and is then allowed to change history: the only way
// past the triggers that make events immutable. Both commit together, so
// no change is made without its audit row and no audit row stands for a
// change that was rolled back. Run it as the schema owner: an application
// role granted with AppRoleGrants cannot UPDATE or DELETE events at all.
func Admin(ctx context.Context, db *sqlx.DB, schema string, a AdminAction, fn func(tx *sqlx.Tx) error) (int64, error) {
	if err := ValidateSchema(schema); err != nil {
		return 0, err
	}
	if a.Actor == "" || a.Action == "" {
		return 0, ErrAdminAction
	}
	detail, err := json.Marshal(a.Detail)
	if err != nil {
		return 0, fmt.Errorf("pgstore: admin %s: detail: %w", a.Action, err)
	}
	if a.Detail == nil {
		detail = []byte(`{}`)
	}
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("pgstore: admin %s: %w", a.Action, err)
	}
	defer tx.Rollback() //nolint:errcheck // a no-op after Commit
	var id int64
	// The tenant the transaction acts as, if any, is part of the detail.
	if err := tx.QueryRowContext(ctx, `INSERT INTO `+quoteIdent(schema)+`.admin_audit (actor, action, target, detail)
		VALUES ($1, $2, $3, CASE WHEN coalesce(current_setting('`+TenantSetting+`', true), '') = '' OR jsonb_typeof($4::jsonb) <> 'object'
		        THEN $4::jsonb ELSE $4::jsonb || jsonb_build_object('tenant', current_setting('`+TenantSetting+`', true)) END)
		RETURNING id`, a.Actor, a.Action, a.Target, detail).Scan(&id); err != nil {
		return 0, fmt.Errorf("pgstore: admin %s: recording the action: %w", a.Action, err)
	}
	if _, err := tx.ExecContext(ctx, `SELECT set_config('stele.admin_action', $1, true)`, strconv.FormatInt(id, 10)); err != nil {
		return 0, fmt.Errorf("pgstore: admin %s: %w", a.Action, err)
	}
	if fn != nil {
		if err := fn(tx); err != nil {
			return 0, fmt.Errorf("pgstore: admin %s on %s: %w", a.Action, a.Target, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("pgstore: admin %s: commit: %w", a.Action, err)
	}
	return id, nil
}

// Audit lists the audit trail, newest first, at most limit rows (0: 100).
func Audit(ctx context.Context, db *sqlx.DB, schema string, limit int) ([]AuditEntry, error) {
	if err := ValidateSchema(schema); err != nil {
		return nil, err
	}
	if limit <= 0 {
		limit = 100
	}
	rows, err := db.QueryContext(ctx, `SELECT id, at, actor, role, action, target, detail FROM `+quoteIdent(schema)+
		`.admin_audit ORDER BY id DESC LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("pgstore: reading the audit trail: %w", err)
	}
	defer rows.Close()
	var out []AuditEntry
	for rows.Next() {
		var e AuditEntry
		var detail []byte
		if err := rows.Scan(&e.ID, &e.At, &e.Actor, &e.Role, &e.Action, &e.Target, &detail); err != nil {
			return nil, fmt.Errorf("pgstore: reading the audit trail: %w", err)
		}
		e.Detail = detail
		out = append(out, e)
	}
	return out, rows.Err()
}
