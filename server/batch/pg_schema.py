"""The PostgreSQL batch store's schema as versioned migrations, applied at start-up.

`migrate(conn)` runs in one transaction under a transaction-scoped advisory lock, so two
servers starting at once on an empty database serialize: the first applies what is
missing, the second finds every version recorded and does nothing. Idempotent; a version
once released is never edited (add a new one).

Version 4 adds the OpenAI Files API's files and batch documents (`openai_api/pg_files.py`),
so every replica serves them. Version 5 adds the batches' deadline bookkeeping (work in
tokens, the estimate at creation; issue 27); version 6 the replicas' harvest rates, summed
into the fleet's.

Items carry their lease: `lease_owner` (replica id), `lease_epoch` (bumped by every claim;
the fencing token a commit must still match) and `lease_expiry` (unix seconds of the
database's clock; the owner renews it by heartbeat, and once it passes the item is
claimable again).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

LOCK_KEY = 0x636F6E73  # pg_advisory_xact_lock key of the schema ("cons")

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE batches (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  state TEXT NOT NULL,
  total INTEGER NOT NULL,
  done INTEGER NOT NULL DEFAULT 0,
  failed INTEGER NOT NULL DEFAULT 0,
  cancelled INTEGER NOT NULL DEFAULT 0,
  created_at DOUBLE PRECISION NOT NULL,
  started_at DOUBLE PRECISION,
  finished_at DOUBLE PRECISION,
  deadline DOUBLE PRECISION,
  error TEXT NOT NULL DEFAULT '',
  idempotency_key TEXT,
  payload_sha TEXT
);
CREATE INDEX batches_tenant ON batches(tenant, seq);
CREATE INDEX batches_state ON batches(state);
CREATE UNIQUE INDEX batches_idem ON batches(tenant, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE TABLE items (
  batch_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  request BYTEA NOT NULL,
  prompt_ids TEXT NOT NULL,
  state TEXT NOT NULL,
  outcome TEXT,
  result BYTEA,
  attempts INTEGER NOT NULL DEFAULT 0,
  finished_at DOUBLE PRECISION,
  PRIMARY KEY (batch_id, idx)
);
"""),
    (2, """
ALTER TABLE items ADD COLUMN lease_owner TEXT;
ALTER TABLE items ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN lease_expiry DOUBLE PRECISION;
CREATE INDEX items_open ON items(batch_id, idx) WHERE state <> 'done';
"""),
    (3, """
ALTER TABLE items ADD COLUMN done_by TEXT;  -- replica whose result committed (audit)
"""),
    (4, """
CREATE TABLE files (
  id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  filename TEXT NOT NULL,
  purpose TEXT NOT NULL,
  bytes BIGINT NOT NULL,
  created_at BIGINT NOT NULL,
  data BYTEA NOT NULL
);
CREATE INDEX files_tenant ON files(tenant, created_at);
CREATE TABLE docs (
  key TEXT PRIMARY KEY,
  doc TEXT NOT NULL
);
"""),
    (5, """
ALTER TABLE batches ADD COLUMN work_prompt_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN work_output_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN estimate_at DOUBLE PRECISION;
"""),
    (6, """
CREATE TABLE harvest_rates (  -- each replica's offline harvest rate (fleet deadline estimates)
  replica TEXT PRIMARY KEY,
  rate DOUBLE PRECISION NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL
);
"""),
    (7, """
ALTER TABLE batches ADD COLUMN work_longest_output BIGINT NOT NULL DEFAULT 0;
"""),
]


def migrate(conn) -> list[int]:
    """Apply the missing migrations (psycopg connection, not in a transaction); returns
    the versions applied by this call."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        have = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in have:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied.append(version)
    if applied:
        log.info("batch store schema: applied migrations %s", applied)
    return applied
