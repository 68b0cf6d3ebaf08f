-- Restore detection and repair (pgstore.RestoreCheck and RestoreRepair,
-- `stele restore-check` and `stele restore-repair`; docs/operations.md).
--
-- The global feed is ordered by transaction ids (xid8), and a transaction id
-- only means something in the cluster that assigned it. cluster_identity
-- names the cluster this schema's data was written in. A dump carries the row
-- along, so a copy restored elsewhere still names the cluster it came from.
-- Only an audited restore repair (pgstore.Admin) may change it.
CREATE TABLE {{schema}}.cluster_identity (
  singleton         boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
  system_identifier text        NOT NULL,  -- pg_control_system().system_identifier: set by initdb, unique per cluster
  database          text        NOT NULL,  -- current_database(), for information only
  xid_horizon       xid8        NOT NULL,  -- pg_current_xact_id() when recorded
  recorded_at       timestamptz NOT NULL DEFAULT now(),
  recorded_by       text        NOT NULL   -- 'migrate' or 'restore-repair'
);
INSERT INTO {{schema}}.cluster_identity (system_identifier, database, xid_horizon, recorded_by)
SELECT (pg_control_system()).system_identifier::text, current_database(), pg_current_xact_id(), 'migrate';
CREATE TRIGGER cluster_identity_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.cluster_identity
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();

-- The order-preserving map each restore repair applied: the rows of the feed,
-- read in their old (transaction_id, global_position) order, were cut into
-- runs of rising global_position, and run k got transaction id k. Each row
-- here is one run: where it began and ended in the old order. Positions
-- stored outside this schema are mapped with it (pgstore.RestoreMapPosition).
CREATE TABLE {{schema}}.restore_runs (
  audit_id       bigint NOT NULL,            -- the repair's admin_audit row
  new_tx         xid8   NOT NULL,
  first_old_tx   xid8   NOT NULL,
  first_position bigint NOT NULL,
  last_old_tx    xid8   NOT NULL,
  last_position  bigint NOT NULL,
  events         bigint NOT NULL,
  PRIMARY KEY (audit_id, new_tx)
);
CREATE INDEX restore_runs_old ON {{schema}}.restore_runs (audit_id, first_old_tx, first_position);
CREATE TRIGGER restore_runs_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON {{schema}}.restore_runs
  FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.refuse_history_change();
