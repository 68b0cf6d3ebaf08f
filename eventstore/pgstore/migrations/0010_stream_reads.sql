-- Stream lookups that stay fast as the log grows from empty.
--
-- Since 0008 every index of events and streams leads with tenant_id. A
-- statement planned once and cached (a prepared statement, or a statement
-- in a PL/pgSQL function) while the tables were small could settle on a
-- scan, or on any of them with only the tenant as its condition: on a small
-- table the estimates tie. Once cached, that plan read every event (or stream) of the tenant
-- on each call: a stream read, and the creation of a stream, grew linear in
-- the log, and W8 fell from about 600 to 250 sagas/s. (Stating the range as
-- row comparisons over the key does not help: the planner derives bounds on
-- the tenant from them, for every index.)
--
-- So stream reads and the version lookup are functions planned on each
-- call, against the table as it is now (tens of microseconds), and
-- append_events no longer looks for an existing stream before inserting
-- one: ON CONFLICT on the primary key already skips it.

CREATE FUNCTION {{schema}}.read_stream(p_tenant text, p_stream text, p_from bigint, p_limit bigint, p_backward boolean)
RETURNS TABLE (global_position bigint, xid text, stream_id text, version bigint, event_id uuid, event_type text,
               content_type text, data bytea, metadata jsonb, recorded_at timestamptz)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
AS $$
#variable_conflict use_column
BEGIN
  IF p_backward THEN
    RETURN QUERY
      SELECT e.global_position, e.transaction_id::text, e.stream_id, e.version, e.event_id, e.event_type,
             e.content_type, e.data, e.metadata, e.recorded_at
        FROM {{schema}}.events e
       WHERE e.tenant_id = p_tenant AND e.stream_id = p_stream AND e.version <= p_from
       ORDER BY e.version DESC
       LIMIT p_limit;
  ELSE
    RETURN QUERY
      SELECT e.global_position, e.transaction_id::text, e.stream_id, e.version, e.event_id, e.event_type,
             e.content_type, e.data, e.metadata, e.recorded_at
        FROM {{schema}}.events e
       WHERE e.tenant_id = p_tenant AND e.stream_id = p_stream AND e.version >= p_from
       ORDER BY e.version
       LIMIT p_limit;
  END IF;
END $$;

CREATE FUNCTION {{schema}}.stream_version(p_tenant text, p_stream text)
RETURNS TABLE (version bigint)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY SELECT s.version FROM {{schema}}.streams s WHERE s.tenant_id = p_tenant AND s.stream_id = p_stream;
END $$;

-- append_events as in 0008, without the NOT EXISTS before the streams insert.
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

    -- New streams are created at their new version. A stream that exists
    -- is left to ON CONFLICT, which probes the primary key; a stream
    -- another transaction is creating is waited for, and if it won, the
    -- second pass appends behind it.
    WITH ins AS (
      INSERT INTO {{schema}}.streams (stream_id, category, version, last_xid)
      SELECT r.sid, split_part(r.sid, '-', 1), r.n, v_xid
        FROM unnest(p_streams, p_expected, p_counts, p_layers) WITH ORDINALITY AS r(sid, exp, n, layer, i)
       WHERE r.layer = v_layer AND v_status[r.i] = 0 AND v_ver[r.i] IS NULL AND r.exp IN (-1, -2, 0)
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
