package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore/pgstore"
)

func newMigrateCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "migrate",
		Short: "Create the schema or bring it up to date",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			db, err := g.openDB(cmd.Context())
			if err != nil {
				return err
			}
			defer db.Close()
			res, err := pgstore.Migrate(cmd.Context(), db, g.schema)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if len(res.Applied) == 0 {
				_, err = fmt.Fprintf(w, "schema %s is up to date at version %d\n", g.schema, res.Version)
				return err
			}
			names := make([]string, len(res.Applied))
			for i, m := range res.Applied {
				names[i] = fmt.Sprintf("%04d_%s", m.Version, m.Name)
			}
			_, err = fmt.Fprintf(w, "applied %s; schema %s at version %d\n", strings.Join(names, ", "), g.schema, res.Version)
			return err
		},
	}
}
