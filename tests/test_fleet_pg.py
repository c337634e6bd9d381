"""A fleet of real `serve --model mock` replicas on one PostgreSQL batch store: a batch
submitted to one replica is served by both and read from the other, exactly one result per
item; kill -9 of a replica (its items re-run once its leases expire); SIGSTOP past the lease
(fencing: the stale replica's results are refused, it logs the lost lease and goes on);
PostgreSQL restarted mid-batch (nothing lost, online served throughout, store health);
idempotency keys and tenant isolation across replicas."""
from __future__ import annotations

import collections
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conserve_jax.client import Client
from tests.conftest_server import echo_text
from tests.fleet_helpers import item_rows, spawn_replica, wait_for
from tests.pg_cluster import pg_cluster, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(240)

FAST = ("--mock-token-delay", "0.004", "--max-num-seqs", "8", "--batch-in-flight", "8")
SLOW = ("--mock-token-delay", "0.03", "--max-num-seqs", "4", "--batch-in-flight", "4")


def _requests(n, tokens=8, prefix="q"):
    return [{"prompt": f"{prefix}{i:03d}", "max_tokens": tokens} for i in range(n)]


def _text(stream):
    return "".join(chunk.text for chunk in stream)


def _check_exactly_once(url, bid, n, results, tokens=8, prefix="q"):
    assert [r.index for r in results] == list(range(n))
    assert all(r.text == echo_text(f"{prefix}{r.index:03d}", tokens) for r in results)
    rows = item_rows(url, bid)
    assert len(rows) == n and all(state == "done" for _, state, _, _ in rows)
    return rows


def test_two_replicas_share_one_batch(pg_url, tmp_path):
    a = spawn_replica(tmp_path, "a", pg_url, *FAST)
    b = spawn_replica(tmp_path, "b", pg_url, *FAST)
    try:
        with Client(a.target) as ca, Client(b.target) as cb:
            bid = ca.submit_batch(_requests(200))
            results = list(cb.batch_results(bid, timeout=90))
            info = cb.get_batch(bid)
            assert ca.get_batch(bid).state == "completed"
            assert [x.batch_id for x in cb.list_batches()] == [bid]
    finally:
        a.stop()
        b.stop()
    assert (info.state, info.done, info.failed) == ("completed", 200, 0)
    rows = _check_exactly_once(pg_url, bid, 200, results)
    by = collections.Counter(done_by for *_, done_by in rows)
    assert set(by) == {"a", "b"}, f"both replicas must do work: {by}"


def test_kill9_replica_mid_batch_other_finishes_after_lease(pg_url, tmp_path):
    lease = 2.0
    a = spawn_replica(tmp_path, "a", pg_url, *SLOW, "--lease-s", str(lease))
    b = None
    try:
        with Client(a.target) as ca:
            bid = ca.submit_batch(_requests(40, tokens=10))
            wait_for(lambda: ca.get_batch(bid).done >= 4, 30, "a to commit some items")
            b = spawn_replica(tmp_path, "b", pg_url, *SLOW, "--lease-s", str(lease))
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(timeout=10)
            killed_at = time.monotonic()
        with Client(b.target) as cb:
            results = list(cb.batch_results(bid, timeout=120))
            took = time.monotonic() - killed_at
    finally:
        a.stop()
        if b is not None:
            b.stop()
    rows = _check_exactly_once(pg_url, bid, 40, results, tokens=10)
    assert any(attempts >= 2 for _, _, attempts, _ in rows), "a's leased items ran again"
    assert took < 120
    assert "claimed again" in b.log()  # logged when the leases were taken over


def test_sigstop_past_lease_is_fenced(pg_url, tmp_path):
    lease = 1.5
    a = spawn_replica(tmp_path, "a", pg_url, *SLOW, "--lease-s", str(lease))
    b = None
    try:
        with Client(a.target) as ca:
            bid = ca.submit_batch(_requests(24, tokens=12))
            wait_for(lambda: ca.get_batch(bid).done >= 2, 30, "a to commit some items")
            a.proc.send_signal(signal.SIGSTOP)
            b = spawn_replica(tmp_path, "b", pg_url, *SLOW, "--lease-s", str(lease))
            with Client(b.target) as cb:
                results = list(cb.batch_results(bid, timeout=120))  # b finishes a's items too
            a.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: "lost the lease" in a.log() or "not committed" in a.log(), 30,
                     "the stale replica to notice its lost leases")
            assert a.proc.poll() is None  # it goes on serving
            assert _text(ca.generate("hello", max_tokens=3)) == "hel"
            bid2 = ca.submit_batch(_requests(4, prefix="z"))
            assert len(list(ca.batch_results(bid2, timeout=60))) == 4
    finally:
        a.stop()
        if b is not None:
            b.stop()
    rows = _check_exactly_once(pg_url, bid, 24, results, tokens=12)
    assert any(done_by == "b" for *_, done_by in rows)
    info_done = [r for r in rows if r[1] == "done"]
    assert len(info_done) == 24


def _store_health(target):
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service="conserve.v1.BatchStore"),
                          timeout=5).status


def test_postgres_restart_mid_batch_loses_nothing(pg_cluster, pg_url, tmp_path):
    a = spawn_replica(tmp_path, "a", pg_url, *SLOW, "--lease-s", "3")
    try:
        with Client(a.target) as ca:
            bid = ca.submit_batch(_requests(30, tokens=10))
            wait_for(lambda: ca.get_batch(bid).done >= 3, 30, "some results")
            assert _store_health(a.target) == health_pb2.HealthCheckResponse.SERVING
            pg_cluster.stop("fast")
            try:
                # online traffic goes on while the database is down
                for _ in range(5):
                    assert _text(ca.generate("online", max_tokens=4)) == "onli"
                wait_for(lambda: _store_health(a.target) == health_pb2.HealthCheckResponse.NOT_SERVING,
                         20, "the store health to turn NOT_SERVING")
                with pytest.raises(grpc.RpcError) as err:
                    ca.submit_batch(_requests(2, prefix="x"))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert ca.stats()["online_in_flight"] == 0  # stats answer during the outage
            finally:
                pg_cluster.start()
            t0 = time.monotonic()
            wait_for(lambda: _store_health(a.target) == health_pb2.HealthCheckResponse.SERVING,
                     30, "the store health to recover")
            recovered_s = time.monotonic() - t0
            assert recovered_s < 5.0  # probed once a second; a fresh pool once it answers
            results = list(ca.batch_results(bid, timeout=120))
    finally:
        a.stop()
    _check_exactly_once(pg_url, bid, 30, results, tokens=10)
    print(f"store health recovered {recovered_s:.1f} s after PostgreSQL came back")


def test_idempotency_and_tenants_across_replicas(pg_url, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-one\ntok-two\n")
    auth = ("--auth-token-file", str(tokens))
    a = spawn_replica(tmp_path, "a", pg_url, *FAST, *auth)
    b = spawn_replica(tmp_path, "b", pg_url, *FAST, *auth)
    try:
        with Client(a.target, token="tok-one") as a1, Client(b.target, token="tok-one") as b1, \
                Client(b.target, token="tok-two") as b2:
            bid = a1.submit_batch(_requests(5), idempotency_key="k1")
            assert b1.submit_batch(_requests(5), idempotency_key="k1") == bid
            with pytest.raises(grpc.RpcError) as err:
                b1.submit_batch(_requests(6), idempotency_key="k1")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            other = b2.submit_batch(_requests(5), idempotency_key="k1")  # keys are per tenant
            assert other != bid
            with pytest.raises(grpc.RpcError) as err:
                b2.get_batch(bid)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert [x.batch_id for x in b2.list_batches()] == [other]
            assert len(list(b1.batch_results(bid, timeout=60))) == 5
    finally:
        a.stop()
        b.stop()


def test_two_servers_start_at_once_on_an_empty_database(pg_url, tmp_path):
    import subprocess
    import sys
    from tests.conftest_server import REPO
    # two processes opening the store at the same moment (the migrations race)
    code = ("import sys; from conserve_server.batch.store import open_store; "
            "s = open_store(sys.argv[1], sys.argv[2]); s.close(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url, str(tmp_path / f"d{i}")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a = spawn_replica(tmp_path, "a", pg_url, *FAST)
    b = spawn_replica(tmp_path, "b", pg_url, *FAST)
    try:
        with Client(a.target) as ca:
            assert _text(ca.generate("hi", max_tokens=2)) == "hi"
    finally:
        a.stop()
        b.stop()


def test_store_outage_in_process_http_503_and_grpc_unavailable(pg_cluster, pg_url, tmp_path):
    """In-process: the HTTP front answers 503 for store-backed calls while the database is
    down, gRPC GetBatch UNAVAILABLE, online Generate still works; both recover after."""
    import json
    import urllib.error
    import urllib.request
    from tests.conftest_server import start_server

    s = start_server(tmp_path / "d", batch_store=pg_url, http_port=0)
    url = f"http://127.0.0.1:{s.app.http_port}/v1/batches"
    try:
        with Client(s.target) as c:
            bid = c.submit_batch(_requests(2))
            assert len(list(c.batch_results(bid, timeout=30))) == 2
            pg_cluster.stop("fast")
            try:
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(url, timeout=30)
                assert err.value.code == 503
                assert "batch database" in json.loads(err.value.read())["error"]["message"]
                with pytest.raises(grpc.RpcError) as gerr:
                    c.get_batch(bid, timeout=30)
                assert gerr.value.code() == grpc.StatusCode.UNAVAILABLE
                assert _text(c.generate("up", max_tokens=2)) == "up"
            finally:
                pg_cluster.start()
            wait_for(lambda: _ok(lambda: c.get_batch(bid)), 30, "the store to answer again")
            assert c.get_batch(bid).state == "completed"
    finally:
        s.stop()


def _ok(fn) -> bool:
    try:
        fn()
        return True
    except grpc.RpcError:
        return False
