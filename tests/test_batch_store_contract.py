"""The batch store's contract, run against both implementations (sqlite, PostgreSQL):
exactly one result per item, claim order, terminate/delete/purge, idempotency keys,
quotas, tenant-scoped listing, counts; and the PostgreSQL store's leases: expiry makes an
item claimable again, a stale claim's commit is refused (fencing), heartbeats keep a lease,
migrations are idempotent and safe when two servers start at once."""
from __future__ import annotations

import threading
import time

import pytest

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.base import BatchWork
from conserve_server.batch.store import (IdempotencyConflict, QuotaExceeded, SqliteBatchStore,
                                         open_store)
from tests.pg_cluster import pg_cluster, pg_url  # noqa: F401  (fixtures)


def _items(n, prefix="r"):
    return [(pb.GenerateRequest(prompt=f"p{i}", request_id=f"{prefix}{i}"), [10 + i]) for i in range(n)]


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request, tmp_path):
    """A factory: make_store(**kw) opens (another handle on) the same store."""
    opened = []
    if request.param == "sqlite":
        def make(**kw):
            s = SqliteBatchStore(str(tmp_path))
            opened.append(s)
            return s
    else:
        url = request.getfixturevalue("pg_url")

        def make(**kw):
            kw.setdefault("lease_s", 30.0)
            s = open_store(url, str(tmp_path), **kw)
            opened.append(s)
            return s
    make.backend = request.param
    yield make
    for s in opened:
        s.close()


def test_exactly_once_results_and_order(make_store):
    store = make_store()
    bid, created = store.create_batch("t", _items(4), deadline=None)
    assert created and store.get(bid).state == "queued"
    claimed = store.claim(3)
    assert [c.index for c in claimed] == [0, 1, 2] and claimed[0].prompt_ids == [10]
    assert claimed[1].request.request_id == "r1" and not claimed[1].request.HasField("input")
    assert store.get(bid).state == "running"
    res = pb.BatchResult(index=0, text="x", finish_reason=pb.FINISH_REASON_STOP)
    assert store.commit_result(bid, res, "stop", claimed[0].epoch)
    assert not store.commit_result(bid, res, "stop", claimed[0].epoch)  # a second result is refused
    assert store.counts() == {"batches_active": 1, "batch_items_pending": 1, "batch_items_running": 2}
    store.release(bid, 1, claimed[1].epoch)  # given back: claimable again
    again = store.claim(10)
    assert sorted(c.index for c in again) == [1, 3]
    ok = store.commit_many([(bid, pb.BatchResult(index=c.index), "length", c.epoch)
                            for c in [claimed[2]] + again])
    assert ok == [True, True, True]
    row = store.get(bid)
    assert (row.state, row.done, row.total) == ("completed", 4, 4) and row.finished_at
    assert [i for i, _ in store.results(bid, 0)] == [0, 1, 2, 3]
    assert pb.BatchResult.FromString(store.results(bid, 0)[0][1]).text == "x"
    assert store.item_totals() == {"succeeded": 4, "failed": 0, "cancelled": 0}
    assert store.claim(5) == []


def test_deadline_order_and_tenant_turns(make_store):
    store = make_store()
    late, _ = store.create_batch("a", _items(2), deadline=time.time() + 1000)
    soon, _ = store.create_batch("a", _items(2), deadline=time.time() + 100)
    other, _ = store.create_batch("b", _items(2))
    got = store.claim(4)
    assert [c.batch_id for c in got if c.batch_id != other] == [soon, soon]
    assert sum(c.batch_id == other for c in got) == 2  # tenant b got its turn


def test_at_risk_batches_are_claimed_first(make_store):
    store = make_store()
    soon, _ = store.create_batch("a", _items(2), deadline=time.time() + 100)
    risky, _ = store.create_batch("a", _items(3), deadline=time.time() + 1000)
    other, _ = store.create_batch("b", _items(2))
    got = store.claim(4, first=[risky, "batch_gone"])  # unknown ids are ignored
    assert [c.batch_id for c in got[:3]] == [risky] * 3 and [c.index for c in got[:3]] == [0, 1, 2]
    assert got[3].batch_id in (soon, other)  # then the fair order
    assert store.get(risky).state == "running"
    rest = store.claim(10, first=[risky])  # nothing left of it: the fair order alone
    assert sorted((c.batch_id, c.index) for c in rest + got[3:]) == sorted(
        [(soon, 0), (soon, 1), (other, 0), (other, 1)])


def test_only_first_claims_nothing_but_the_at_risk_batches(make_store):
    store = make_store()
    soon, _ = store.create_batch("a", _items(2), deadline=time.time() + 100)
    risky, _ = store.create_batch("b", _items(3), deadline=time.time() + 1000)
    got = store.claim(5, first=[risky], only_first=True)
    assert [(c.batch_id, c.index) for c in got] == [(risky, 0), (risky, 1), (risky, 2)]
    assert store.get(risky).state == "running" and store.get(soon).state == "queued"
    assert store.claim(5, first=[risky], only_first=True) == []
    assert {c.batch_id for c in store.claim(5)} == {soon}


def test_terminate_delete_purge(make_store):
    store = make_store()
    bid, _ = store.create_batch("t", _items(3))
    first = store.claim(1)  # item 0 is in the engine when the batch is cancelled
    assert store.terminate(bid, "cancelled", "batch cancelled")
    assert not store.terminate(bid, "cancelled")
    row = store.get(bid)
    assert (row.state, row.done, row.cancelled) == ("cancelled", 2, 2) and store.claim(5) == []
    assert store.commit_result(bid, pb.BatchResult(index=0, finish_reason=pb.FINISH_REASON_CANCELLED),
                               "cancelled", first[0].epoch)
    assert store.get(bid).cancelled == 3
    live, _ = store.create_batch("t", _items(1))
    assert not store.delete(live)  # still active
    assert store.delete(bid) and store.get(bid) is None and store.results(bid, 0) == []
    done, _ = store.create_batch("t", _items(1))
    store.commit_result(done, pb.BatchResult(index=0), "stop", store.claim(5)[-1].epoch)
    assert store.get(done).state == "completed"
    assert store.purge(time.time() + 1) == 1 and store.get(done) is None and store.get(live)


def test_idempotency_quota_and_tenant_listing(make_store):
    store = make_store()
    a, created = store.create_batch("t1", _items(2), idempotency_key="k")
    again, created2 = store.create_batch("t1", _items(2), idempotency_key="k")
    assert created and not created2 and again == a
    with pytest.raises(IdempotencyConflict):
        store.create_batch("t1", _items(3), idempotency_key="k")
    b, created3 = store.create_batch("t2", _items(2), idempotency_key="k")  # keys are per tenant
    assert created3 and b != a
    with pytest.raises(QuotaExceeded):
        store.create_batch("t1", _items(5), max_tenant_items=6)
    ids = [store.create_batch("t1", _items(1))[0] for _ in range(3)]
    page = store.list("t1", 2)
    assert [r.id for r in page] == ids[::-1][:2]
    assert [r.id for r in store.list("t1", 10, page[-1].id)] == [ids[0], a]
    assert store.list("t2", 10, ids[0]) == []  # another tenant's cursor gives nothing
    assert {r.id for r in store.list(None, 10)} == {a, b, *ids}
    assert store.counts("t2")["batch_items_pending"] == 2


def test_expired_batches(make_store):
    store = make_store()
    bid, _ = store.create_batch("t", _items(2), deadline=time.time() + 0.2)
    assert store.expired(time.time()) == []
    assert store.expired(time.time() + 1) == [bid]
    assert store.terminate(bid, "failed", "batch deadline exceeded")
    assert store.get(bid).failed == 2


def test_deadline_work_is_stored_and_active_lists_unfinished(make_store):
    store = make_store()
    a, _ = store.create_batch("t1", _items(2), deadline=time.time() + 60,
                              work=BatchWork(prompt_tokens=7, output_tokens=40,
                                             estimate_at=1234.5, longest_output_tokens=25))
    b, _ = store.create_batch("t2", _items(1))  # no work recorded: zeros, no estimate
    row = store.get(a)
    assert (row.work_prompt_tokens, row.work_output_tokens, row.estimate_at,
            row.work_longest_output) == (7, 40, 1234.5, 25)
    row = store.get(b)
    assert (row.work_prompt_tokens, row.work_output_tokens, row.estimate_at,
            row.work_longest_output) == (0, 0, None, 0)
    assert [r.id for r in store.active()] == [a, b]
    store.terminate(b, "cancelled", "batch cancelled")
    assert [r.id for r in store.active()] == [a]
    assert store.list("t1", 10)[0].work_output_tokens == 40
    k, _ = store.create_batch("t1", _items(1), idempotency_key="key-1")
    assert store.find_by_key("t1", "key-1").id == k
    assert store.find_by_key("t2", "key-1") is None and store.find_by_key("t1", "other") is None


def test_fleet_harvest_rate(make_store):
    """PostgreSQL: the replicas' published rates add up (stale and withdrawn ones left out);
    sqlite has no fleet: None (the process uses its own)."""
    a = make_store(replica_id="ra")
    if make_store.backend == "sqlite":
        a.publish_rate(5.0)
        assert a.fleet_rate(60.0) is None
        return
    b = make_store(replica_id="rb")
    a.publish_rate(None)
    b.publish_rate(None)
    assert a.fleet_rate(60.0) is None
    a.publish_rate(5.0)
    b.publish_rate(2.5)
    assert a.fleet_rate(60.0) == pytest.approx(7.5) and b.fleet_rate(60.0) == pytest.approx(7.5)
    a.publish_rate(4.0)  # replaced, not added
    assert b.fleet_rate(60.0) == pytest.approx(6.5)
    b.publish_rate(None)  # no history any more: withdrawn
    assert a.fleet_rate(60.0) == pytest.approx(4.0)
    time.sleep(0.3)
    assert a.fleet_rate(0.2) is None  # stale


def test_recovery_after_a_crash(make_store):
    """A claimed item whose process died runs again: sqlite at reopen, PostgreSQL once its
    lease expires (with a new epoch; the dead claim can no longer commit)."""
    if make_store.backend == "sqlite":
        store = make_store()
        bid, _ = store.create_batch("t", _items(2))
        store.claim(2)
        store.close()
        store = make_store()
        assert sorted(c.index for c in store.claim(5)) == [0, 1]
        return
    dead = make_store(lease_s=0.3, replica_id="dead")
    bid, _ = dead.create_batch("t", _items(2))
    old = dead.claim(2)
    live = make_store(lease_s=5, replica_id="live")
    assert live.claim(5) == []  # leases still held
    time.sleep(0.5)
    new = live.claim(5)
    assert sorted(c.index for c in new) == [0, 1]
    assert all(n.epoch == o.epoch + 1 for n, o in zip(sorted(new, key=lambda c: c.index), old))
    assert not dead.commit_result(bid, pb.BatchResult(index=0), "stop", old[0].epoch)  # fenced
    assert dead.renew([(bid, 0, old[0].epoch)]) == {(bid, 0)}
    assert live.commit_result(bid, pb.BatchResult(index=0, text="live"), "stop", new[0].epoch)
    assert store_text(live, bid, 0) == "live" and live.get(bid).done == 1


def store_text(store, bid, idx):
    return pb.BatchResult.FromString(dict(store.results(bid, idx, 1))[idx]).text


def test_pg_heartbeat_keeps_the_lease(pg_url, tmp_path):
    a = open_store(pg_url, str(tmp_path), lease_s=0.6, replica_id="a")
    b = open_store(pg_url, str(tmp_path), lease_s=0.6, replica_id="b")
    try:
        bid, _ = a.create_batch("t", _items(1))
        [item] = a.claim(1)
        for _ in range(4):
            time.sleep(0.3)
            assert a.renew([(bid, 0, item.epoch)]) == set()
        assert b.claim(1) == []  # renewed: nobody else may take it
        assert a.commit_result(bid, pb.BatchResult(index=0), "stop", item.epoch)
    finally:
        a.close()
        b.close()


def test_pg_replica_stalled_inside_a_transaction_loses_its_row_locks(pg_url, tmp_path):
    """A replica stopped (SIGSTOP) in the middle of a transaction holds row locks that
    SKIP LOCKED claims skip: the server ends its idle transaction after a lease, so the
    other replica takes the item once its lease has expired."""
    stalled = open_store(pg_url, str(tmp_path), lease_s=1.0, replica_id="stalled")
    other = open_store(pg_url, str(tmp_path), lease_s=1.0, replica_id="other")
    try:
        bid, _ = stalled.create_batch("t", _items(1))
        [item] = stalled.claim(1)
        got, t0 = [], time.monotonic()
        with pytest.raises(Exception):  # its session is ended under it
            with stalled._tx() as cur:
                cur.execute("SELECT idx FROM items WHERE batch_id=%s FOR UPDATE", (bid,))
                while not got and time.monotonic() - t0 < 15:  # "stopped" in the transaction
                    got = other.claim(1)
                    time.sleep(0.2)
                cur.execute("SELECT 1")
        assert [c.index for c in got] == [0] and got[0].epoch > item.epoch
        assert time.monotonic() - t0 < 10
    finally:
        stalled.close()
        other.close()


def test_pg_reap_finishes_a_dead_replicas_items_of_a_cancelled_batch(pg_url, tmp_path):
    dead = open_store(pg_url, str(tmp_path), lease_s=0.2, replica_id="dead")
    live = open_store(pg_url, str(tmp_path), lease_s=5, replica_id="live")
    try:
        bid, _ = dead.create_batch("t", _items(3))
        dead.claim(1)
        assert live.terminate(bid, "cancelled", "batch cancelled")
        assert live.get(bid).done == 2
        time.sleep(0.3)
        assert live.reap() == 1
        row = live.get(bid)
        assert (row.done, row.cancelled) == (3, 3)
    finally:
        dead.close()
        live.close()


def test_pg_migrations_race_and_are_idempotent(pg_url, tmp_path):
    opened, errors = [], []

    def open_one():
        try:
            opened.append(open_store(pg_url, str(tmp_path)))
        except Exception as e:  # pragma: no cover - the assertion reports it
            errors.append(e)
    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and len(opened) == 4
        import psycopg
        with psycopg.connect(pg_url) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
        from conserve_server.batch.pg_schema import MIGRATIONS
        assert versions == [v for v, _ in MIGRATIONS]
    finally:
        for s in opened:
            s.close()


def test_open_store_rejects_unknown_schemes(tmp_path):
    with pytest.raises(ValueError, match="--batch-store"):
        open_store("mysql://x/y", str(tmp_path))
    s = open_store(f"sqlite://{tmp_path}/db", str(tmp_path / "unused"))
    try:
        assert s.path == f"{tmp_path}/db/batches.sqlite3"
    finally:
        s.close()


def test_sqlite_store_opens_a_database_from_before_the_longest_item(tmp_path):
    """A batch stored before `work_longest_output` existed reads back with 0 (items
    taken alike); new batches record it."""
    import sqlite3
    s = SqliteBatchStore(str(tmp_path))
    old, _ = s.create_batch("t", _items(2), work=BatchWork(prompt_tokens=5, output_tokens=9))
    s.close()
    db = sqlite3.connect(str(tmp_path / "batches.sqlite3"))
    db.execute("ALTER TABLE batches DROP COLUMN work_longest_output")
    db.commit()
    db.close()
    s = SqliteBatchStore(str(tmp_path))
    try:
        assert (s.get(old).work_output_tokens, s.get(old).work_longest_output) == (9, 0)
        new, _ = s.create_batch("t", _items(1), work=BatchWork(longest_output_tokens=7))
        assert s.get(new).work_longest_output == 7
    finally:
        s.close()
