-- The outbox relay (package outbox): one row per relay name holds its lease
-- and its checkpoint. epoch grows by one each time the lease changes hands;
-- a relay writes its checkpoint only while the epoch is still its own, so a
-- relay that paused past its lease cannot move the checkpoint (fencing).
CREATE TABLE {{schema}}.outbox_relays (
  name           text        PRIMARY KEY,
  epoch          bigint      NOT NULL DEFAULT 0,
  owner          text        NOT NULL DEFAULT '',
  lease_until    timestamptz NOT NULL DEFAULT '-infinity',
  transaction_id xid8        NOT NULL DEFAULT '0',
  position       bigint      NOT NULL DEFAULT 0,
  published      bigint      NOT NULL DEFAULT 0,   -- messages confirmed by the broker, all time
  last_publish_at timestamptz,
  last_latency_ms double precision,                -- append-to-confirm of the last batch's newest event
  last_error     text,
  updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The consumer side's inbox: a message id is recorded in the same transaction
-- as the consumer's own writes, so a redelivered message has no second effect.
CREATE TABLE {{schema}}.inbox (
  consumer   text        NOT NULL,
  message_id text        NOT NULL,
  handled_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer, message_id)
);

-- Messages a bus handler gave up on (package bus, PoisonQueue middleware),
-- kept for inspection and re-publishing (`stele bus poison`).
CREATE TABLE {{schema}}.bus_poison (
  id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  message_uuid   text        NOT NULL,
  topic          text        NOT NULL,   -- where it came from, and where a re-publish sends it
  handler        text        NOT NULL DEFAULT '',
  reason         text        NOT NULL DEFAULT '',
  payload        bytea       NOT NULL,
  metadata       jsonb       NOT NULL DEFAULT '{}',
  poisoned_at    timestamptz NOT NULL DEFAULT now(),
  republished_at timestamptz
);
CREATE INDEX ON {{schema}}.bus_poison (poisoned_at) WHERE republished_at IS NULL;
