"""Issue 9, faults 1-5, injected deterministically: a database locked by another process,
engine step-loop death (mock engine, in-process and through the CLI), a result commit that
fails (disk full via a tiny max_page_count), unauthenticated idle streams trying to take
every worker, and a second server on the same data dir."""
from __future__ import annotations

import signal
import sqlite3
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conserve_jax.client import Client
from conserve_jax.engine.mock_engine import MockEngine
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.store import BatchStore, DataDirInUse
from conserve_server.main import EXIT_ENGINE_FAILED
from conserve_server.config import ServiceOptions
from tests.conftest_server import echo_text, spawn_server, start_server, wait_until


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def _lock_db(data_dir) -> sqlite3.Connection:
    """Another process's writer (an sqlite3 shell, a backup) holding the write lock."""
    other = sqlite3.connect(str(data_dir / "batches.sqlite3"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


# ---- 1. sqlite lock -------------------------------------------------------------------
def test_store_survives_a_locked_database(tmp_path):
    store = BatchStore(str(tmp_path), busy_timeout_s=0.1)
    other = _lock_db(tmp_path)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.create_batch("t", [(store_req(), [5])])
    assert store.counts()["batches_active"] == 0  # the store lock was released
    other.rollback()
    other.close()
    bid, created = store.create_batch("t", [(store_req(), [5])])
    assert created and store.get(bid).state == "queued"
    store.close()


def store_req():
    return pb.GenerateRequest(prompt="a", request_id="r")


def test_locked_database_gives_unavailable_then_recovers(tmp_path):
    s = start_server(tmp_path, busy_timeout_s=0.1)
    try:
        with Client(s.target) as c:
            bid = c.submit_batch([{"prompt": "ab", "max_tokens": 3}])
            assert [r.text for r in c.batch_results(bid)] == ["aba"]
            other = _lock_db(tmp_path)
            code, msg = _code(lambda: c.submit_batch([{"prompt": "x"}], retries=0))
            assert code == grpc.StatusCode.UNAVAILABLE and "locked" in msg
            assert c.get_batch(bid).state == "completed"  # reads still work (WAL)
            assert list(c.generate("on", max_tokens=2))[-1].finished  # online unaffected
            other.rollback()
            other.close()
            bid2 = c.submit_batch([{"prompt": "cd", "max_tokens": 3}])
            assert [r.text for r in c.batch_results(bid2, timeout=10)] == ["cdc"]
    finally:
        s.stop()  # returns: nothing is stuck holding the store lock


# ---- 2. engine step-loop death ----------------------------------------------------------
def test_dead_engine_loop_fails_streams_and_turns_unhealthy(tmp_path):
    engine = MockEngine(token_delay_s=0.01, fail_after_steps=3)
    s = start_server(tmp_path, engine)
    try:
        with Client(s.target) as c:
            code, msg = _code(lambda: list(c.generate("doomed", max_tokens=100, timeout=10)))
            assert code == grpc.StatusCode.INTERNAL and msg == "engine stopped"
            assert engine.failure is not None
            assert s.app.engine_dead.wait(5)
            with grpc.insecure_channel(s.target) as ch:
                st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert st.status == health_pb2.HealthCheckResponse.NOT_SERVING
            for call in (lambda: list(c.generate("more", timeout=5)),
                         lambda: c.submit_batch([{"prompt": "b"}], retries=0)):
                code, msg = _code(call)
                assert code == grpc.StatusCode.UNAVAILABLE and "engine stopped" in msg
    finally:
        s.stop()


def test_dead_engine_process_exits_nonzero_and_batches_resume(tmp_path):
    data = tmp_path / "data"
    proc, port = spawn_server(data, "--mock-fail-after-steps", "2", "--mock-token-delay", "0.01")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            bid = c.submit_batch([{"prompt": "zz", "max_tokens": 5}])
        assert proc.wait(timeout=30) == EXIT_ENGINE_FAILED
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, port = spawn_server(data)  # the supervisor's restart: the batch finishes
    try:
        with Client(f"127.0.0.1:{port}") as c:
            assert [r.text for r in c.batch_results(bid, timeout=20)] == [echo_text("zz", 5)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- 3. a result commit fails (disk full) -------------------------------------------------
def test_failed_result_commit_is_retried_not_lost(tmp_path):
    engine = MockEngine()
    s = start_server(tmp_path, engine)
    s.app.runner.retry_commit_s = 0.05
    db = s.app.store._db
    try:
        with Client(s.target) as c:
            n = 20
            # the engine does not step until the database is "full" (paused, not by holding
            # its lock: the runner reads the engine's stats at its deadline checks, and
            # blocked there it claimed nothing)
            engine.pause()
            bid = c.submit_batch([{"prompt": f"q{i:02d}" * 100, "max_tokens": 400}
                                  for i in range(n)])
            assert wait_until(lambda: s.app.store.counts()["batch_items_running"] == n)
            with s.app.store._lock:  # "disk full": the database may not grow by a page
                pages = db.execute("PRAGMA page_count").fetchone()[0]
                db.execute(f"PRAGMA max_page_count = {pages}")
            engine.resume()
            code, msg = _code(lambda: c.submit_batch([{"prompt": "p" * 400}] * n, retries=0))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in msg
            # results do not fit: the runner holds them, the batch stays unfinished
            assert wait_until(lambda: s.app.runner.in_flight == n and not engine._running
                              and not engine._waiting and not s.app.runner._in_flight, timeout=20)
            info = c.get_batch(bid)
            assert info.state == "running" and info.done == 0
            with s.app.store._lock:
                db.execute("PRAGMA max_page_count = 1073741823")  # space again
            results = list(c.batch_results(bid, timeout=20))
            assert [r.index for r in results] == list(range(n))
            assert all(r.text == echo_text(f"q{r.index:02d}" * 100, 400) for r in results)
            info = c.get_batch(bid)
            assert (info.state, info.done, info.failed) == ("completed", n, 0)
            rows = db.execute("SELECT COUNT(*) FROM items WHERE batch_id=? AND state='done'",
                              (bid,)).fetchone()[0]
            assert rows == n
    finally:
        s.stop()


# ---- 4. idle unauthenticated streams cannot exhaust the server ---------------------------
def test_idle_streams_cannot_starve_authenticated_calls(tmp_path):
    token = "tok"
    s = start_server(tmp_path, auth_tokens=[token], max_reflection_streams=2,
                     max_health_watches=2, unary_workers=4,
                     options=ServiceOptions(max_online_queue=2, max_result_streams=3,
                                            max_result_streams_per_tenant=2))
    release = threading.Event()
    calls = []

    def idle_requests():
        release.wait(30)
        return
        yield  # never sends a request: the stream just sits there

    try:
        with grpc.insecure_channel(s.target) as ch, Client(s.target, token=token) as c:
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            for _ in range(40):
                calls.append(refl.ServerReflectionInfo(idle_requests()))
            for _ in range(20):
                calls.append(health.Watch(health_pb2.HealthCheckRequest()))
            s.engine.token_delay_s = 0.05  # the batch will not finish while we look
            bid = c.submit_batch([{"prompt": "x", "max_tokens": 1000}] * 2, timeout=30, retries=0)
            for _ in range(6):
                calls.append(c._stub.StreamBatchResults(
                    pb.StreamBatchResultsRequest(batch_id=bid), metadata=c._md))
            # the over-cap streams end with RESOURCE_EXHAUSTED; the rest stay open
            def refused():
                return sum(x.done() and x.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for x in calls)
            assert wait_until(lambda: refused() == (40 - 2) + (20 - 2) + (6 - 2), timeout=30)
            assert not any(x.done() and x.code() != grpc.StatusCode.RESOURCE_EXHAUSTED for x in calls)
            s.engine.token_delay_s = 0.0
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert c.stats(timeout=5)["online_queue_limit"] == 2
            assert list(c.generate("ok", max_tokens=2, timeout=5))[-1].finished
            assert s.app.reflection.limiter.open <= 2 and s.app.health.limiter.open <= 2
    finally:
        release.set()
        for x in calls:
            x.cancel()
        s.stop()


def test_health_status_change_does_not_deadlock_with_a_closing_watch():
    """A status change (`set`, `enter_graceful_shutdown`) sends to the watchers; a send
    waits for the gRPC serve thread, which may be running another watch's close callback.
    Modelled here: the send waits for a close callback run on another thread; with the
    stock servicer's lock held across sends that callback could never run."""
    from grpc_health.v1 import health_pb2
    from conserve_server.grpc_api.limits import LimitedHealth, StreamLimiter

    class Ctx:
        def __init__(self):
            self.callbacks = []

        def add_callback(self, cb):
            self.callbacks.append(cb)
            return True

    h = LimitedHealth(StreamLimiter("Health.Watch", 4))
    closing, watching = Ctx(), Ctx()
    got = []
    h.Watch(health_pb2.HealthCheckRequest(), closing, lambda r: None)
    closed = threading.Event()

    def close_other_watch():  # the serve thread: the closing watch's callbacks
        for cb in closing.callbacks:
            cb()
        closed.set()

    def send(resp):  # the watching stream's send: waits for the serve thread
        got.append(resp and resp.status)
        if resp is not None and resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            threading.Thread(target=close_other_watch, daemon=True).start()
            closed.wait(20)  # bounds a deadlock: the close callback never finishes

    h.Watch(health_pb2.HealthCheckRequest(), watching, send)
    h.enter_graceful_shutdown()
    assert closed.is_set()
    assert got == [health_pb2.HealthCheckResponse.SERVING,
                   health_pb2.HealthCheckResponse.NOT_SERVING]
    h.set("", health_pb2.HealthCheckResponse.SERVING)  # ignored once shutting down
    assert len(got) == 2 and h.limiter.open == 1  # the closed watch gave its slot back


# ---- 5. two servers, one data dir ---------------------------------------------------------
def test_second_server_on_same_data_dir_is_refused(tmp_path):
    s = start_server(tmp_path)
    try:
        with pytest.raises(DataDirInUse, match="in use"):
            BatchStore(str(tmp_path))
        with pytest.raises(RuntimeError, match="in use"):  # a second process
            spawn_server(tmp_path, timeout=20)
        with Client(s.target) as c:  # the first one is unaffected
            bid = c.submit_batch([{"prompt": "ab", "max_tokens": 2}])
            assert [r.text for r in c.batch_results(bid, timeout=10)] == ["ab"]
    finally:
        s.stop()
    BatchStore(str(tmp_path)).close()  # released at stop
