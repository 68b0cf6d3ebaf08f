-- Snapshots of aggregate state (aggregate/pgsnapshot). A cache: rows may be
-- deleted at any time; a load then folds more events.
CREATE TABLE {{schema}}.snapshots (
  stream_id      text        PRIMARY KEY,
  version        bigint      NOT NULL,
  schema_version int         NOT NULL,
  data           bytea       NOT NULL,
  taken_at       timestamptz NOT NULL DEFAULT now()
);
