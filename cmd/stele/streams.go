package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/eventstore"
)

func newStreamsCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "streams",
		Short: "List, show and follow streams",
	}
	cmd.AddCommand(newStreamsLsCmd(g), newStreamsShowCmd(g), newStreamsTailCmd(g))
	return cmd
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

func newStreamsLsCmd(g *globalOpts) *cobra.Command {
	var category string
	var limit int
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List streams in id order",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			store, closeStore, err := g.openStore(ctx)
			if err != nil {
				return err
			}
			defer closeStore()
			tw := newTable(cmd.OutOrStdout())
			fmt.Fprintln(tw, "STREAM\tCATEGORY\tVERSION\tUPDATED_AT")
			opts := eventstore.ListStreamsOpts{Category: category}
			for n := 0; limit <= 0 || n < limit; {
				opts.Limit = eventstore.DefaultPageSize
				if limit > 0 {
					opts.Limit = min(opts.Limit, limit-n)
				}
				page, err := store.ListStreams(ctx, opts)
				if err != nil {
					return err
				}
				for _, s := range page {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", s.StreamID, s.Category, s.Version, s.UpdatedAt.Format(time.RFC3339))
				}
				// Flushing per page keeps memory bounded, at the cost of
				// columns realigning between pages.
				if err := tw.Flush(); err != nil {
					return err
				}
				n += len(page)
				if len(page) < opts.Limit {
					break
				}
				opts.After = page[len(page)-1].StreamID
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&category, "category", "", "only streams of this category")
	cmd.Flags().IntVar(&limit, "limit", 0, "list at most N streams (0: all)")
	return cmd
}

func newStreamsShowCmd(g *globalOpts) *cobra.Command {
	var from int64
	var backward, asJSON bool
	var limit int
	cmd := &cobra.Command{
		Use:   "show STREAM",
		Short: "Print a stream's events",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, streamID := cmd.Context(), args[0]
			store, closeStore, err := g.openStore(ctx)
			if err != nil {
				return err
			}
			defer closeStore()
			opts := eventstore.ReadStreamOpts{From: eventstore.Version(from), Limit: eventstore.DefaultPageSize}
			if backward {
				opts.Direction = eventstore.Backward
			}
			if limit > 0 {
				opts.Limit = min(opts.Limit, limit)
			}
			w := cmd.OutOrStdout()
			tw := newTable(w)
			if !asJSON {
				fmt.Fprintln(tw, "VERSION\tPOSITION\tTYPE\tRECORDED_AT\tMETADATA\tDATA")
			}
			n := 0
			for e, err := range eventstore.IterStream(ctx, store, streamID, opts) {
				if err != nil {
					return err
				}
				if asJSON {
					err = writeJSON(w, e)
				} else {
					_, err = fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", e.Version, e.Position, e.Type,
						e.RecordedAt.Format(time.RFC3339Nano), metadataText(e.Metadata), dataText(e.Data))
				}
				if err != nil {
					return err
				}
				if n++; n == limit {
					break
				}
				if n%eventstore.DefaultPageSize == 0 {
					if err := tw.Flush(); err != nil {
						return err
					}
				}
			}
			if n == 0 {
				if v, err := store.StreamVersion(ctx, streamID); err != nil {
					return err
				} else if v == 0 {
					return fmt.Errorf("stream %q has no events", streamID)
				}
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.Int64Var(&from, "from", 0, "first version to show (default: the first, or the last with --backward)")
	f.BoolVar(&backward, "backward", false, "newest first")
	f.IntVar(&limit, "limit", 0, "show at most N events (0: all)")
	f.BoolVar(&asJSON, "json", false, "print one JSON object per event")
	return cmd
}

func newStreamsTailCmd(g *globalOpts) *cobra.Command {
	var fromStart, asJSON bool
	var after, category string
	cmd := &cobra.Command{
		Use:   "tail",
		Short: "Follow the global feed until interrupted",
		Long:  "Follow the global feed live, from its end unless --from-start or --after says otherwise, until Ctrl-C.",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			opts := eventstore.SubscribeOpts{Category: category}
			if after != "" {
				p, err := eventstore.ParsePosition(after)
				if err != nil {
					return err
				}
				opts.After = p
			}
			store, closeStore, err := g.openStore(ctx)
			if err != nil {
				return err
			}
			defer closeStore()
			if !fromStart && after == "" {
				if opts.After, err = store.Head(ctx); err != nil {
					return err
				}
			}
			w := cmd.OutOrStdout()
			err = eventstore.Subscribe(ctx, store, opts, func(_ context.Context, e eventstore.Event) error {
				if asJSON {
					return writeJSON(w, e)
				}
				_, err := fmt.Fprintf(w, "%s %s %d %s\n", e.Position, e.StreamID, e.Version, e.Type)
				return err
			})
			if ctx.Err() != nil {
				return nil // interrupted: the normal way to stop
			}
			return err
		},
	}
	f := cmd.Flags()
	f.BoolVar(&fromStart, "from-start", false, "start at the beginning of the feed")
	f.StringVar(&after, "after", "", "start after this position (TXID/POSITION)")
	f.StringVar(&category, "category", "", "only streams of this category")
	f.BoolVar(&asJSON, "json", false, "print one JSON object per event")
	cmd.MarkFlagsMutuallyExclusive("from-start", "after")
	return cmd
}

// isText reports whether data can be printed as it is: JSON in valid UTF-8
// (json.Valid alone lets invalid UTF-8 through inside strings).
func isText(data []byte) bool { return utf8.Valid(data) && json.Valid(data) }

func dataText(data []byte) string {
	if isText(data) {
		var b bytes.Buffer
		// One line per event, even if the JSON was stored indented.
		if err := json.Compact(&b, data); err == nil {
			return b.String()
		}
	}
	const show = 16
	if len(data) <= show {
		return fmt.Sprintf("<%d bytes: %s>", len(data), hex.EncodeToString(data))
	}
	return fmt.Sprintf("<%d bytes: %s…>", len(data), hex.EncodeToString(data[:show]))
}

func metadataText(m eventstore.Metadata) string {
	var parts []string
	if m.CorrelationID != "" {
		parts = append(parts, "correlation="+m.CorrelationID)
	}
	if m.CausationID != "" {
		parts = append(parts, "causation="+m.CausationID)
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, " ")
}

type eventJSON struct {
	StreamID    string               `json:"stream_id"`
	Version     eventstore.Version   `json:"version"`
	Position    string               `json:"position"`
	ID          string               `json:"id"`
	Type        string               `json:"type"`
	ContentType string               `json:"content_type"`
	RecordedAt  time.Time            `json:"recorded_at"`
	Metadata    *eventstore.Metadata `json:"metadata,omitempty"`
	Data        json.RawMessage      `json:"data,omitempty"`
	DataBase64  []byte               `json:"data_base64,omitempty"` // when Data is not JSON
}

func writeJSON(w io.Writer, e eventstore.Event) error {
	out := eventJSON{
		StreamID: e.StreamID, Version: e.Version, Position: e.Position.String(), ID: e.ID.String(),
		Type: e.Type, ContentType: e.ContentType, RecordedAt: e.RecordedAt,
	}
	if !e.Metadata.IsZero() {
		out.Metadata = &e.Metadata
	}
	if isText(e.Data) {
		out.Data = e.Data
	} else {
		out.DataBase64 = e.Data
	}
	b, err := json.Marshal(out)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
