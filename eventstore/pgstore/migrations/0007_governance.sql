-- Data governance: archived streams, tombstones and the hash chain that lets
-- `stele verify` show history was not altered. See governance.go and
-- docs/operations.md ("Retention, archival and tombstones", "Verifying history").

-- Events taken out of the log by ArchiveStream or ApplyRetention: the events
-- table's columns, kept as they were (position and transaction id included,
-- so RestoreArchivedStream puts them back where they were), plus who moved
-- them. Like the log, changed only through pgstore.Admin.
CREATE TABLE {{schema}}.archived_events (
  global_position bigint      NOT NULL,
  transaction_id  xid8        NOT NULL,
  stream_id       text        NOT NULL,
  version         bigint      NOT NULL,
  category        text        NOT NULL,
  event_id        uuid        NOT NULL,
  event_type      text        NOT NULL,
  content_type    text        NOT NULL,
  data            bytea       NOT NULL,
  metadata        jsonb       NOT NULL,
  recorded_at     timestamptz NOT NULL,
  archived_at     timestamptz NOT NULL DEFAULT now(),
  archived_by     bigint      NOT NULL,      -- the admin_audit row of the action that moved it
  PRIMARY KEY (stream_id, version)
);
CREATE INDEX archived_events_category ON {{schema}}.archived_events (category, stream_id);
CREATE TRIGGER archived_events_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.archived_events
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();

-- Streams taken out of use. Their streams row stays, at version 0, so reads
-- (StreamVersion, ListStreams) do not show them and the id stays taken; the
-- version they had is kept here.
CREATE TABLE {{schema}}.retired_streams (
  stream_id  text        PRIMARY KEY,
  category   text        NOT NULL,
  state      text        NOT NULL CHECK (state IN ('archived', 'tombstoned')),
  version    bigint      NOT NULL,          -- the stream's version when it was retired
  created_at timestamptz NOT NULL,          -- when the stream was created
  retired_at timestamptz NOT NULL DEFAULT now(),
  retired_by bigint      NOT NULL           -- the admin_audit row of the action
);
CREATE TRIGGER retired_streams_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.retired_streams
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();

-- An append moves a stream's version up from its current one. A retired
-- stream sits at version 0, so the WHEN clause (evaluated without calling
-- the function) lets every other append through untouched. The function runs
-- as the schema owner: the application role needs no grant on
-- retired_streams to be refused with a clear error.
CREATE FUNCTION {{schema}}.refuse_retired_stream() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_state text;
BEGIN
  SELECT r.state INTO v_state FROM {{schema}}.retired_streams r WHERE r.stream_id = NEW.stream_id;
  IF v_state = 'archived' THEN
    RAISE EXCEPTION 'stele: stream % is archived; restore it (stele archive restore) before appending', quote_literal(NEW.stream_id)
      USING ERRCODE = 'SE701', DETAIL = NEW.stream_id;
  ELSIF v_state = 'tombstoned' THEN
    RAISE EXCEPTION 'stele: stream % is tombstoned; its id cannot be used again', quote_literal(NEW.stream_id)
      USING ERRCODE = 'SE702', DETAIL = NEW.stream_id;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER streams_refuse_retired BEFORE UPDATE ON {{schema}}.streams
  FOR EACH ROW WHEN (OLD.version = 0 AND NEW.version > 0) EXECUTE FUNCTION {{schema}}.refuse_retired_stream();

-- The hash chain (pgstore.Seal, pgstore.Verify). Each stream's events are
-- chained: hash(v) = SHA-256(hash(v-1) || event v), computed by Seal after
-- the fact, never on the append path. A seal also chains the audit trail's
-- rows, and records a digest over what it sealed and the previous seal's
-- digest: keep the latest digest outside the database to detect a rewrite of
-- the whole chain.
CREATE TABLE {{schema}}.chain_seals (
  id          bigint      PRIMARY KEY,      -- 1, 2, 3, ... with no gap
  at          timestamptz NOT NULL DEFAULT now(),
  events      bigint      NOT NULL,
  audit_rows  bigint      NOT NULL,
  prev_digest bytea       NOT NULL,
  digest      bytea       NOT NULL UNIQUE
);
CREATE TABLE {{schema}}.event_hashes (
  stream_id text   NOT NULL,
  version   bigint NOT NULL,
  hash      bytea  NOT NULL,
  seal_id   bigint NOT NULL,
  PRIMARY KEY (stream_id, version)
);
CREATE INDEX event_hashes_seal ON {{schema}}.event_hashes (seal_id, stream_id);
-- The audit trail in the order it was sealed (ids are not commit order).
CREATE TABLE {{schema}}.audit_hashes (
  seq      bigint PRIMARY KEY,              -- 1, 2, 3, ...
  audit_id bigint NOT NULL UNIQUE,
  hash     bytea  NOT NULL,
  seal_id  bigint NOT NULL
);
CREATE TRIGGER chain_seals_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.chain_seals
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();
CREATE TRIGGER event_hashes_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.event_hashes
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();
CREATE TRIGGER audit_hashes_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.audit_hashes
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();
-- Where each stream's chain ends, so Seal starts from there: derived from
-- event_hashes (Verify checks that it agrees).
CREATE TABLE {{schema}}.chain_heads (
  stream_id text   PRIMARY KEY,
  version   bigint NOT NULL,
  hash      bytea  NOT NULL
);
