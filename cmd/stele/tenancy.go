package main

import (
	"context"
	"fmt"

	"github.com/jmoiron/sqlx"
	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore/pgstore"
)

func newTenancyCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tenancy",
		Short: "Keep tenants apart with PostgreSQL row-level security",
		Long: `Each stream, event, snapshot and projection checkpoint carries a tenant id;
the application binds a store to a tenant with pgstore.Store.ForTenant.
stele tenancy enable turns on row-level security so that PostgreSQL itself
refuses one tenant's transaction any other tenant's rows. See docs/security.md.`,
	}
	cmd.AddCommand(newTenancyEnableCmd(g))
	return cmd
}

func newTenancyEnableCmd(g *globalOpts) *cobra.Command {
	var actor string
	var tables []string
	cmd := &cobra.Command{
		Use:   "enable",
		Short: "Turn on FORCEd row-level security on the stele tables and the read models given",
		Long: `Turn on row-level security, FORCEd so that the tables' owner is held to it
too, on every stele table that carries a tenant and on each --table (a read
model with a tenant_id column). Afterwards a transaction sees and writes only
the rows of the tenant it set (stele.tenant); one that set none sees nothing.
Run it as the schema owner; run the application as a plain role (superusers
and BYPASSRLS roles are never held to row-level security). Recorded in the
audit trail; running it again changes nothing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.audited(cmd, actor, func(ctx context.Context, db *sqlx.DB, who string) error {
				if err := pgstore.EnableTenancy(ctx, db, g.schema, who, tables...); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "row-level security is on in %s (%d read-model tables besides stele's)\n", g.schema, len(tables))
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&actor, "actor", "", actorUsage)
	cmd.Flags().StringSliceVar(&tables, "table", nil, "a read-model table (name or schema.name) with a tenant_id column; repeat for more")
	return cmd
}
