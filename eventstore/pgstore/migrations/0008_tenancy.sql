-- Tenants. Every stream, event, snapshot, projection checkpoint and
-- projection dead letter carries the tenant it belongs to; '' is the tenant
-- of a store bound to none. The column's default is the transaction's
-- stele.tenant setting, so append_events and every other insert fill it
-- without naming it. Stream ids, versions, snapshots and checkpoint names are
-- unique within a tenant, and the keys and feed indexes lead with the tenant,
-- so a tenant's reads seek straight to its own rows.
--
-- Row-level security stays off until pgstore.EnableTenancy turns it on.

ALTER TABLE {{schema}}.streams ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE {{schema}}.events ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE {{schema}}.snapshots ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE {{schema}}.projection_checkpoints ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE {{schema}}.projection_dead_letters ADD COLUMN tenant_id text NOT NULL DEFAULT '';
-- Set apart from ADD COLUMN, so existing rows take '' without a rewrite.
ALTER TABLE {{schema}}.streams ALTER COLUMN tenant_id SET DEFAULT coalesce(current_setting('stele.tenant', true), '');
ALTER TABLE {{schema}}.events ALTER COLUMN tenant_id SET DEFAULT coalesce(current_setting('stele.tenant', true), '');
ALTER TABLE {{schema}}.snapshots ALTER COLUMN tenant_id SET DEFAULT coalesce(current_setting('stele.tenant', true), '');
ALTER TABLE {{schema}}.projection_checkpoints ALTER COLUMN tenant_id SET DEFAULT coalesce(current_setting('stele.tenant', true), '');
ALTER TABLE {{schema}}.projection_dead_letters ALTER COLUMN tenant_id SET DEFAULT coalesce(current_setting('stele.tenant', true), '');

ALTER TABLE {{schema}}.streams DROP CONSTRAINT streams_pkey, ADD PRIMARY KEY (tenant_id, stream_id);
DROP INDEX {{schema}}.streams_category;
CREATE INDEX streams_category ON {{schema}}.streams (tenant_id, category, stream_id);

ALTER TABLE {{schema}}.events DROP CONSTRAINT events_pkey, ADD PRIMARY KEY (tenant_id, stream_id, version);
DROP INDEX {{schema}}.events_feed;
CREATE INDEX events_feed ON {{schema}}.events (tenant_id, transaction_id, global_position);
DROP INDEX {{schema}}.events_category_feed;
CREATE INDEX events_category_feed ON {{schema}}.events (tenant_id, category, transaction_id, global_position);

ALTER TABLE {{schema}}.snapshots DROP CONSTRAINT snapshots_pkey, ADD PRIMARY KEY (tenant_id, stream_id);
ALTER TABLE {{schema}}.projection_checkpoints DROP CONSTRAINT projection_checkpoints_pkey, ADD PRIMARY KEY (tenant_id, name);
ALTER TABLE {{schema}}.projection_dead_letters DROP CONSTRAINT projection_dead_letters_projection_event_id_key,
  ADD UNIQUE (tenant_id, projection, event_id);

-- append_events as in 0001, each streams lookup within the transaction's
-- tenant (which is also what row-level security, once on, allows).
CREATE OR REPLACE FUNCTION {{schema}}.append_events(
  p_streams text[], p_expected bigint[], p_counts int[], p_layers int[],
  p_ev_req int[], p_ev_ord int[],
  p_ids uuid[], p_types text[], p_ctypes text[], p_data bytea[], p_meta jsonb[],
  p_check_ids boolean)
RETURNS TABLE (o_req int, o_status int, o_actual bigint, o_first_pos bigint, o_last_pos bigint, o_xid text)
LANGUAGE plpgsql
-- PL/pgSQL caches one plan per statement for the session. Planned while the
-- tables were small, an index lookup became a sequential scan that stayed
-- cached as the log grew (appends slowed to ~170/s at 80k events). Every
-- query here has an index built for it, so forbid the sequential plan, and
-- use the cached generic plans rather than planning anew on each call.
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v_n int := coalesce(cardinality(p_streams), 0);
  v_xid xid8 := pg_current_xact_id();
  v_tenant text := coalesce(current_setting('stele.tenant', true), '');
  v_status int[] := array_fill(0, ARRAY[v_n]);
  v_ver bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
  v_idx int[];
  v_vals bigint[];
  v_i int;
  v_k int;
  v_cur bigint;
  v_last xid8;
  v_exp bigint;
  v_layers int := 0;
BEGIN
  IF p_check_ids THEN
    SELECT array_agg(DISTINCT u.req) INTO v_idx
      FROM unnest(p_ids, p_ev_req) AS u(id, req)
      JOIN {{schema}}.events e ON e.event_id = u.id;
    FOREACH v_i IN ARRAY coalesce(v_idx, '{}') LOOP
      v_status[v_i] := 3;
    END LOOP;
  END IF;

  FOREACH v_i IN ARRAY p_layers LOOP           -- a plain loop, not a query: this runs per append
    v_layers := greatest(v_layers, v_i);
  END LOOP;
  IF v_layers > 1 THEN
    -- Later layers would lock their streams after the first layer's: take
    -- every lock now, in stream order, so groups still lock in one order.
    PERFORM 1 FROM {{schema}}.streams s WHERE s.tenant_id = v_tenant AND s.stream_id = ANY (p_streams) ORDER BY s.stream_id FOR UPDATE;
  END IF;
  FOR v_layer IN 1 .. v_layers LOOP
  FOR v_pass IN 1 .. 2 LOOP
    -- Check and move every stream the group may append to, in one statement.
    -- A row another transaction is writing is waited for, then checked again
    -- as it now is.
    WITH upd AS (
      UPDATE {{schema}}.streams s
         SET version = s.version + r.n, last_xid = v_xid, updated_at = now()
        FROM unnest(p_streams, p_expected, p_counts, p_layers) WITH ORDINALITY AS r(sid, exp, n, layer, i)
       WHERE s.tenant_id = v_tenant AND s.stream_id = r.sid AND r.layer = v_layer AND v_status[r.i] = 0 AND v_ver[r.i] IS NULL
         AND (r.exp = -1 OR (r.exp = -2 AND s.version = 0) OR (r.exp = -3 AND s.version > 0) OR r.exp = s.version)
         AND s.last_xid <= v_xid
      RETURNING r.i::int AS i, s.version - r.n AS before)
    SELECT array_agg(i), array_agg(before) INTO v_idx, v_vals FROM upd;
    v_k := coalesce(cardinality(v_idx), 0);
    FOR v_j IN 1 .. v_k LOOP
      v_ver[v_idx[v_j]] := v_vals[v_j];
    END LOOP;
    EXIT WHEN v_pass = 2;
    v_k := 0;                                   -- requests of this layer still pending
    FOR v_j IN 1 .. v_n LOOP
      IF p_layers[v_j] = v_layer AND v_status[v_j] = 0 AND v_ver[v_j] IS NULL THEN
        v_k := v_k + 1;
      END IF;
    END LOOP;
    EXIT WHEN v_k = 0;                          -- the common case: every request went through

    -- New streams are created at their new version. A stream another
    -- transaction is creating is waited for; if it won, the second pass
    -- appends behind it.
    WITH ins AS (
      INSERT INTO {{schema}}.streams (stream_id, category, version, last_xid)
      SELECT r.sid, split_part(r.sid, '-', 1), r.n, v_xid
        FROM unnest(p_streams, p_expected, p_counts, p_layers) WITH ORDINALITY AS r(sid, exp, n, layer, i)
       WHERE r.layer = v_layer AND v_status[r.i] = 0 AND v_ver[r.i] IS NULL AND r.exp IN (-1, -2, 0)
         AND NOT EXISTS (SELECT 1 FROM {{schema}}.streams s WHERE s.tenant_id = v_tenant AND s.stream_id = r.sid)
       ORDER BY r.sid
      ON CONFLICT (tenant_id, stream_id) DO NOTHING                -- the streams row only; never on events
      RETURNING stream_id)
    SELECT array_agg(r.i::int) INTO v_idx
      FROM ins JOIN unnest(p_streams) WITH ORDINALITY AS r(sid, i) ON r.sid = ins.stream_id;
    FOREACH v_i IN ARRAY coalesce(v_idx, '{}') LOOP
      IF v_status[v_i] = 0 AND v_ver[v_i] IS NULL AND p_layers[v_i] = v_layer THEN
        v_ver[v_i] := 0;
        v_k := v_k - 1;
      END IF;
    END LOOP;
    -- Still pending: refused, or another transaction created the stream
    -- first; the second pass checks them against its row.
    EXIT WHEN v_k = 0;
  END LOOP;
  END LOOP;

  -- Say why the rest were refused. Rare, so one lookup each.
  FOR v_i IN 1 .. v_n LOOP
    CONTINUE WHEN v_status[v_i] <> 0 OR v_ver[v_i] IS NOT NULL;
    SELECT s.version, s.last_xid INTO v_cur, v_last FROM {{schema}}.streams s WHERE s.tenant_id = v_tenant AND s.stream_id = p_streams[v_i];
    v_exp := p_expected[v_i];
    v_ver[v_i] := coalesce(v_cur, 0);
    IF v_cur IS NULL OR NOT (v_exp = -1 OR (v_exp = -2 AND v_cur = 0) OR (v_exp = -3 AND v_cur > 0) OR v_exp = v_cur) THEN
      v_status[v_i] := 1;
    ELSE
      v_status[v_i] := 2;                       -- the guard, or the stream moved meanwhile
    END IF;
  END LOOP;

  -- A conflict may be the retry of an append that committed: look for its ids.
  IF NOT p_check_ids AND 1 = ANY (v_status) THEN
    SELECT array_agg(DISTINCT u.req) INTO v_idx
      FROM unnest(p_ids, p_ev_req) AS u(id, req)
      JOIN {{schema}}.events e ON e.event_id = u.id
     WHERE v_status[u.req] = 1;
    FOREACH v_i IN ARRAY coalesce(v_idx, '{}') LOOP
      v_status[v_i] := 3;
    END LOOP;
  END IF;

  RETURN QUERY
  WITH ins AS (
    INSERT INTO {{schema}}.events (stream_id, version, category, event_id, event_type, content_type, data, metadata)
    SELECT p_streams[u.req], v_ver[u.req] + u.ord, split_part(p_streams[u.req], '-', 1),
           u.id, u.typ, u.ct, u.dat, u.meta
      FROM unnest(p_ev_req, p_ev_ord, p_ids, p_types, p_ctypes, p_data, p_meta)
             WITH ORDINALITY AS u(req, ord, id, typ, ct, dat, meta, k)
     WHERE v_status[u.req] = 0
     ORDER BY u.k
    RETURNING stream_id, version, global_position),
  -- Several requests may share a stream: each gets the positions of its own
  -- versions.
  pos AS (SELECT r.i, min(ins.global_position) AS first_pos, max(ins.global_position) AS last_pos
            FROM unnest(p_streams) WITH ORDINALITY AS r(sid, i)
            JOIN ins ON ins.stream_id = r.sid
                    AND ins.version BETWEEN v_ver[r.i] + 1 AND v_ver[r.i] + p_counts[r.i]
           WHERE v_status[r.i] = 0
           GROUP BY r.i)
  SELECT r.i::int, v_status[r.i], v_ver[r.i], pos.first_pos, pos.last_pos,
         CASE WHEN v_status[r.i] = 0 THEN v_xid::text END
    FROM unnest(p_streams) WITH ORDINALITY AS r(sid, i)
    LEFT JOIN pos ON pos.i = r.i
   ORDER BY r.i;
END $$;

-- The feed's reads, as functions so that their plans are always the
-- generic one: an equality on the tenant (and category) and a row
-- comparison on (transaction_id, global_position), which the feed index
-- seeks to. A prepared statement is planned for its first arguments
-- instead, and on a table never analyzed (a bulk load read at once) the
-- default estimate for the tenant's equality, a few rows, made that plan a
-- bitmap scan and a sort of every row after the cursor: 250 ms a page
-- instead of 2. The cursor is never stated over the equality columns too:
-- a row comparison that starts at a column with an equality is only
-- filtered, from the start of the tenant's rows. Row-level security, when
-- on, adds its own equality on the tenant, which leaves this shape intact.
CREATE FUNCTION {{schema}}.read_feed(p_tenant text, p_xid xid8, p_pos bigint, p_limit int, p_since timestamptz)
RETURNS TABLE (global_position bigint, xid text, stream_id text, version bigint, event_id uuid, event_type text,
               content_type text, data bytea, metadata jsonb, recorded_at timestamptz)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
    SELECT e.global_position, e.transaction_id::text, e.stream_id, e.version, e.event_id, e.event_type,
           e.content_type, e.data, e.metadata, e.recorded_at
      FROM {{schema}}.events e
     WHERE e.tenant_id = p_tenant
       AND (e.transaction_id, e.global_position) > (p_xid, p_pos)
       AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
       AND (p_since IS NULL OR e.recorded_at >= p_since)
     ORDER BY e.tenant_id, e.transaction_id, e.global_position
     LIMIT p_limit;
END $$;

CREATE FUNCTION {{schema}}.read_category_feed(p_tenant text, p_category text, p_xid xid8, p_pos bigint, p_limit int, p_since timestamptz)
RETURNS TABLE (global_position bigint, xid text, stream_id text, version bigint, event_id uuid, event_type text,
               content_type text, data bytea, metadata jsonb, recorded_at timestamptz)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
    SELECT e.global_position, e.transaction_id::text, e.stream_id, e.version, e.event_id, e.event_type,
           e.content_type, e.data, e.metadata, e.recorded_at
      FROM {{schema}}.events e
     WHERE e.tenant_id = p_tenant AND e.category = p_category
       AND (e.transaction_id, e.global_position) > (p_xid, p_pos)
       AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
       AND (p_since IS NULL OR e.recorded_at >= p_since)
     ORDER BY e.tenant_id, e.category, e.transaction_id, e.global_position
     LIMIT p_limit;
END $$;

-- The last event the feed shows now.
CREATE FUNCTION {{schema}}.feed_head(p_tenant text)
RETURNS TABLE (xid text, global_position bigint)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
    SELECT e.transaction_id::text, e.global_position
      FROM {{schema}}.events e
     WHERE e.tenant_id = p_tenant AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
     ORDER BY e.tenant_id DESC, e.transaction_id DESC, e.global_position DESC
     LIMIT 1;
END $$;

-- Governance per tenant: archived events and retired streams carry their
-- tenant too, and the admin functions act on the tenant the transaction set
-- (current_tenant()). The hash chain (seal, verify) stays tenant ''s.
CREATE FUNCTION {{schema}}.current_tenant() RETURNS text LANGUAGE sql STABLE
  AS $$ SELECT coalesce(current_setting('stele.tenant', true), '') $$;

ALTER TABLE {{schema}}.archived_events ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE {{schema}}.retired_streams ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE {{schema}}.archived_events ALTER COLUMN tenant_id SET DEFAULT coalesce(current_setting('stele.tenant', true), '');
ALTER TABLE {{schema}}.retired_streams ALTER COLUMN tenant_id SET DEFAULT coalesce(current_setting('stele.tenant', true), '');
ALTER TABLE {{schema}}.archived_events DROP CONSTRAINT archived_events_pkey, ADD PRIMARY KEY (tenant_id, stream_id, version);
DROP INDEX {{schema}}.archived_events_category;
CREATE INDEX archived_events_category ON {{schema}}.archived_events (tenant_id, category, stream_id);
ALTER TABLE {{schema}}.retired_streams DROP CONSTRAINT retired_streams_pkey, ADD PRIMARY KEY (tenant_id, stream_id);

-- An append to a retired stream is refused within the stream's tenant.
CREATE OR REPLACE FUNCTION {{schema}}.refuse_retired_stream() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_state text;
BEGIN
  SELECT r.state INTO v_state FROM {{schema}}.retired_streams r
   WHERE r.tenant_id = NEW.tenant_id AND r.stream_id = NEW.stream_id;
  IF v_state = 'archived' THEN
    RAISE EXCEPTION 'stele: stream % is archived; restore it (stele archive restore) before appending', quote_literal(NEW.stream_id)
      USING ERRCODE = 'SE701', DETAIL = NEW.stream_id;
  ELSIF v_state = 'tombstoned' THEN
    RAISE EXCEPTION 'stele: stream % is tombstoned; its id cannot be used again', quote_literal(NEW.stream_id)
      USING ERRCODE = 'SE702', DETAIL = NEW.stream_id;
  END IF;
  RETURN NEW;
END $$;
