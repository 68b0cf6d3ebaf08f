-- The event log. {{schema}} is replaced by the validated, quoted schema name.

CREATE TABLE {{schema}}.streams (
  stream_id  text        PRIMARY KEY,
  category   text        NOT NULL,
  version    bigint      NOT NULL,           -- last version written; 0 = no events
  last_xid   xid8        NOT NULL,           -- transaction of the last append: the per-stream order guard
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);                    -- room for HOT updates of version/last_xid
CREATE INDEX streams_category ON {{schema}}.streams (category, stream_id);

CREATE TABLE {{schema}}.events (
  global_position bigint      GENERATED ALWAYS AS IDENTITY,
  transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
  stream_id       text        NOT NULL,
  version         bigint      NOT NULL,
  category        text        NOT NULL,
  event_id        uuid        NOT NULL,
  event_type      text        NOT NULL,
  content_type    text        NOT NULL,
  data            bytea       NOT NULL,
  metadata        jsonb       NOT NULL,
  recorded_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (stream_id, version)
);
CREATE UNIQUE INDEX events_event_id ON {{schema}}.events (event_id);
-- The global feed is read in (transaction_id, global_position) order.
CREATE INDEX events_feed ON {{schema}}.events (transaction_id, global_position);
CREATE INDEX events_category_feed ON {{schema}}.events (category, transaction_id, global_position);
-- Replay from a timestamp; BRIN because recorded_at grows with the log and costs little to maintain.
CREATE INDEX events_recorded_at ON {{schema}}.events USING brin (recorded_at);

-- History is immutable: nobody, table owner included, may UPDATE, DELETE or TRUNCATE events.
CREATE FUNCTION {{schema}}.refuse_history_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'stele: events are immutable; % on %.% refused', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
    USING ERRCODE = 'SE001';
END $$;
CREATE TRIGGER events_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.events
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();

-- append_events appends a group of requests in one statement. Request i writes
-- p_counts[i] events (taken in order from the flat event arrays) to
-- p_streams[i] if p_expected[i] holds (-1 any, -2 no stream, -3 stream exists,
-- n exact). Requests come sorted by stream id, so groups lock streams in one
-- order. One row per request:
--   o_status 0 appended, 1 version conflict, 2 stream's last writer is a newer
--   transaction (retry in a new one), 3 some event id is already stored
--   (the caller checks for an idempotent retry).
CREATE FUNCTION {{schema}}.append_events(
  p_streams text[], p_expected bigint[], p_counts int[],
  p_ids uuid[], p_types text[], p_ctypes text[], p_data bytea[], p_meta jsonb[])
RETURNS TABLE (o_req int, o_status int, o_actual bigint, o_first_pos bigint, o_last_pos bigint, o_xid text)
LANGUAGE plpgsql AS $$
DECLARE
  v_off int := 0;
  v_n int;
  v_stream text;
  v_exp bigint;
  v_cur bigint;
  v_last xid8;
  v_xid xid8;
BEGIN
  FOR i IN 1 .. coalesce(cardinality(p_streams), 0) LOOP
    v_stream := p_streams[i];
    v_exp := p_expected[i];
    v_n := p_counts[i];
    o_req := i; o_actual := NULL; o_first_pos := NULL; o_last_pos := NULL; o_xid := NULL;

    SELECT s.version, s.last_xid INTO v_cur, v_last
      FROM {{schema}}.streams s WHERE s.stream_id = v_stream FOR UPDATE;
    IF NOT FOUND THEN
      IF v_exp = -3 OR v_exp > 0 THEN           -- needs a stream that does not exist
        o_status := 1; o_actual := 0; RETURN NEXT; v_off := v_off + v_n; CONTINUE;
      END IF;
      INSERT INTO {{schema}}.streams (stream_id, category, version, last_xid)
        VALUES (v_stream, split_part(v_stream, '-', 1), 0, '0')
        ON CONFLICT (stream_id) DO NOTHING;     -- the streams row only; never on events
      SELECT s.version, s.last_xid INTO v_cur, v_last
        FROM {{schema}}.streams s WHERE s.stream_id = v_stream FOR UPDATE;
    END IF;
    v_xid := pg_current_xact_id();
    o_actual := v_cur;

    IF EXISTS (SELECT 1 FROM {{schema}}.events e WHERE e.event_id = ANY (p_ids[v_off + 1 : v_off + v_n])) THEN
      o_status := 3; RETURN NEXT; v_off := v_off + v_n; CONTINUE;
    END IF;
    IF NOT (v_exp = -1 OR (v_exp = -2 AND v_cur = 0) OR (v_exp = -3 AND v_cur > 0) OR v_exp = v_cur) THEN
      o_status := 1; RETURN NEXT; v_off := v_off + v_n; CONTINUE;
    END IF;
    IF v_last > v_xid THEN
      o_status := 2; RETURN NEXT; v_off := v_off + v_n; CONTINUE;
    END IF;

    WITH ins AS (
      INSERT INTO {{schema}}.events (stream_id, version, category, event_id, event_type, content_type, data, metadata)
      SELECT v_stream, v_cur + t.ord, split_part(v_stream, '-', 1), t.id, t.typ, t.ct, t.dat, t.meta
        FROM unnest(p_ids[v_off + 1 : v_off + v_n], p_types[v_off + 1 : v_off + v_n],
                    p_ctypes[v_off + 1 : v_off + v_n], p_data[v_off + 1 : v_off + v_n],
                    p_meta[v_off + 1 : v_off + v_n]) WITH ORDINALITY AS t(id, typ, ct, dat, meta, ord)
       ORDER BY t.ord
      RETURNING global_position)
    SELECT min(global_position), max(global_position) INTO o_first_pos, o_last_pos FROM ins;

    UPDATE {{schema}}.streams SET version = v_cur + v_n, last_xid = v_xid, updated_at = now()
     WHERE stream_id = v_stream;
    o_status := 0; o_xid := v_xid::text;
    RETURN NEXT;
    v_off := v_off + v_n;
  END LOOP;
END $$;
