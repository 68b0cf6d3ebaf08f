package main

import (
	"context"
	"fmt"

	"github.com/jmoiron/sqlx"
	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/gdpr"
)

func newGdprCmd(g *globalOpts) *cobra.Command {
	var keySchema string
	cmd := &cobra.Command{
		Use:   "gdpr",
		Short: "Crypto-shredding: the key store of personal data, and forgetting a data subject",
		Long: `Events whose personal fields are encrypted with their subject's key (package gdpr)
keep those keys in a schema of their own, by default the store's schema followed
by "_keys" (stele_keys). Forgetting a subject deletes its key: the fields can never
be read again and decode as "[erased]", while the events, streams, aggregates and
projections keep working. See docs/security.md, "Crypto-shredding".`,
	}
	cmd.PersistentFlags().StringVar(&keySchema, "key-schema", "", `schema of the subject keys (default: --schema followed by "_keys")`)
	resolve := func() (string, error) {
		ks := keySchema
		if ks == "" {
			ks = g.schema + "_keys"
		}
		if err := pgstore.ValidateSchema(ks); err != nil {
			return "", fmt.Errorf("--key-schema: %w", err)
		}
		return ks, nil
	}
	cmd.AddCommand(newGdprMigrateCmd(g, resolve), newGdprForgetCmd(g, resolve))
	return cmd
}

func newGdprMigrateCmd(g *globalOpts, keySchema func() (string, error)) *cobra.Command {
	return &cobra.Command{
		Use:   "migrate",
		Short: "Create or update the key schema (table subject_keys)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ks, err := keySchema()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			if err := gdpr.MigrateKeys(ctx, db, ks); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "key schema %s is up to date\n", ks)
			return nil
		},
	}
}

func newGdprForgetCmd(g *globalOpts, keySchema func() (string, error)) *cobra.Command {
	var actor string
	var vacuumFull bool
	cmd := &cobra.Command{
		Use:   "forget SUBJECT",
		Short: "Forget a data subject: delete its key, as an audited admin action",
		Long: `Delete the key of data subject SUBJECT (the id its events name in their subject
field), in one transaction with a row of the audit trail (action "forget", target
SUBJECT, actor --actor). From then on the subject's personal fields decode as
"[erased]" ([]byte fields as null). Forgetting a subject that has no key (never
had one, or was forgotten before) succeeds and is recorded too.

What it does not do: read models that copied the subject's data keep it until
they are rebuilt (stele projections rebuild NAME) and their old slot is dropped;
processes that cache keys (gdpr.Options.CacheTTL) may read the data until the
cache expires; backups, WAL archives and replicas hold the old key until they
expire. --vacuum-full rewrites the key table afterwards (VACUUM FULL, a short
exclusive lock) so the deleted row does not linger in its data file.

Run it as the owner of both schemas.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			subject := args[0]
			if actor == "" {
				return fmt.Errorf("--actor is required: who asks to forget %q (recorded in the audit trail)", subject)
			}
			if err := gdpr.ValidateSubject(subject); err != nil {
				return err
			}
			ks, err := keySchema()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			if err := gdprRequireRelation(ctx, db, g.schema, "admin_audit", "stele migrate --schema "+g.schema); err != nil {
				return err
			}
			if err := gdprRequireRelation(ctx, db, ks, "subject_keys", "stele gdpr migrate --key-schema "+ks); err != nil {
				return err
			}
			res, err := gdpr.Forget(ctx, db, g.schema, ks, actor, subject)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if res.KeyDeleted {
				fmt.Fprintf(w, "forgot subject %q: key deleted (audit #%d)\n", subject, res.AuditID)
			} else {
				fmt.Fprintf(w, "subject %q had no key (never had one, or already forgotten); recorded (audit #%d)\n", subject, res.AuditID)
			}
			if vacuumFull {
				if _, err := db.ExecContext(ctx, `VACUUM FULL "`+ks+`".subject_keys`); err != nil {
					return fmt.Errorf("the key is deleted, but VACUUM FULL of the key table failed: %w", err)
				}
				fmt.Fprintf(w, "rewrote %s.subject_keys (VACUUM FULL)\n", ks)
			}
			fmt.Fprintln(cmd.ErrOrStderr(), "next: rebuild the read models that hold personal data and drop their old slots")
			return nil
		},
	}
	cmd.Flags().StringVar(&actor, "actor", "", "who asks for it: recorded in the audit trail (required)")
	cmd.Flags().BoolVar(&vacuumFull, "vacuum-full", false, "rewrite the key table afterwards (VACUUM FULL)")
	return cmd
}

// gdprRequireRelation fails with what to run when schema.table does not exist.
func gdprRequireRelation(ctx context.Context, db *sqlx.DB, schema, table, fix string) error {
	var ok bool
	if err := db.GetContext(ctx, &ok, `SELECT to_regclass($1) IS NOT NULL`, `"`+schema+`".`+table); err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%s.%s does not exist; run %s", schema, table, fix)
	}
	return nil
}
