"""Durable batch jobs in sqlite3: one `batches` row per job and one `items` row per request.

Item states: pending (stored, not handed to the engine) -> running (claimed by the batch
runner) -> done (its one result committed). A result is committed in the same
transaction that bumps the batch's counters, with `WHERE state != 'done'`, so an item can
never get two results. `recover()` (run at open) turns running items back into pending:
after a crash they run again. The database uses WAL with synchronous=FULL, so a
committed result survives kill -9 and power loss.

Threading: every public method may be called from any thread (gRPC workers, the batch
runner); one connection is shared under `self._lock`. `wait_for_change` lets streaming
readers sleep until some result is committed or a batch changes state.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
TERMINAL = ("completed", "cancelled", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  state TEXT NOT NULL,
  total INTEGER NOT NULL,
  done INTEGER NOT NULL DEFAULT 0,
  failed INTEGER NOT NULL DEFAULT 0,
  cancelled INTEGER NOT NULL DEFAULT 0,
  created_at REAL NOT NULL,
  started_at REAL,
  finished_at REAL,
  deadline REAL,
  error TEXT NOT NULL DEFAULT '',
  idempotency_key TEXT
);
CREATE INDEX IF NOT EXISTS batches_tenant ON batches(tenant, seq);
CREATE INDEX IF NOT EXISTS batches_state ON batches(state);
CREATE UNIQUE INDEX IF NOT EXISTS batches_idem ON batches(tenant, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS items (
  batch_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  request BLOB NOT NULL,      -- serialized conserve.v1.GenerateRequest as submitted
  prompt_ids TEXT NOT NULL,   -- JSON token ids, tokenized once at submission
  state TEXT NOT NULL,        -- pending | running | done
  outcome TEXT,               -- stop | length | cancelled | error, once done
  result BLOB,                -- serialized conserve.v1.BatchResult, once done
  attempts INTEGER NOT NULL DEFAULT 0,
  finished_at REAL,
  PRIMARY KEY (batch_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_state ON items(state, batch_id);
"""


@dataclass
class BatchRow:
    id: str
    tenant: str
    state: str
    total: int
    done: int
    failed: int
    cancelled: int
    created_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    deadline: Optional[float]
    error: str
    seq: int


@dataclass
class ClaimedItem:
    batch_id: str
    index: int
    request: pb.GenerateRequest
    prompt_ids: list[int]


_BATCH_COLS = ("id, tenant, state, total, done, failed, cancelled, created_at, started_at, "
               "finished_at, deadline, error, seq")


class BatchStore:
    def __init__(self, data_dir: str) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "batches.sqlite3")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self.closed = False
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.recover()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._db.close()

    # ---- writes ------------------------------------------------------------------------
    def recover(self) -> int:
        """Make claimed-but-unfinished items pending again; finish leftovers of ended batches."""
        with self._tx():
            n = self._db.execute("UPDATE items SET state='pending' WHERE state='running'").rowcount
            for (bid, state) in self._db.execute(
                    "SELECT id, state FROM batches WHERE state IN ('cancelled','failed')").fetchall():
                if state == "cancelled":
                    self._end_pending(bid, "cancelled", "batch cancelled")
                else:
                    self._end_pending(bid, "error", "batch deadline exceeded")
        if n:
            log.info("recovered %d unfinished batch items; they will run again", n)
        return n

    def create_batch(self, tenant: str, items: list[tuple[pb.GenerateRequest, list[int]]],
                     deadline: Optional[float] = None,
                     idempotency_key: str = "") -> tuple[str, bool]:
        """Store a batch; returns (batch_id, created). With an idempotency key seen before
        for this tenant, returns the earlier batch and created=False."""
        with self._tx():
            if idempotency_key:
                row = self._db.execute("SELECT id FROM batches WHERE tenant=? AND idempotency_key=?",
                                       (tenant, idempotency_key)).fetchone()
                if row:
                    return row[0], False
            bid = "batch_" + uuid.uuid4().hex
            self._db.execute(
                "INSERT INTO batches (id, tenant, state, total, created_at, deadline, idempotency_key)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (bid, tenant, len(items), time.time(), deadline, idempotency_key or None))
            self._db.executemany(
                "INSERT INTO items (batch_id, idx, request, prompt_ids, state) VALUES (?, ?, ?, ?, 'pending')",
                [(bid, i, req.SerializeToString(), json.dumps(ids)) for i, (req, ids) in enumerate(items)])
        return bid, True

    def claim(self, n: int) -> list[ClaimedItem]:
        """Mark up to n pending items of active batches running (earliest deadline first,
        then oldest batch, then index) and return them. Cost grows with the number of
        active batches and n, not with the number of stored items."""
        if n <= 0:
            return []
        rows = []
        with self._tx():
            active = self._db.execute(
                "SELECT id, state FROM batches WHERE state IN ('queued','running') "
                "ORDER BY deadline IS NULL, deadline, seq").fetchall()
            now = time.time()
            for bid, state in active:
                got = self._db.execute(
                    "SELECT batch_id, idx, request, prompt_ids FROM items "
                    "WHERE state='pending' AND batch_id=? ORDER BY idx LIMIT ?",
                    (bid, n - len(rows))).fetchall()
                if got and state == "queued":
                    self._db.execute("UPDATE batches SET state='running', started_at=? WHERE id=?",
                                     (now, bid))
                rows += got
                if len(rows) >= n:
                    break
            self._db.executemany(
                "UPDATE items SET state='running', attempts=attempts+1 WHERE batch_id=? AND idx=?",
                [(r[0], r[1]) for r in rows])
        return [ClaimedItem(r[0], r[1], pb.GenerateRequest.FromString(r[2]), json.loads(r[3]))
                for r in rows]

    def release(self, batch_id: str, index: int) -> None:
        """Give a claimed item back (e.g. the engine stopped it at shutdown): it runs again."""
        with self._tx():
            self._db.execute("UPDATE items SET state='pending' WHERE batch_id=? AND idx=? "
                             "AND state='running'", (batch_id, index))

    def commit_result(self, batch_id: str, result: pb.BatchResult, outcome: str) -> bool:
        """Commit an item's one result. False if it already had one."""
        with self._tx():
            return self._commit(batch_id, result, outcome)

    def terminate(self, batch_id: str, state: str, error: str = "") -> bool:
        """End an active batch as 'cancelled' or 'failed': pending items get a cancelled
        (or error) result now; running ones are the runner's to stop and commit."""
        with self._tx():
            cur = self._db.execute(
                "UPDATE batches SET state=?, finished_at=?, error=? WHERE id=? AND state IN ('queued','running')",
                (state, time.time(), error, batch_id))
            if cur.rowcount == 0:
                return False
            if state == "cancelled":
                self._end_pending(batch_id, "cancelled", error or "batch cancelled")
            else:
                self._end_pending(batch_id, "error", error or "batch failed")
            return True

    # ---- reads -------------------------------------------------------------------------
    def get(self, batch_id: str) -> Optional[BatchRow]:
        with self._lock:
            row = self._db.execute(f"SELECT {_BATCH_COLS} FROM batches WHERE id=?", (batch_id,)).fetchone()
        return BatchRow(*row) if row else None

    def list(self, tenant: Optional[str], limit: int, before_seq: Optional[int] = None) -> list[BatchRow]:
        """Newest first; tenant None lists every tenant's batches."""
        q, args = f"SELECT {_BATCH_COLS} FROM batches WHERE 1=1", []
        if tenant is not None:
            q, args = q + " AND tenant=?", args + [tenant]
        if before_seq is not None:
            q, args = q + " AND seq<?", args + [before_seq]
        with self._lock:
            rows = self._db.execute(q + " ORDER BY seq DESC LIMIT ?", args + [limit]).fetchall()
        return [BatchRow(*r) for r in rows]

    def results(self, batch_id: str, start: int, limit: int = 256) -> list[tuple[int, bytes]]:
        """Committed results with index >= start, in index order (there may be gaps)."""
        with self._lock:
            return self._db.execute(
                "SELECT idx, result FROM items WHERE batch_id=? AND idx>=? AND state='done' "
                "ORDER BY idx LIMIT ?", (batch_id, start, limit)).fetchall()

    def expired(self, now: float) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM batches WHERE state IN ('queued','running') AND deadline IS NOT NULL "
                "AND deadline < ?", (now,)).fetchall()]

    def counts(self) -> dict[str, int]:
        with self._lock:
            active = self._db.execute(
                "SELECT COUNT(*) FROM batches WHERE state IN ('queued','running')").fetchone()[0]
            by_state = dict(self._db.execute(
                "SELECT state, COUNT(*) FROM items WHERE state IN ('pending','running') "
                "GROUP BY state").fetchall())
        return {"batches_active": active, "batch_items_pending": by_state.get("pending", 0),
                "batch_items_running": by_state.get("running", 0)}

    def item_totals(self) -> dict[str, int]:
        """Finished items over every stored batch: succeeded, failed, cancelled (from the
        batches' counters: one pass over the batches table, not the items)."""
        with self._lock:
            done, failed, cancelled = self._db.execute(
                "SELECT COALESCE(SUM(done),0), COALESCE(SUM(failed),0), COALESCE(SUM(cancelled),0) "
                "FROM batches").fetchone()
        return {"succeeded": done - failed - cancelled, "failed": failed, "cancelled": cancelled}

    def wait_for_change(self, seen_version: int, timeout: float) -> int:
        """Block until the store changes after `seen_version` (or timeout); returns the
        current version. Pass 0... or a version from an earlier call."""
        with self._changed:
            if self._version == seen_version:
                self._changed.wait(timeout)
            return self._version

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    # ---- internals (caller holds the lock inside a transaction) -------------------------
    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                try:
                    store._db.execute("ROLLBACK" if exc_type else "COMMIT")
                    if not exc_type:
                        store._version += 1
                        store._changed.notify_all()
                finally:
                    store._lock.release()
                return False
        return _Tx()

    def _commit(self, batch_id: str, result: pb.BatchResult, outcome: str) -> bool:
        now = time.time()
        cur = self._db.execute(
            "UPDATE items SET state='done', outcome=?, result=?, finished_at=? "
            "WHERE batch_id=? AND idx=? AND state!='done'",
            (outcome, result.SerializeToString(), now, batch_id, result.index))
        if cur.rowcount == 0:
            return False
        self._db.execute(
            "UPDATE batches SET done=done+1, failed=failed+?, cancelled=cancelled+? WHERE id=?",
            (int(outcome == "error"), int(outcome == "cancelled"), batch_id))
        self._db.execute(
            "UPDATE batches SET state='completed', finished_at=? "
            "WHERE id=? AND done=total AND state IN ('queued','running')", (now, batch_id))
        return True

    def _end_pending(self, batch_id: str, outcome: str, error: str) -> None:
        rows = self._db.execute("SELECT idx, request FROM items WHERE batch_id=? AND state='pending'",
                                (batch_id,)).fetchall()
        reason = pb.FINISH_REASON_CANCELLED if outcome == "cancelled" else pb.FINISH_REASON_ERROR
        for idx, req in rows:
            rid = pb.GenerateRequest.FromString(req).request_id
            self._commit(batch_id, pb.BatchResult(index=idx, request_id=rid, finish_reason=reason,
                                                  error=error), outcome)
