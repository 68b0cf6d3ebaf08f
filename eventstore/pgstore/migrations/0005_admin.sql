-- The audit trail and the one path that may change history.
--
-- Every administrative action (migrate, archive, retention, forget, rebuild,
-- dead-letter retry/discard, restore repair, ...) leaves a row here, in the
-- same transaction as what it did. The trail is append-only like the log.
CREATE TABLE {{schema}}.admin_audit (
  id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at      timestamptz NOT NULL DEFAULT now(),
  actor   text        NOT NULL,            -- who: the operator's name as given, and the database role
  role    text        NOT NULL DEFAULT current_user,
  action  text        NOT NULL,            -- what: "archive", "retention", "forget", "restore-repair", ...
  target  text        NOT NULL DEFAULT '', -- on what: a stream, a category, a subject, a projection
  detail  jsonb       NOT NULL DEFAULT '{}'
);
CREATE TRIGGER admin_audit_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.admin_audit
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();

-- History stays immutable, except inside pgstore.Admin: a transaction that
-- has recorded its action in admin_audit and set stele.admin_action to that
-- row's id. An application role has no UPDATE or DELETE on events anyway
-- (AppRoleGrants), so only the schema owner can take this path.
CREATE OR REPLACE FUNCTION {{schema}}.refuse_history_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  audit_id text := current_setting('stele.admin_action', true);
  recorded boolean;
BEGIN
  IF TG_TABLE_NAME <> 'admin_audit' AND audit_id ~ '^[0-9]{1,18}$' THEN
    -- The action must be recorded, by this very transaction.
    EXECUTE format('SELECT true FROM %I.admin_audit WHERE id = $1 AND xmin = pg_current_xact_id()::xid', TG_TABLE_SCHEMA)
      INTO recorded USING audit_id::bigint;
    IF recorded THEN
      IF TG_LEVEL = 'ROW' THEN
        RETURN COALESCE(NEW, OLD);
      END IF;
      RETURN NULL;
    END IF;
  END IF;
  RAISE EXCEPTION 'stele: events are immutable; % on %.% refused', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
    USING ERRCODE = 'SE001';
END $$;
