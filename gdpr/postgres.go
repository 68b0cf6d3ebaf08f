package gdpr

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore/pgstore"
)

// PostgresKeyStore keeps subject keys in PostgreSQL, in a schema of their own
// (table subject_keys), apart from the events they protect: grant the
// application what KeyRoleGrants lists and nothing else.
type PostgresKeyStore struct {
	db      *sqlx.DB
	wrapper KeyWrapper
	get     string
	insert  string
	del     string
}

var _ KeyStore = (*PostgresKeyStore)(nil)

// PostgresKeyStoreOptions tunes a PostgresKeyStore. A nil one means defaults.
type PostgresKeyStoreOptions struct {
	// Wrapper, when set, wraps every new data key before it is stored
	// (envelope encryption) and unwraps keys when read. Keys stored without
	// a wrapper are still read; keys wrapped by another wrapper are refused.
	Wrapper KeyWrapper
}

// NewPostgresKeyStore returns a key store over the keys schema (migrated by
// MigrateKeys), e.g. "stele_keys".
func NewPostgresKeyStore(db *sqlx.DB, schema string, opts *PostgresKeyStoreOptions) (*PostgresKeyStore, error) {
	if db == nil {
		return nil, errors.New("gdpr: NewPostgresKeyStore: db is nil")
	}
	t, err := keyTable(schema)
	if err != nil {
		return nil, err
	}
	s := &PostgresKeyStore{
		db:     db,
		get:    `SELECT key_id, key, wrapping FROM ` + t + ` WHERE subject = $1`,
		insert: `INSERT INTO ` + t + ` (subject, key_id, key, wrapping) VALUES ($1, $2, $3, $4) ON CONFLICT (subject) DO NOTHING`,
		del:    deleteKeySQL(t),
	}
	if opts != nil {
		s.wrapper = opts.Wrapper
	}
	return s, nil
}

func keyTable(schema string) (string, error) {
	if err := pgstore.ValidateSchema(schema); err != nil {
		return "", fmt.Errorf("gdpr: key schema: %w", err)
	}
	return `"` + schema + `".subject_keys`, nil
}

func deleteKeySQL(table string) string { return `DELETE FROM ` + table + ` WHERE subject = $1` }

// Key returns the subject's key or ErrNoKey.
func (s *PostgresKeyStore) Key(ctx context.Context, subject string) (Key, error) {
	if err := ValidateSubject(subject); err != nil {
		return Key{}, err
	}
	var (
		k        Key
		stored   []byte
		wrapping string
	)
	err := s.db.QueryRowContext(ctx, s.get, subject).Scan(&k.ID, &stored, &wrapping)
	if errors.Is(err, sql.ErrNoRows) {
		return Key{}, ErrNoKey
	}
	if err != nil {
		return Key{}, fmt.Errorf("gdpr: reading the key of %q: %w", subject, err)
	}
	switch {
	case wrapping == "":
		k.Material = stored
	case s.wrapper == nil || s.wrapper.Name() != wrapping:
		return Key{}, fmt.Errorf("gdpr: the key of %q is wrapped by %q; configure that KeyWrapper", subject, wrapping)
	default:
		if k.Material, err = s.wrapper.Unwrap(ctx, subject, stored); err != nil {
			return Key{}, err
		}
	}
	if len(k.Material) != KeySize {
		return Key{}, fmt.Errorf("gdpr: the key of %q has %d bytes, want %d", subject, len(k.Material), KeySize)
	}
	return k, nil
}

// Create returns the subject's key, making it if needed. Concurrent calls
// agree: the first insert wins and every caller reads it back.
func (s *PostgresKeyStore) Create(ctx context.Context, subject string) (Key, error) {
	k, err := s.Key(ctx, subject)
	if !errors.Is(err, ErrNoKey) {
		return k, err
	}
	nk, err := NewKey()
	if err != nil {
		return Key{}, err
	}
	stored, wrapping := nk.Material, ""
	if s.wrapper != nil {
		if stored, err = s.wrapper.Wrap(ctx, subject, nk.Material); err != nil {
			return Key{}, fmt.Errorf("gdpr: wrapping the key of %q: %w", subject, err)
		}
		wrapping = s.wrapper.Name()
	}
	if _, err := s.db.ExecContext(ctx, s.insert, subject, nk.ID, stored, wrapping); err != nil {
		return Key{}, fmt.Errorf("gdpr: storing the key of %q: %w", subject, err)
	}
	k, err = s.Key(ctx, subject)
	if errors.Is(err, ErrNoKey) {
		// Forgotten between our insert and this read: the caller must not
		// write under a key that no longer exists.
		return Key{}, fmt.Errorf("gdpr: the key of %q was deleted while it was created: %w", subject, err)
	}
	return k, err
}

// Delete deletes the subject's key without an audit record. Use Forget (or
// `stele gdpr forget`) to forget a subject: it records who did it.
func (s *PostgresKeyStore) Delete(ctx context.Context, subject string) (bool, error) {
	if err := ValidateSubject(subject); err != nil {
		return false, err
	}
	res, err := s.db.ExecContext(ctx, s.del, subject)
	if err != nil {
		return false, fmt.Errorf("gdpr: deleting the key of %q: %w", subject, err)
	}
	n, err := res.RowsAffected()
	return n > 0, err
}

// keyMigrations are the key schema's changes, in order; {{table}} is the
// quoted subject_keys table.
var keyMigrations = []string{
	1: `CREATE TABLE {{table}} (
  subject    text        PRIMARY KEY,          -- the data subject's id, as the events name it
  key_id     text        NOT NULL,             -- which key of the subject (a new one after a forget)
  key        bytea       NOT NULL,             -- the AES-256 data key, or it wrapped by "wrapping"
  wrapping   text        NOT NULL DEFAULT '',  -- '' stored as is, else the KeyWrapper's name
  created_at timestamptz NOT NULL DEFAULT now()
)`,
}

// MigrateKeys creates the keys schema and its subject_keys table, or brings
// them up to date, under an advisory lock. Run it as the schema owner.
func MigrateKeys(ctx context.Context, db pgstore.Execer, schema string) error {
	t, err := keyTable(schema)
	if err != nil {
		return err
	}
	q := `"` + schema + `"`
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("gdpr: migrating %s: %w", schema, err)
	}
	defer tx.Rollback() //nolint:errcheck // a no-op after Commit
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, "stele.gdpr.migrate:"+schema); err != nil {
		return fmt.Errorf("gdpr: locking migrations of %s: %w", schema, err)
	}
	for _, stmt := range []string{
		`SET LOCAL client_min_messages = warning`,
		`CREATE SCHEMA IF NOT EXISTS ` + q,
		`CREATE TABLE IF NOT EXISTS ` + q + `.key_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`,
	} {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("gdpr: migrating %s: %w", schema, err)
		}
	}
	var version int
	if err := tx.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM `+q+`.key_migrations`).Scan(&version); err != nil {
		return fmt.Errorf("gdpr: migrating %s: %w", schema, err)
	}
	for v := version + 1; v < len(keyMigrations); v++ {
		body := strings.ReplaceAll(keyMigrations[v], "{{table}}", t)
		if _, err := tx.ExecContext(ctx, body); err != nil {
			return fmt.Errorf("gdpr: applying key migration %d to %s: %w", v, schema, err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+q+`.key_migrations (version) VALUES ($1)`, v); err != nil {
			return fmt.Errorf("gdpr: recording key migration %d in %s: %w", v, schema, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("gdpr: migrating %s: %w", schema, err)
	}
	return nil
}

// KeyRoleGrants returns the statements that let the application role use
// the key store in schema: read keys and create new ones, never delete or
// change one. Forgetting runs as the schema owner, through Forget.
func KeyRoleGrants(schema, role string) ([]string, error) {
	if _, err := keyTable(schema); err != nil {
		return nil, err
	}
	if err := pgstore.ValidateSchema(role); err != nil { // the same identifier rules
		return nil, fmt.Errorf("gdpr: role %q: want [a-z_][a-z0-9_]*", role)
	}
	s, r := `"`+schema+`"`, `"`+role+`"`
	return []string{
		`GRANT USAGE ON SCHEMA ` + s + ` TO ` + r,
		`GRANT SELECT, INSERT ON ` + s + `.subject_keys TO ` + r,
		`GRANT SELECT ON ` + s + `.key_migrations TO ` + r,
	}, nil
}

// ForgetResult says what Forget did.
type ForgetResult struct {
	AuditID    int64 // the admin_audit row of the event store schema
	KeyDeleted bool  // false: the subject had no key (never had, or already forgotten)
}

// Forget deletes subject's key from the keys schema as an audited admin
// action (pgstore.Admin, action "forget", target subject) of the event
// store in storeSchema: the audit row and the deletion commit together. Both
// schemas must be in db's database; run it as their owner. Forgetting a
// subject without a key succeeds and is audited too.
//
// Processes with a Protector cache (Options.CacheTTL) may still read the
// subject's data until their cached key expires.
func Forget(ctx context.Context, db *sqlx.DB, storeSchema, keySchema, actor, subject string) (ForgetResult, error) {
	t, err := keyTable(keySchema)
	if err != nil {
		return ForgetResult{}, err
	}
	if err := ValidateSubject(subject); err != nil {
		return ForgetResult{}, err
	}
	var res ForgetResult
	res.AuditID, err = pgstore.Admin(ctx, db, storeSchema,
		pgstore.AdminAction{Actor: actor, Action: "forget", Target: subject, Detail: map[string]string{"key_schema": keySchema}},
		func(tx *sqlx.Tx) error {
			r, err := tx.ExecContext(ctx, deleteKeySQL(t), subject)
			if err != nil {
				return err
			}
			n, err := r.RowsAffected()
			res.KeyDeleted = n > 0
			return err
		})
	if err != nil {
		return ForgetResult{}, err
	}
	return res, nil
}
