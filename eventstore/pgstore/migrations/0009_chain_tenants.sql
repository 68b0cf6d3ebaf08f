-- The hash chain covers every tenant. Each stream's chain is keyed by its
-- tenant and id, as the stream is; tenant '' keeps the hashes it had. Seal and
-- Verify read all tenants at once, so with row-level security on they run as
-- a role that bypasses it (a superuser, or BYPASSRLS).

ALTER TABLE {{schema}}.event_hashes ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE {{schema}}.event_hashes DROP CONSTRAINT event_hashes_pkey, ADD PRIMARY KEY (tenant_id, stream_id, version);
DROP INDEX {{schema}}.event_hashes_seal;
CREATE INDEX event_hashes_seal ON {{schema}}.event_hashes (seal_id, tenant_id, stream_id);

ALTER TABLE {{schema}}.chain_heads ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE {{schema}}.chain_heads DROP CONSTRAINT chain_heads_pkey, ADD PRIMARY KEY (tenant_id, stream_id);
