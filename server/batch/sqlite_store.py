"""`SqliteBatchStore`, the embedded batch store (contract: `base.StoreBase`). Durable batch jobs in sqlite3: one `batches` row per job and one `items` row per request.

Item states: pending (stored, not handed to the engine) -> running (claimed by the batch
runner) -> done (its one result committed). A result is committed in the same
transaction that bumps the batch's counters, with `WHERE state != 'done'`, so an item can
never get two results. `recover()` (run at open) turns running items back into pending:
after a crash they run again. The database uses WAL with synchronous=FULL, so a
committed result survives kill -9 and power loss.

Threading: every public method may be called from any thread (gRPC workers, the batch
runner); one connection is shared under `self._lock`. `wait_for_change` lets streaming
readers sleep until some result is committed or a batch changes state.

Failure rules: a transaction that cannot start (the database is locked by another
process past `busy_timeout_s`, or the disk is full) raises `sqlite3.Error` and leaves the
store usable: its lock is always released and a ROLLBACK after SQLite already rolled back
is not allowed to hide the real error. One process owns a data directory at a time: the
store holds an exclusive `flock` on `batches.lock`, so a second server on the same
directory fails at start (`DataDirInUse`) instead of re-running the first one's items.
Files are created owner-only (0700 directory, 0600 database).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from typing import Optional, Sequence

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.base import (BATCH_COLS as _BATCH_COLS, BatchRow, BatchWork,
                                        ClaimedItem, DataDirInUse, IdempotencyConflict, QuotaExceeded,
                                        StoreBase, end_result, insert_batch, payload_digest)
from conserve_server.batch.base import without_prompt as _without_prompt

log = logging.getLogger(__name__)

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
  idempotency_key TEXT,
  payload_sha TEXT,
  work_prompt_tokens INTEGER NOT NULL DEFAULT 0,
  work_output_tokens INTEGER NOT NULL DEFAULT 0,
  estimate_at REAL,
  work_longest_output INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_tenant ON batches(tenant, seq);
CREATE INDEX IF NOT EXISTS batches_state ON batches(state);
CREATE UNIQUE INDEX IF NOT EXISTS batches_idem ON batches(tenant, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS items (
  batch_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  request BLOB NOT NULL,      -- serialized conserve.v1.GenerateRequest, prompt removed
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


class SqliteBatchStore(StoreBase):
    def __init__(self, data_dir: str, busy_timeout_s: float = 5.0) -> None:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(data_dir, "batches.sqlite3")
        self._lock_fd = self._take_dir_lock(data_dir)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._rr_last: Optional[str] = None  # tenant served last by claim (round robin)
        self.closed = False
        try:
            if not os.path.exists(self.path):  # sqlite gives -wal/-shm the database's mode
                os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=busy_timeout_s)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(batches)")}
            if "payload_sha" not in cols:  # a database from before payload digests
                self._db.execute("ALTER TABLE batches ADD COLUMN payload_sha TEXT")
            if "estimate_at" not in cols:  # a database from before deadline estimates
                for col in ("work_prompt_tokens INTEGER NOT NULL DEFAULT 0",
                            "work_output_tokens INTEGER NOT NULL DEFAULT 0", "estimate_at REAL"):
                    self._db.execute("ALTER TABLE batches ADD COLUMN " + col)
            if "work_longest_output" not in cols:  # from before the longest item was kept
                self._db.execute("ALTER TABLE batches ADD COLUMN work_longest_output "
                                 "INTEGER NOT NULL DEFAULT 0")
            self.recover()
        except BaseException:
            os.close(self._lock_fd)
            raise

    @staticmethod
    def _take_dir_lock(data_dir: str) -> int:
        path = os.path.join(data_dir, "batches.lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise DataDirInUse(f"data dir {data_dir} is in use by another server (pid {owner}); "
                               "one server per data dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._changed.notify_all()
            try:
                self._db.close()
            finally:
                os.close(self._lock_fd)

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
                     deadline: Optional[float] = None, idempotency_key: str = "",
                     max_tenant_items: Optional[int] = None,
                     work: Optional[BatchWork] = None) -> tuple[str, bool]:
        """Store a batch; returns (batch_id, created). `work`: its deadline bookkeeping. With an idempotency key seen before
        for this tenant and the same payload, returns the earlier batch and created=False;
        with a different payload raises IdempotencyConflict. Raises QuotaExceeded when the
        tenant would hold more than `max_tenant_items` unfinished items. The prompt is
        stored once, as token ids; the stored request keeps its other fields."""
        digest = payload_digest(items, deadline)
        with self._tx():
            if idempotency_key:
                row = self._db.execute(
                    "SELECT id, payload_sha FROM batches WHERE tenant=? AND idempotency_key=?",
                    (tenant, idempotency_key)).fetchone()
                if row:
                    if row[1] is not None and row[1] != digest:
                        raise IdempotencyConflict(
                            f"idempotency_key {idempotency_key!r} was used for a different "
                            f"batch ({row[0]}); use a new key for new work")
                    return row[0], False
            if max_tenant_items is not None:
                have = self._db.execute(
                    "SELECT COALESCE(SUM(total - done), 0) FROM batches WHERE tenant=? "
                    "AND state IN ('queued','running')", (tenant,)).fetchone()[0]
                if have + len(items) > max_tenant_items:
                    raise QuotaExceeded(
                        f"this tenant has {have} unfinished batch items; the limit is "
                        f"{max_tenant_items}; wait for batches to finish or cancel some")
            bid = "batch_" + uuid.uuid4().hex
            self._db.execute(*insert_batch("?", bid, tenant, len(items), time.time(), deadline,
                                          idempotency_key, digest, work))
            self._db.executemany(
                "INSERT INTO items (batch_id, idx, request, prompt_ids, state) VALUES (?, ?, ?, ?, 'pending')",
                [(bid, i, _without_prompt(req), json.dumps(ids)) for i, (req, ids) in enumerate(items)])
        return bid, True

    def claim(self, n: int, first: Sequence[str] = (),
              only_first: bool = False) -> list[ClaimedItem]:
        """Mark up to n pending items of active batches running and return them. Items of
        the batches in `first` (at-risk jobs) go first, in that order; then tenants take
        turns (round robin, starting after the tenant served last); within a tenant,
        earliest deadline first, then oldest batch, then index. Cost grows with the number
        of active batches and n, not with the number of stored items. `only_first`: the
        batches in `first` only."""
        if n <= 0:
            return []
        rows = []
        with self._tx():
            active = self._db.execute(
                "SELECT id, state, tenant FROM batches WHERE state IN ('queued','running') "
                "ORDER BY deadline IS NULL, deadline, seq").fetchall()
            states = {bid: state for bid, state, _ in active}
            urgent = [(b, states[b]) for b in dict.fromkeys(first) if b in states]
            while len(rows) < n:
                got = self._claim_one(urgent)
                if got is None:
                    break
                rows.append(got)
            by_tenant: dict[str, list[tuple[str, str]]] = {}
            for bid, state, tenant in active:
                by_tenant.setdefault(tenant, []).append((bid, state))
            order = sorted(by_tenant) if not only_first else []
            if self._rr_last is not None:
                later = [t for t in order if t > self._rr_last]
                order = later + [t for t in order if t <= self._rr_last]
            now = time.time()
            started: set[str] = {r[0] for r in rows}
            while len(rows) < n and order:
                for tenant in list(order):
                    got = self._claim_one(by_tenant[tenant])
                    if got is None:
                        order.remove(tenant)
                        continue
                    rows.append(got)
                    self._rr_last = tenant
                    started.add(got[0])
                    if len(rows) >= n:
                        break
            for bid, state, _ in active:
                if bid in started and state == "queued":
                    self._db.execute("UPDATE batches SET state='running', started_at=? WHERE id=?",
                                     (now, bid))
        return [ClaimedItem(r[0], r[1], pb.GenerateRequest.FromString(r[2]), json.loads(r[3]), r[4])
                for r in rows]

    def _claim_one(self, batches: list[tuple[str, str]]):
        """Claim the next pending item of the first of `batches` that has one (dropping
        exhausted batches from the list); None if none has."""
        while batches:
            got = self._db.execute(
                "SELECT batch_id, idx, request, prompt_ids, attempts + 1 FROM items "
                "WHERE state='pending' AND batch_id=? ORDER BY idx LIMIT 1", (batches[0][0],)).fetchone()
            if got is None:
                batches.pop(0)
                continue
            self._db.execute("UPDATE items SET state='running', attempts=attempts+1 "
                             "WHERE batch_id=? AND idx=?", (got[0], got[1]))
            return got
        return None

    def release(self, batch_id: str, index: int, epoch: Optional[int] = None) -> None:
        """Give a claimed item back (e.g. the engine stopped it at shutdown): it runs again.
        One process claims from this database, so `epoch` needs no check."""
        with self._tx():
            self._db.execute("UPDATE items SET state='pending' WHERE batch_id=? AND idx=? "
                             "AND state='running'", (batch_id, index))

    def commit_result(self, batch_id: str, result: pb.BatchResult, outcome: str,
                      epoch: Optional[int] = None) -> bool:
        """Commit an item's one result. False if it already had one (or the batch was
        deleted). Raises sqlite3.Error if it cannot be written (the caller keeps the
        result and tries again). One process claims from this database (the data-dir
        lock), so no other lease can exist and `epoch` needs no check."""
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

    def delete(self, batch_id: str) -> bool:
        """Delete a finished batch and its results. False if it is still active."""
        with self._tx():
            cur = self._db.execute("DELETE FROM batches WHERE id=? AND state NOT IN ('queued','running')",
                                   (batch_id,))
            if cur.rowcount == 0:
                return False
            self._db.execute("DELETE FROM items WHERE batch_id=?", (batch_id,))
            return True

    def purge(self, finished_before: float) -> int:
        """Retention: delete batches that finished before `finished_before` (unix s), then
        checkpoint and truncate the WAL. Returns how many batches were deleted."""
        with self._tx():
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM batches WHERE state NOT IN ('queued','running') AND finished_at < ?",
                (finished_before,)).fetchall()]
            for bid in ids:
                self._db.execute("DELETE FROM items WHERE batch_id=?", (bid,))
                self._db.execute("DELETE FROM batches WHERE id=?", (bid,))
        self.checkpoint()
        return len(ids)

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (bounded disk use)."""
        with self._lock:
            if not self.closed:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    # ---- reads -------------------------------------------------------------------------
    def get(self, batch_id: str) -> Optional[BatchRow]:
        with self._lock:
            row = self._db.execute(f"SELECT {_BATCH_COLS} FROM batches WHERE id=?", (batch_id,)).fetchone()
        return BatchRow(*row) if row else None

    def list(self, tenant: Optional[str], limit: int, after_id: Optional[str] = None) -> list[BatchRow]:
        """Newest first, after the batch `after_id` (the last one of the previous page; it
        must be the tenant's own, else the list is empty). Tenant None lists every
        tenant's batches."""
        q, args = f"SELECT {_BATCH_COLS} FROM batches WHERE 1=1", []
        if tenant is not None:
            q, args = q + " AND tenant=?", args + [tenant]
        with self._lock:
            if after_id is not None:
                sub = "SELECT seq FROM batches WHERE id=?" + (" AND tenant=?" if tenant is not None else "")
                hit = self._db.execute(sub, [after_id] + ([tenant] if tenant is not None else [])).fetchone()
                if hit is None:
                    return []
                q, args = q + " AND seq<?", args + [hit[0]]
            rows = self._db.execute(q + " ORDER BY seq DESC LIMIT ?", args + [limit]).fetchall()
        return [BatchRow(*r) for r in rows]

    def results(self, batch_id: str, start: int, limit: int = 256) -> list[tuple[int, bytes]]:
        """Committed results with index >= start, in index order (there may be gaps)."""
        with self._lock:
            return self._db.execute(
                "SELECT idx, result FROM items WHERE batch_id=? AND idx>=? AND state='done' "
                "ORDER BY idx LIMIT ?", (batch_id, start, limit)).fetchall()

    def find_by_key(self, tenant: str, idempotency_key: str) -> Optional[BatchRow]:
        with self._lock:
            row = self._db.execute(f"SELECT {_BATCH_COLS} FROM batches WHERE tenant=? AND "
                                   "idempotency_key=?", (tenant, idempotency_key)).fetchone()
        return BatchRow(*row) if row else None

    def active(self) -> list[BatchRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_BATCH_COLS} FROM batches "
                                    "WHERE state IN ('queued','running') ORDER BY seq").fetchall()
        return [BatchRow(*r) for r in rows]

    def expired(self, now: float) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM batches WHERE state IN ('queued','running') AND deadline IS NOT NULL "
                "AND deadline < ?", (now,)).fetchall()]

    def counts(self, tenant: Optional[str] = None) -> dict[str, int]:
        """Active batches and unfinished items, of one tenant (or of all with None)."""
        where, args = ("", []) if tenant is None else (" AND b.tenant=?", [tenant])
        with self._lock:
            active = self._db.execute(
                "SELECT COUNT(*) FROM batches b WHERE state IN ('queued','running')" + where,
                args).fetchone()[0]
            by_state = dict(self._db.execute(
                "SELECT i.state, COUNT(*) FROM items i JOIN batches b ON b.id = i.batch_id "
                "WHERE i.state IN ('pending','running')" + where + " GROUP BY i.state", args).fetchall())
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
            if self._version == seen_version and not self.closed:
                self._changed.wait(timeout)
            return self._version

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    # ---- internals (caller holds the lock inside a transaction) -------------------------
    def _tx(self):
        return _Tx(self)

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
        for idx, req in rows:
            self._commit(batch_id, end_result(idx, req, outcome, error), outcome)


class _Tx:
    """`with store._tx():` one IMMEDIATE transaction under the store lock. The lock is
    released on every path; a failed BEGIN or COMMIT raises the real sqlite error."""

    def __init__(self, store: SqliteBatchStore) -> None:
        self.store = store

    def __enter__(self) -> None:
        s = self.store
        s._lock.acquire()
        try:
            if s.closed:
                raise sqlite3.ProgrammingError("the batch store is closed")
            s._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            s._lock.release()
            raise

    def __exit__(self, exc_type, exc, tb) -> bool:
        s = self.store
        try:
            if exc_type is None:
                try:
                    s._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
                s._version += 1
                s._changed.notify_all()
            else:
                self._rollback()
        finally:
            s._lock.release()
        return False

    def _rollback(self) -> None:
        db = self.store._db
        if db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed")
