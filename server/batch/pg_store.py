"""`PgBatchStore`: the batch store in PostgreSQL, shared by a fleet of replicas
(contract: `base.StoreBase`; schema and migrations: `pg_schema`).

Claims take items with `FOR UPDATE SKIP LOCKED` (replicas never wait for each other) and
give each one a lease: this replica's id, a new epoch (`lease_epoch + 1`) and an expiry
`lease_s` ahead on the database's clock. The batch runner renews its leases (`renew`) by
heartbeat. A pending item, or a running one whose lease expired (its owner died or
stalled), is claimable. `commit_result(..., epoch)` commits only while the item is still
running under that epoch: a replica that wakes after its lease was taken over cannot write
a second result. Items of ended batches whose owner died are finished by `reap`.

Lock order (no deadlocks between replicas): a claim locks only item rows, skipping locked
ones, and marks its batches running in a second transaction; a commit locks its item rows,
then its batch rows in id order; `terminate` locks the batch row, then its pending items.

Threading: every method may be called from any thread; each takes a connection from a
`psycopg_pool.ConnectionPool`. When the database cannot be reached (restart, lost
connection, pool exhausted past `connect_timeout_s`) a method raises `StoreUnavailable`
and `healthy` turns False until an operation succeeds again; reads are retried once on a
fresh connection first (a restart breaks every pooled connection at once). While unhealthy,
calls probe the database at most once a second and replace the pool as soon as it answers.
`wait_for_change` wakes on this process's writes; other replicas' writes are seen by
the caller's next read (callers poll with a timeout).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

import psycopg
import psycopg_pool

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.base import (BATCH_COLS, BatchRow, BatchWork, ClaimedItem,
                                        IdempotencyConflict, QuotaExceeded, StoreBase, StoreUnavailable, end_result,
                                        insert_batch, payload_digest, redact_url, without_prompt)
from conserve_server.batch.pg_schema import migrate

log = logging.getLogger(__name__)

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout,
         psycopg_pool.PoolClosed)


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class PgBatchStore(StoreBase):
    shared = True

    def __init__(self, url: str, replica_id: Optional[str] = None, lease_s: float = 30.0,
                 pool_size: int = 8, connect_timeout_s: float = 3.0) -> None:
        if not lease_s > 0:
            raise ValueError(f"--lease-s must be > 0, got {lease_s}")
        self.url = url
        self.path = redact_url(url)
        self.replica_id = replica_id or default_replica_id()
        self.lease_s = float(lease_s)
        self.closed = False
        self._healthy = True
        self._rr_last: Optional[str] = None
        self._cond = threading.Condition()
        self._version = 0
        self._pool_args = dict(min_size=1, max_size=pool_size, open=False,
                               timeout=connect_timeout_s,
                               kwargs={"connect_timeout": max(1, int(connect_timeout_s)),
                                       # a replica stalled inside a transaction (SIGSTOP,
                                       # a VM pause) would hold its row locks, which every
                                       # other replica's SKIP LOCKED claim skips forever:
                                       # the server ends such a session after a lease
                                       "options": "-c idle_in_transaction_session_timeout="
                                                  f"{max(1000, int(lease_s * 1000))}"},
                               name="batch-store",
                               check=psycopg_pool.ConnectionPool.check_connection)
        self._swap_lock = threading.Lock()
        self._next_probe = 0.0
        self._pool = psycopg_pool.ConnectionPool(url, **self._pool_args)
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
            with self._pool.connection() as conn:
                migrate(conn)
        except BaseException:
            self._pool.close()
            raise
        log.info("batch store: PostgreSQL %s (replica %s, lease %.1f s)", self.path,
                 self.replica_id, self.lease_s)

    # ---- plumbing ----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._healthy and not self.closed

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[psycopg.Cursor]:
        """One transaction on a pooled connection; connection failures -> StoreUnavailable."""
        if self.closed:
            raise StoreUnavailable("the batch store is closed")
        if not self._healthy:
            self._recover()
        try:
            with self._pool.connection() as conn:
                with conn.transaction():
                    with conn.cursor() as cur:
                        yield cur
        except _DOWN as e:
            if self._healthy:
                log.warning("batch store unreachable: %s", e)
            self._healthy = False
            raise StoreUnavailable(f"batch database unreachable: {e}") from e
        if not self._healthy:
            log.info("batch store reachable again")
        self._healthy = True
        if write:
            with self._cond:
                self._version += 1
                self._cond.notify_all()

    def _recover(self) -> None:
        """While unhealthy, at most once a second: try a direct connection, and once the
        database answers, replace the pool (its own reconnect backoff grows to seconds
        during an outage). The old pool closes in the background after its users return
        their connections."""
        with self._swap_lock:
            now = time.monotonic()
            if self._healthy or self.closed or now < self._next_probe:
                return
            self._next_probe = now + 1.0
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
            except psycopg.Error:
                return
            old, self._pool = self._pool, psycopg_pool.ConnectionPool(self.url, **self._pool_args)
            self._pool.open(wait=False)
        log.info("batch database answers again: new connection pool")
        threading.Thread(target=old.close, kwargs={"timeout": 5.0}, name="pool-close",
                         daemon=True).start()

    def transaction(self, write: bool = True):
        """`with store.transaction() as cur:` one transaction on the shared pool, for the
        other tables of this database (the OpenAI files: `openai_api/pg_files.py`); the
        same failure rules as the store's own calls."""
        return self._tx(write)

    def read(self, fn):
        """fn(cursor) in a read transaction, retried once on a fresh connection."""
        return self._read(fn)

    def _read(self, fn):
        """Run fn(cursor) in a read transaction, retried once on a fresh connection."""
        try:
            with self._tx(write=False) as cur:
                return fn(cur)
        except StoreUnavailable:
            if self.closed:
                raise
            with self._tx(write=False) as cur:
                return fn(cur)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._cond:
            self._cond.notify_all()
        self._pool.close()

    # ---- writes ------------------------------------------------------------------------
    def create_batch(self, tenant, items, deadline=None, idempotency_key="",
                     max_tenant_items=None, work=None):
        """As `SqliteBatchStore.create_batch`; one tenant's submissions serialize on an
        advisory lock, so its quota and idempotency keys hold across replicas."""
        digest = payload_digest(items, deadline)
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("tenant:" + tenant,))
            if idempotency_key:
                row = cur.execute("SELECT id, payload_sha FROM batches WHERE tenant=%s AND "
                                  "idempotency_key=%s", (tenant, idempotency_key)).fetchone()
                if row:
                    if row[1] is not None and row[1] != digest:
                        raise IdempotencyConflict(
                            f"idempotency_key {idempotency_key!r} was used for a different "
                            f"batch ({row[0]}); use a new key for new work")
                    return row[0], False
            if max_tenant_items is not None:
                have = cur.execute(
                    "SELECT COALESCE(SUM(total - done), 0) FROM batches WHERE tenant=%s "
                    "AND state IN ('queued','running')", (tenant,)).fetchone()[0]
                if have + len(items) > max_tenant_items:
                    raise QuotaExceeded(
                        f"this tenant has {have} unfinished batch items; the limit is "
                        f"{max_tenant_items}; wait for batches to finish or cancel some")
            bid = "batch_" + uuid.uuid4().hex
            cur.execute(*insert_batch("%s", bid, tenant, len(items), time.time(), deadline,
                                      idempotency_key, digest, work))
            with cur.copy("COPY items (batch_id, idx, request, prompt_ids, state) FROM STDIN") as cp:
                for i, (req, ids) in enumerate(items):
                    cp.write_row((bid, i, without_prompt(req), json.dumps(ids), "pending"))
        return bid, True

    def claim(self, n: int, first=(), only_first: bool = False) -> list[ClaimedItem]:
        """Lease up to n claimable items of active batches. Items of the batches in `first`
        (at-risk jobs) go first, in that order; then tenants take turns (round robin from
        the tenant this replica served last, each a fair share per round); within a
        tenant, earliest deadline first, then oldest batch, then index. `only_first`: the
        batches in `first` only."""
        if n <= 0:
            return []
        got: list[ClaimedItem] = []
        with self._tx() as cur:
            active = cur.execute(
                "SELECT id, tenant FROM batches WHERE state IN ('queued','running') "
                "ORDER BY deadline IS NULL, deadline, seq").fetchall()
            now = cur.execute(f"SELECT {_NOW}").fetchone()[0]
            known = {bid for bid, _ in active}
            urgent = [b for b in dict.fromkeys(first) if b in known]
            if urgent:
                got.extend(self._claim_from(cur, urgent, n, now))
            by_tenant: dict[str, list[str]] = {}
            for bid, tenant in active:
                by_tenant.setdefault(tenant, []).append(bid)
            order = sorted(by_tenant) if not only_first else []
            if self._rr_last is not None:
                order = [t for t in order if t > self._rr_last] + [t for t in order if t <= self._rr_last]
            while len(got) < n and order:
                share = max(1, math.ceil((n - len(got)) / len(order)))
                for tenant in list(order):
                    want = min(share, n - len(got))
                    took = self._claim_from(cur, by_tenant[tenant], want, now)
                    got.extend(took)
                    if took:
                        self._rr_last = tenant
                    if len(took) < want:
                        order.remove(tenant)
                    if len(got) >= n:
                        break
        started = sorted({c.batch_id for c in got})
        if started:  # its own transaction: a claim never waits for a batch row
            try:
                with self._tx() as cur:
                    cur.execute("UPDATE batches SET state='running', started_at=%s "
                                "WHERE id = ANY(%s) AND state='queued'", (time.time(), started))
            except StoreUnavailable:
                log.warning("could not mark batches %s running; they show queued", started)
        return got

    def _claim_from(self, cur, batches: list[str], want: int, now: float) -> list[ClaimedItem]:
        """Lease up to `want` items from the first of `batches` that have some (dropping
        exhausted batches from the list)."""
        out: list[ClaimedItem] = []
        while batches and len(out) < want:
            rows = cur.execute(
                "WITH c AS (SELECT batch_id, idx FROM items WHERE batch_id=%s AND state <> 'done' "
                "  AND (state='pending' OR lease_expiry < %s) ORDER BY idx LIMIT %s "
                "  FOR UPDATE SKIP LOCKED) "
                "UPDATE items i SET state='running', attempts=i.attempts+1, lease_owner=%s, "
                "  lease_epoch=i.lease_epoch+1, lease_expiry=%s "
                "FROM c WHERE i.batch_id=c.batch_id AND i.idx=c.idx "
                "RETURNING i.idx, i.request, i.prompt_ids, i.lease_epoch, i.attempts",
                (batches[0], now, want - len(out), self.replica_id, now + self.lease_s)).fetchall()
            again = sorted((idx, attempts) for idx, _, _, _, attempts in rows if attempts > 1)
            if again:  # a lease expired (its replica died or stalled) or the item was released
                log.warning("batch %s: %d items claimed again (indexes %s; attempts up to %d)",
                            batches[0], len(again), [i for i, _ in again[:10]],
                            max(a for _, a in again))
            for idx, req, ids, epoch, attempts in sorted(rows):
                out.append(ClaimedItem(batches[0], idx, pb.GenerateRequest.FromString(bytes(req)),
                                       json.loads(ids), epoch))
            if len(rows) < want:
                batches.pop(0)
        return out

    def renew(self, leases):
        if not leases:
            return set()
        keys = [(b, i) for b, i, _ in leases]
        with self._tx(write=False) as cur:
            now = cur.execute(f"SELECT {_NOW}").fetchone()[0]
            kept = cur.execute(
                "UPDATE items i SET lease_expiry=%s FROM unnest(%s::text[], %s::int[], %s::bigint[]) "
                "AS l(b, x, e) WHERE i.batch_id=l.b AND i.idx=l.x AND i.lease_epoch=l.e "
                "AND i.state='running' AND i.lease_owner=%s RETURNING i.batch_id, i.idx",
                (now + self.lease_s, [b for b, _, _ in leases], [i for _, i, _ in leases],
                 [e for _, _, e in leases], self.replica_id)).fetchall()
        return set(keys) - {(b, i) for b, i in kept}

    def release(self, batch_id, index, epoch=None):
        """Give a claimed item back (runs again, on any replica); a no-op if the lease
        `epoch` is no longer this claim's."""
        with self._tx() as cur:
            cur.execute("UPDATE items SET state='pending', lease_owner=NULL, lease_expiry=NULL "
                        "WHERE batch_id=%s AND idx=%s AND state='running'"
                        + ("" if epoch is None else " AND lease_epoch=%s"),
                        (batch_id, index) + (() if epoch is None else (epoch,)))

    def commit_result(self, batch_id, result, outcome, epoch=None):
        return self.commit_many([(batch_id, result, outcome, epoch)])[0]

    def commit_many(self, entries: list[tuple[str, pb.BatchResult, str, Optional[int]]]) -> list[bool]:
        """Commit several items' results in one transaction (fenced by each one's epoch when
        given); returns, per entry, whether it committed."""
        with self._tx() as cur:
            return self._commit(cur, entries)

    def _commit(self, cur, entries) -> list[bool]:
        now = time.time()
        ok: list[bool] = []
        per_batch: dict[str, list[int]] = {}
        for batch_id, result, outcome, epoch in entries:
            q = ("UPDATE items SET state='done', outcome=%s, result=%s, finished_at=%s, "
                 "done_by=COALESCE(lease_owner, %s), lease_owner=NULL, lease_expiry=NULL WHERE batch_id=%s AND idx=%s AND state <> 'done'")
            args = [outcome, result.SerializeToString(), now, self.replica_id, batch_id,
                    result.index]
            if epoch is not None:
                q += " AND state='running' AND lease_epoch=%s"
                args.append(epoch)
            hit = cur.execute(q, args).rowcount > 0
            ok.append(hit)
            if hit:
                c = per_batch.setdefault(batch_id, [0, 0, 0])
                c[0] += 1
                c[1] += int(outcome == "error")
                c[2] += int(outcome == "cancelled")
        for batch_id in sorted(per_batch):
            d, f, c = per_batch[batch_id]
            cur.execute(
                "UPDATE batches SET done=done+%s, failed=failed+%s, cancelled=cancelled+%s, "
                "state=CASE WHEN done+%s>=total AND state IN ('queued','running') THEN 'completed' "
                "  ELSE state END, "
                "finished_at=CASE WHEN done+%s>=total AND state IN ('queued','running') THEN %s "
                "  ELSE finished_at END WHERE id=%s", (d, f, c, d, d, now, batch_id))
        return ok

    def terminate(self, batch_id, state, error=""):
        with self._tx() as cur:
            n = cur.execute(
                "UPDATE batches SET state=%s, finished_at=%s, error=%s WHERE id=%s "
                "AND state IN ('queued','running')", (state, time.time(), error, batch_id)).rowcount
            if n == 0:
                return False
            outcome = "cancelled" if state == "cancelled" else "error"
            msg = error or ("batch cancelled" if state == "cancelled" else "batch failed")
            rows = cur.execute("SELECT idx, request FROM items WHERE batch_id=%s AND state='pending' "
                               "FOR UPDATE", (batch_id,)).fetchall()
            self._commit(cur, [(batch_id, end_result(i, bytes(r), outcome, msg), outcome, None)
                               for i, r in rows])
            return True

    def reap(self) -> int:
        """Finish items of ended batches that nobody will: pending ones, and running ones
        whose lease expired (their replica died)."""
        with self._tx() as cur:
            now = cur.execute(f"SELECT {_NOW}").fetchone()[0]
            rows = cur.execute(
                "SELECT i.batch_id, i.idx, i.request, b.state, b.error FROM items i "
                "JOIN batches b ON b.id=i.batch_id WHERE b.state IN ('cancelled','failed') "
                "AND i.state <> 'done' AND (i.state='pending' OR i.lease_expiry < %s) "
                "ORDER BY i.batch_id, i.idx LIMIT 1000 FOR UPDATE OF i SKIP LOCKED", (now,)).fetchall()
            entries = []
            for bid, idx, req, bstate, err in rows:
                outcome = "cancelled" if bstate == "cancelled" else "error"
                entries.append((bid, end_result(idx, bytes(req), outcome, err or "batch " + bstate),
                                outcome, None))
            return sum(self._commit(cur, entries))

    def delete(self, batch_id):
        with self._tx() as cur:
            n = cur.execute("DELETE FROM batches WHERE id=%s AND state NOT IN ('queued','running')",
                            (batch_id,)).rowcount
            if n == 0:
                return False
            cur.execute("DELETE FROM items WHERE batch_id=%s", (batch_id,))
            return True

    def purge(self, finished_before):
        with self._tx() as cur:
            ids = [r[0] for r in cur.execute(
                "SELECT id FROM batches WHERE state NOT IN ('queued','running') AND finished_at < %s",
                (finished_before,)).fetchall()]
            if ids:
                cur.execute("DELETE FROM items WHERE batch_id = ANY(%s)", (ids,))
                cur.execute("DELETE FROM batches WHERE id = ANY(%s)", (ids,))
        return len(ids)

    def checkpoint(self) -> None:
        """Nothing to do: PostgreSQL manages its own WAL."""

    # ---- reads -------------------------------------------------------------------------
    def get(self, batch_id):
        row = self._read(lambda c: c.execute(f"SELECT {BATCH_COLS} FROM batches WHERE id=%s",
                                             (batch_id,)).fetchone())
        return BatchRow(*row) if row else None

    def list(self, tenant, limit, after_id=None):
        def q(cur):
            sql, args = f"SELECT {BATCH_COLS} FROM batches WHERE TRUE", []
            if tenant is not None:
                sql, args = sql + " AND tenant=%s", args + [tenant]
            if after_id is not None:
                sub = "SELECT seq FROM batches WHERE id=%s" + (" AND tenant=%s" if tenant is not None else "")
                hit = cur.execute(sub, [after_id] + ([tenant] if tenant is not None else [])).fetchone()
                if hit is None:
                    return []
                sql, args = sql + " AND seq<%s", args + [hit[0]]
            return cur.execute(sql + " ORDER BY seq DESC LIMIT %s", args + [limit]).fetchall()
        return [BatchRow(*r) for r in self._read(q)]

    def results(self, batch_id, start, limit=256):
        rows = self._read(lambda c: c.execute(
            "SELECT idx, result FROM items WHERE batch_id=%s AND idx>=%s AND state='done' "
            "ORDER BY idx LIMIT %s", (batch_id, start, limit)).fetchall())
        return [(i, bytes(r)) for i, r in rows]

    def find_by_key(self, tenant, idempotency_key):
        row = self._read(lambda c: c.execute(
            f"SELECT {BATCH_COLS} FROM batches WHERE tenant=%s AND idempotency_key=%s",
            (tenant, idempotency_key)).fetchone())
        return BatchRow(*row) if row else None

    def publish_rate(self, rate):
        with self._tx() as cur:
            if rate is None:
                cur.execute("DELETE FROM harvest_rates WHERE replica=%s", (self.replica_id,))
            else:
                cur.execute(f"INSERT INTO harvest_rates (replica, rate, updated_at) "
                            f"VALUES (%s, %s, {_NOW}) ON CONFLICT (replica) DO UPDATE "
                            f"SET rate=EXCLUDED.rate, updated_at=EXCLUDED.updated_at",
                            (self.replica_id, float(rate)))

    def fleet_rate(self, max_age_s):
        total, n = self._read(lambda c: c.execute(
            f"SELECT COALESCE(SUM(rate), 0), COUNT(*) FROM harvest_rates "
            f"WHERE updated_at > {_NOW} - %s", (max_age_s,)).fetchone())
        return float(total) if n else None

    def active(self):
        return [BatchRow(*r) for r in self._read(lambda c: c.execute(
            f"SELECT {BATCH_COLS} FROM batches WHERE state IN ('queued','running') "
            "ORDER BY seq").fetchall())]

    def expired(self, now):
        return [r[0] for r in self._read(lambda c: c.execute(
            "SELECT id FROM batches WHERE state IN ('queued','running') AND deadline IS NOT NULL "
            "AND deadline < %s", (now,)).fetchall())]

    def counts(self, tenant=None):
        where, args = ("", []) if tenant is None else (" AND b.tenant=%s", [tenant])

        def q(cur):
            active = cur.execute("SELECT COUNT(*) FROM batches b WHERE state IN ('queued','running')"
                                 + where, args).fetchone()[0]
            by_state = dict(cur.execute(
                "SELECT i.state, COUNT(*) FROM items i JOIN batches b ON b.id = i.batch_id "
                "WHERE i.state IN ('pending','running') AND b.state IN ('queued','running')"
                + where + " GROUP BY i.state", args).fetchall())
            return active, by_state
        active, by_state = self._read(q)
        return {"batches_active": active, "batch_items_pending": by_state.get("pending", 0),
                "batch_items_running": by_state.get("running", 0)}

    def item_totals(self):
        done, failed, cancelled = self._read(lambda c: c.execute(
            "SELECT COALESCE(SUM(done),0), COALESCE(SUM(failed),0), COALESCE(SUM(cancelled),0) "
            "FROM batches").fetchone())
        return {"succeeded": int(done - failed - cancelled), "failed": int(failed),
                "cancelled": int(cancelled)}

    def wait_for_change(self, seen_version, timeout):
        with self._cond:
            if self._version == seen_version and not self.closed:
                self._cond.wait(timeout)
            return self._version

    @property
    def version(self) -> int:
        with self._cond:
            return self._version
