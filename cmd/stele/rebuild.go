package main

import (
	"fmt"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/projection"
)

func newProjectionsRebuildCmd(g *globalOpts) *cobra.Command {
	var slot string
	var noWait, force bool
	cmd := &cobra.Command{
		Use:   "rebuild NAME",
		Short: "Rebuild a projection by replay into a new slot, then switch readers to it",
		Long: `Ask the application that runs projection NAME to rebuild it: replay the whole log into
a new slot (version) of its read model while the current one keeps serving, then switch
readers to it in one transaction (projection.Rebuild). The application must serve
rebuilds (projection.ServeRebuilds); the CLI cannot run its handler code itself.

Shows a progress bar with rate and ETA until the rebuild finishes. Ctrl-C stops
watching; the rebuild goes on. --no-wait only files the request.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			name := args[0]
			if slot == "" {
				slot = "r" + time.Now().UTC().Format("20060102t150405")
			}
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			if err := projection.RequestRebuild(ctx, db, g.schema, name, slot, force); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "requested a rebuild of %s into slot %s\n", name, slot)
			if noWait {
				return nil
			}
			// The bar is made once the application reports a total: an
			// indeterminate bar would spin in a goroutine of its own.
			var bar *progressbar.ProgressBar
			fmt.Fprintf(cmd.ErrOrStderr(), "waiting for the application to start it (projection.ServeRebuilds)...\n")
			for {
				req, err := projection.GetRebuild(ctx, db, g.schema, name)
				if err != nil {
					return err
				}
				if req.Total > 0 && bar == nil {
					bar = progressbar.NewOptions64(req.Total,
						progressbar.OptionSetWriter(cmd.ErrOrStderr()),
						progressbar.OptionSetDescription(name+"@"+slot),
						progressbar.OptionShowCount(),
						progressbar.OptionShowIts(),
						progressbar.OptionSetItsString("events"),
						progressbar.OptionSetPredictTime(true),
						progressbar.OptionThrottle(100*time.Millisecond),
					)
				}
				if bar != nil {
					bar.Set64(min(req.Done, bar.GetMax64()))
				}
				if req.FinishedAt != nil {
					if bar != nil {
						bar.Finish()
					}
					fmt.Fprintln(cmd.ErrOrStderr())
					if req.Error != nil {
						return fmt.Errorf("rebuild of %s into %s failed: %s", name, slot, *req.Error)
					}
					fmt.Fprintf(cmd.OutOrStdout(), "rebuilt %s into slot %s and switched readers to it (%d events, %s)\n",
						name, slot, req.Done, req.FinishedAt.Sub(*req.StartedAt).Round(time.Millisecond))
					return nil
				}
				select {
				case <-ctx.Done():
					fmt.Fprintf(cmd.OutOrStdout(), "stopped watching; the rebuild of %s goes on\n", name)
					return nil
				case <-time.After(200 * time.Millisecond):
				}
			}
		},
	}
	cmd.Flags().StringVar(&slot, "slot", "", "name of the new slot (default: r + the time)")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "file the request and return")
	cmd.Flags().BoolVar(&force, "force", false, "replace a pending or running request (its application died)")
	return cmd
}
