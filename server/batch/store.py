"""The batch store: its contract and types (`base`), and `open_store(url)`, which opens
one of its two implementations:

- `sqlite:///DIR` (or no URL: `--data-dir`): `SqliteBatchStore`, the database file
  `DIR/batches.sqlite3`, owned by one server process (a lock on the directory).
- `postgresql://user@host:port/db`: `PgBatchStore`, one database shared by any number of
  replicas (leases with fencing epochs; `pg_store`). Needs the `postgres` extra (psycopg 3).

`BatchStore` stays the name of the sqlite store (constructed with a data directory).
"""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from conserve_server.batch.base import (ACTIVE, STORE_ERRORS, TERMINAL, BatchRow,  # noqa: F401
                                        ClaimedItem, DataDirInUse, IdempotencyConflict,
                                        QuotaExceeded, StoreBase, StoreUnavailable,
                                        is_full_error, is_locked_error, payload_digest,
                                        redact_url)
from conserve_server.batch.sqlite_store import SqliteBatchStore

BatchStore = SqliteBatchStore

__all__ = ["ACTIVE", "TERMINAL", "STORE_ERRORS", "BatchRow", "BatchStore", "ClaimedItem",
           "DataDirInUse", "IdempotencyConflict", "QuotaExceeded", "SqliteBatchStore",
           "StoreBase", "StoreUnavailable", "is_full_error", "is_locked_error", "open_store", "payload_digest", "redact_url"]


def open_store(url: Optional[str], data_dir: str, busy_timeout_s: float = 5.0,
               replica_id: Optional[str] = None, lease_s: float = 30.0) -> StoreBase:
    """Open the store `url` names (None or "": sqlite under `data_dir`). Raises ValueError
    for a URL of another scheme (naming --batch-store), DataDirInUse, or the driver's
    error when the database cannot be opened."""
    if not url:
        return SqliteBatchStore(data_dir, busy_timeout_s=busy_timeout_s)
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        path = url[len("sqlite://"):]
        if not path:
            raise ValueError("--batch-store sqlite:///DIR needs a directory")
        return SqliteBatchStore(path, busy_timeout_s=busy_timeout_s)
    if scheme in ("postgresql", "postgres"):
        try:
            from conserve_server.batch.pg_store import PgBatchStore
        except ImportError as e:
            raise ValueError("--batch-store postgresql://... needs psycopg 3: "
                             "pip install -e '.[postgres]'") from e
        return PgBatchStore(url, replica_id=replica_id, lease_s=lease_s)
    raise ValueError(f"--batch-store must be sqlite:///DIR or postgresql://..., got "
                     f"scheme {scheme!r}")
