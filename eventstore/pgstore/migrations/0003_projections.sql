-- Projection checkpoints and dead letters (package projection). A checkpoint
-- is a feed position: the (transaction id, global position) pair.
CREATE TABLE {{schema}}.projection_checkpoints (
  name           text        PRIMARY KEY,
  transaction_id xid8        NOT NULL DEFAULT '0',
  position       bigint      NOT NULL DEFAULT 0,
  updated_at     timestamptz NOT NULL DEFAULT now(),
  -- The runner's state as it last reported it (waiting, running, failed,
  -- stopped); a process that died leaves its last word here.
  state          text        NOT NULL DEFAULT 'idle',
  state_error    text,
  state_at       timestamptz
);

CREATE TABLE {{schema}}.projection_dead_letters (
  id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  projection     text        NOT NULL,
  stream_id      text        NOT NULL,
  version        bigint      NOT NULL,
  transaction_id xid8        NOT NULL,
  position       bigint      NOT NULL,
  event_id       uuid        NOT NULL,
  event_type     text        NOT NULL,
  error          text        NOT NULL,
  attempts       int         NOT NULL,
  failed_at      timestamptz NOT NULL DEFAULT now(),
  retry_requested_at timestamptz,            -- set by `stele dlq retry`; the running projection retries it
  UNIQUE (projection, event_id)
);

-- Which slot (version) of a rebuilt read model readers use (projection.Rebuild).
CREATE TABLE {{schema}}.projection_slots (
  name        text        PRIMARY KEY,
  slot        text        NOT NULL,
  switched_at timestamptz NOT NULL DEFAULT now()
);

-- Rebuild requests from `stele projections rebuild NAME`, and their progress,
-- written by the application that serves them (projection.ServeRebuilds).
CREATE TABLE {{schema}}.projection_rebuilds (
  name         text        PRIMARY KEY,
  slot         text        NOT NULL,
  requested_at timestamptz NOT NULL DEFAULT now(),
  started_at   timestamptz,
  done         bigint      NOT NULL DEFAULT 0,
  total        bigint      NOT NULL DEFAULT 0,
  rate         double precision NOT NULL DEFAULT 0,
  finished_at  timestamptz,
  error        text
);
