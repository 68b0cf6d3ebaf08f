package broker

import (
	"context"
	"fmt"
	"hash/fnv"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	_ "github.com/jackc/pgx/v5/stdlib" // driver "pgx" for Config.URL
	"github.com/jmoiron/sqlx"
)

// Postgres settings that are not in Config.
const (
	// pgBatch is how many messages a subscriber reads per transaction: 100
	// reads about 50 times faster than 1; a crash re-delivers at most the
	// batch.
	pgBatch = 100
	// pgResend is how long a nacked message waits before it is sent again.
	// It is held in the subscriber's transaction meanwhile, which delays
	// every watermill-sql subscriber of the cluster: keep it short.
	pgResend = 100 * time.Millisecond
)

// openPostgres sets up watermill-sql/v4: DefaultPostgreSQLSchema with a BYTEA
// payload (stele payloads are not always JSON) and the
// DefaultPostgreSQLOffsetsAdapter (consumer groups). The publisher creates a
// topic's table before its first insert; subscribers create both tables
// before subscribing. Publish is one INSERT of all the messages, committed
// when it returns (a *sql.DB, not a transaction).
func openPostgres(ctx context.Context, cfg Config, logger watermill.LoggerAdapter) (adapter, error) {
	db, owned := cfg.DB, false
	addr := "the given DB"
	if db == nil {
		addr = redact(cfg.URL)
		var err error
		if db, err = sqlx.Open("pgx", cfg.URL); err != nil {
			return adapter{}, &ConnectError{Kind: Postgres, Addr: addr, Err: err}
		}
		owned = true
	}
	fail := func(err error) (adapter, error) {
		if owned {
			_ = db.Close()
		}
		return adapter{}, &ConnectError{Kind: Postgres, Addr: addr, Err: err}
	}
	pctx, cancel := context.WithTimeout(ctx, dialTimeout(ctx, cfg))
	defer cancel()
	if err := db.PingContext(pctx); err != nil {
		return fail(err)
	}
	if cfg.Schema != "" {
		// CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even when the
		// schema exists, which an application role should not have: create
		// it only when it is missing.
		var exists bool
		if err := db.QueryRowContext(pctx, `SELECT to_regnamespace($1) IS NOT NULL`, quoteIdent(cfg.Schema)).Scan(&exists); err != nil {
			return fail(fmt.Errorf("looking up schema %s: %w", cfg.Schema, err))
		}
		if !exists {
			if _, err := db.ExecContext(pctx, `CREATE SCHEMA IF NOT EXISTS `+quoteIdent(cfg.Schema)); err != nil {
				return fail(fmt.Errorf("creating schema %s: %w", cfg.Schema, err))
			}
		}
	}

	schema := wsql.DefaultPostgreSQLSchema{
		GenerateMessagesTableName: func(topic string) string { return pgTable(cfg.Schema, "watermill_", topic) },
		GeneratePayloadType:       func(string) string { return "BYTEA" },
		SubscribeBatchSize:        pgBatch,
	}
	offsets := wsql.DefaultPostgreSQLOffsetsAdapter{
		GenerateMessagesOffsetsTableName: func(topic string) string { return pgTable(cfg.Schema, "watermill_offsets_", topic) },
	}
	beginner := wsql.BeginnerFromStdSQL(db.DB)
	pub, err := wsql.NewPublisher(beginner, wsql.PublisherConfig{SchemaAdapter: schema, AutoInitializeSchema: true}, logger)
	if err != nil {
		return fail(err)
	}
	ad := adapter{
		pub: pub,
		newSub: func(group string) (groupSub, error) {
			sub, err := wsql.NewSubscriber(beginner, wsql.SubscriberConfig{
				ConsumerGroup:    group,
				PollInterval:     cfg.PollInterval,
				ResendInterval:   pgResend,
				SchemaAdapter:    schema,
				OffsetsAdapter:   offsets,
				InitializeSchema: true,
			}, logger)
			if err != nil {
				return groupSub{}, err
			}
			return groupSub{inner: sub, initialize: sub.SubscribeInitialize}, nil
		},
	}
	if owned {
		ad.close = db.Close
	}
	return ad, nil
}

// pgTable returns the quoted, schema-qualified name of a topic's table,
// shortened to PostgreSQL's 63 bytes with a hash of the topic when needed
// (PostgreSQL would silently truncate it, and two topics could share a table).
func pgTable(schema, prefix, topic string) string {
	name := prefix + topic
	if len(name) > 63 {
		h := fnv.New32a()
		_, _ = h.Write([]byte(topic))
		name = fmt.Sprintf("%s_%08x", name[:63-9], h.Sum32())
	}
	if schema == "" {
		return quoteIdent(name)
	}
	return quoteIdent(schema) + "." + quoteIdent(name)
}

// quoteIdent quotes a PostgreSQL identifier. Names reaching it are already
// validated ([A-Za-z0-9._-]), the doubling is for safety.
func quoteIdent(s string) string {
	out := make([]byte, 0, len(s)+2)
	out = append(out, '"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' {
			out = append(out, '"')
		}
		out = append(out, s[i])
	}
	return string(append(out, '"'))
}
