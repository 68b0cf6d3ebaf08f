package main

import (
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/spf13/cobra"

	"github.com/stele-dev/stele/bus"
	"github.com/stele-dev/stele/bus/broker"
)

func newBusCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bus",
		Short: "Inspect the message bus's poison box",
	}
	poison := &cobra.Command{
		Use:   "poison",
		Short: "List and re-publish messages that bus handlers gave up on",
		Long: `A poisoned message is one a bus handler failed to handle after every retry.
The router's poison-queue middleware took it off its topic so that the messages
behind it could go on, and the PostgreSQL poison box (bus.NewPostgresPoisonBox)
keeps it in the bus_poison table, with the topic it came from, the handler and
the reason, until it is re-published once the cause is fixed.`,
	}
	poison.AddCommand(newPoisonLsCmd(g), newPoisonRepublishCmd(g))
	cmd.AddCommand(poison)
	return cmd
}

type poisonedJSON struct {
	ID            int64             `json:"id"`
	UUID          string            `json:"uuid"`
	Topic         string            `json:"topic"`
	Handler       string            `json:"handler"`
	Reason        string            `json:"reason"`
	Payload       []byte            `json:"payload"` // base64
	Metadata      map[string]string `json:"metadata"`
	PoisonedAt    time.Time         `json:"poisoned_at"`
	RepublishedAt *time.Time        `json:"republished_at"` // null: pending
}

// maxReason is how much of a reason's first line a table row shows.
const maxReason = 80

func newPoisonLsCmd(g *globalOpts) *cobra.Command {
	var all, asJSON bool
	var limit int
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List poisoned messages, oldest first",
		Long: `List the poisoned messages that wait to be re-published, oldest first:

  ID           what stele bus poison republish takes
  POISONED_AT  when the handler gave up on it
  TOPIC        the topic it was consumed from, where a re-publish sends it
  HANDLER      the router handler that failed
  UUID         the message's UUID, which a re-publish keeps (so a consumer's
               inbox dedupes it if it had been handled after all)
  REASON       the handler's last error: its first line, cut at 80 characters

--all lists the re-published messages too, with a REPUBLISHED_AT column ("-"
while pending). --json prints every field of each message, the payload in
base64 and the metadata as the message carried it (without the poison notes).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if limit < 1 {
				return fmt.Errorf("--limit %d: want at least 1", limit)
			}
			ctx := cmd.Context()
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			if err := requireTable(ctx, db, g.schema, "bus_poison", "bus"); err != nil {
				return err
			}
			box, err := bus.NewPostgresPoisonBox(db, g.schema)
			if err != nil {
				return err
			}
			msgs, err := box.List(ctx, !all, limit)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			tw := newTable(w)
			if !asJSON {
				if all {
					fmt.Fprintln(tw, "ID\tPOISONED_AT\tTOPIC\tHANDLER\tUUID\tREPUBLISHED_AT\tREASON")
				} else {
					fmt.Fprintln(tw, "ID\tPOISONED_AT\tTOPIC\tHANDLER\tUUID\tREASON")
				}
			}
			for _, p := range msgs {
				var republished *time.Time
				if !p.RepublishedAt.IsZero() {
					republished = &p.RepublishedAt
				}
				switch {
				case asJSON:
					err = writeJSONLine(w, poisonedJSON{
						ID: p.ID, UUID: p.UUID, Topic: p.Topic, Handler: p.Handler, Reason: p.Reason,
						Payload: p.Payload, Metadata: p.Metadata, PoisonedAt: p.PoisonedAt, RepublishedAt: republished,
					})
				case all:
					_, err = fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", p.ID, p.PoisonedAt.Format(time.RFC3339), cellText(p.Topic),
						cellText(p.Handler), cellText(p.UUID), timeText(republished), reasonText(p.Reason))
				default:
					_, err = fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", p.ID, p.PoisonedAt.Format(time.RFC3339), cellText(p.Topic),
						cellText(p.Handler), cellText(p.UUID), reasonText(p.Reason))
				}
				if err != nil {
					return err
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if len(msgs) == limit {
				fmt.Fprintf(cmd.ErrOrStderr(), "showing the oldest %d; there may be more (--limit)\n", limit)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "include the messages already re-published")
	cmd.Flags().IntVar(&limit, "limit", 1000, "list at most this many messages")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per message, with its payload and metadata")
	return cmd
}

// reasonText is the first line of a reason, cut to maxReason characters.
func reasonText(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	line = oneLine(line)
	if line == "" {
		return "-"
	}
	if utf8.RuneCountInString(line) > maxReason {
		r := []rune(line)
		line = strings.TrimSpace(string(r[:maxReason-3])) + "..."
	}
	return line
}

func newPoisonRepublishCmd(g *globalOpts) *cobra.Command {
	var busURL, busSchema string
	cmd := &cobra.Command{
		Use:   "republish ID...",
		Short: "Publish poisoned messages again to the topics they came from",
		Long: `Publish each poisoned message ID (as stele bus poison ls shows it) again to the
topic it was consumed from, through the broker --bus names, with its UUID,
payload and metadata (without the poison notes), and mark it re-published.
Fix the cause first: a handler that fails again poisons it again.

--bus is the URL of the broker the application consumes from (required):
  postgres://user@host:5432/db?sslmode=disable   the PostgreSQL bus; its
      watermill tables are in --bus-schema, by default the --schema of the
      event store
  amqp://user:pass@host:5672/  nats://host:4222  redis://host:6379/0
  kafka://host:9092[,host:9092...]
The in-process bus (gochannel) is refused: the CLI's own would have no
consumers, so the message would be lost.

The consumer sees the message as a redelivery: an inbox (outbox.Inbox) dedupes
it if it had in fact been handled. A message is marked only after the broker
confirmed it; if marking fails it may go out twice. Re-publishing a message
that was already re-published sends it again.

Each ID is tried in turn: one that fails (an unknown ID, a broker that refused
it) is reported and the others are still re-published. The command fails if
any ID failed.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ids := make([]int64, len(args))
			for i, a := range args {
				id, err := strconv.ParseInt(a, 10, 64)
				if err != nil || id <= 0 {
					return fmt.Errorf("poisoned message id %q: want the number stele bus poison ls shows", a)
				}
				ids[i] = id
			}
			cfg, err := broker.ParseURL(busURL)
			if err != nil {
				return fmt.Errorf("--bus: %w", err)
			}
			switch {
			case cfg.Kind == broker.GoChannel:
				return fmt.Errorf("--bus %s: the in-process bus lives inside one process, and the CLI's own has no consumers, "+
					"so a re-published message would be lost; give the URL of the broker your application consumes from", busURL)
			case cfg.Kind == broker.Postgres && cmd.Flags().Changed("bus-schema"):
				cfg.Schema = busSchema
			case cfg.Kind == broker.Postgres:
				cfg.Schema = g.schema
			case cmd.Flags().Changed("bus-schema"):
				return fmt.Errorf("--bus-schema is only for a postgres:// bus, not %s", cfg.Kind)
			}
			cfg.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelWarn}))

			ctx := cmd.Context()
			db, err := g.openDB(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			if err := requireTable(ctx, db, g.schema, "bus_poison", "bus"); err != nil {
				return err
			}
			box, err := bus.NewPostgresPoisonBox(db, g.schema)
			if err != nil {
				return err
			}
			b, err := broker.Open(ctx, cfg)
			if err != nil {
				return err
			}
			defer b.Close()

			var errs []error
			for _, id := range ids {
				var topic string
				err := db.GetContext(ctx, &topic, `SELECT topic FROM "`+g.schema+`".bus_poison WHERE id = $1`, id)
				if errors.Is(err, sql.ErrNoRows) {
					err = bus.ErrNoPoisoned
				}
				if err == nil {
					err = box.Republish(ctx, id, b.Publisher())
				}
				if errors.Is(err, bus.ErrNoPoisoned) {
					err = fmt.Errorf("poisoned message %d not found in schema %s (see stele bus poison ls --all): %w",
						id, g.schema, err)
				}
				if err != nil {
					errs = append(errs, err)
					if ctx.Err() != nil {
						break
					}
					continue
				}
				if _, err := fmt.Fprintf(cmd.OutOrStdout(), "republished %d to %s\n", id, topic); err != nil {
					return err
				}
			}
			if err := b.Close(); err != nil {
				errs = append(errs, err)
			}
			return errors.Join(errs...)
		},
	}
	cmd.Flags().StringVar(&busURL, "bus", "", "URL of the broker to publish to (required; see above)")
	cmd.Flags().StringVar(&busSchema, "bus-schema", "", "postgres bus: schema of its watermill tables (default: --schema)")
	_ = cmd.MarkFlagRequired("bus")
	return cmd
}
