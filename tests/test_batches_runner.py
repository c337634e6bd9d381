"""Batch jobs in-process: the store's exactly-once rules and recovery, the runner's bounded
in-flight window, OFFLINE class, cancellation of in-flight items, completion deadlines."""
from __future__ import annotations

import pytest

from conserve_jax.client import Client
from conserve_jax.engine_api import RequestClass
from conserve_jax.engine.mock_engine import MockEngine
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.store import BatchStore
from tests.conftest_server import echo_text, start_server, wait_until


def _items(n):
    return [(pb.GenerateRequest(prompt=f"p{i}", request_id=f"r{i}"), [10 + i]) for i in range(n)]


def test_store_exactly_once_and_recovery(tmp_path):
    store = BatchStore(str(tmp_path))
    bid, created = store.create_batch("t", _items(4), deadline=None)
    assert created and store.get(bid).state == "queued"
    claimed = store.claim(3)
    assert [c.index for c in claimed] == [0, 1, 2] and claimed[0].prompt_ids == [10]
    assert claimed[1].request.request_id == "r1" and store.get(bid).state == "running"
    res = pb.BatchResult(index=0, text="x", finish_reason=pb.FINISH_REASON_STOP)
    assert store.commit_result(bid, res, "stop")
    assert not store.commit_result(bid, res, "stop")  # a second result is refused
    store.close()
    # "crash": items 1 and 2 were running; reopening makes them pending again
    store = BatchStore(str(tmp_path))
    assert store.counts()["batch_items_pending"] == 3
    assert [c.index for c in store.claim(10)] == [1, 2, 3]
    for i in (1, 2, 3):
        assert store.commit_result(bid, pb.BatchResult(index=i), "length")
    row = store.get(bid)
    assert (row.state, row.done, row.total) == ("completed", 4, 4)
    assert [i for i, _ in store.results(bid, 0)] == [0, 1, 2, 3]
    assert pb.BatchResult.FromString(store.results(bid, 0)[0][1]).text == "x"
    store.close()


def test_store_terminated_batch_recovers_to_full_results(tmp_path):
    store = BatchStore(str(tmp_path))
    bid, _ = store.create_batch("t", _items(3))
    store.claim(1)  # item 0 is in the engine when the batch is cancelled...
    assert store.terminate(bid, "cancelled", "batch cancelled")
    assert not store.terminate(bid, "cancelled")
    assert store.get(bid).done == 2 and store.claim(5) == []
    store.close()  # ...and the process dies before the engine reports it
    store = BatchStore(str(tmp_path))
    row = store.get(bid)
    assert (row.state, row.done, row.cancelled) == ("cancelled", 3, 3)
    store.close()


def test_runner_bounds_in_flight_and_submits_offline(tmp_path):
    engine = MockEngine(token_delay_s=0.002, max_num_seqs=2)
    s = start_server(tmp_path, engine, batch_in_flight=3)
    try:
        with Client(s.target) as c:
            bid = c.submit_batch([{"prompt": f"item{i}:", "max_tokens": 6} for i in range(24)])
            seen = []
            assert wait_until(lambda: seen.append(c.stats()["batch_items_in_flight"])
                              or c.get_batch(bid).state == "completed", timeout=10)
            assert max(seen) <= 3
            results = list(c.batch_results(bid))
            assert [r.text for r in results] == [echo_text(f"item{i}:", 6) for i in range(24)]
        assert engine.peak_offline <= 3
        assert engine.submitted[RequestClass.OFFLINE] == 24
    finally:
        s.stop()


def test_cancel_stops_in_flight_items_and_frees_kv(tmp_path):
    engine = MockEngine(token_delay_s=0.01)
    s = start_server(tmp_path, engine, batch_in_flight=4)
    try:
        with Client(s.target) as c:
            done_bid = c.submit_batch([{"prompt": "fast", "max_tokens": 2}])
            assert [r.text for r in c.batch_results(done_bid, timeout=5)] == ["fa"]
            bid = c.submit_batch([{"prompt": "long", "max_tokens": 1000}] * 12)
            assert wait_until(lambda: c.stats()["kv_blocks_offline"] > 0)
            assert c.stats()["offline_running"] + c.stats()["offline_waiting"] <= 4
            assert c.cancel_batch(bid).state == "cancelled"  # 1000 tokens would take 10 s
            assert wait_until(lambda: c.stats()["kv_blocks_offline"] == 0, timeout=1.5)
            results = list(c.batch_results(bid, timeout=5))
            assert len(results) == 12 and {r.finish_reason for r in results} == {"cancelled"}
            assert any(r.token_ids for r in results)  # in-flight ones keep their partial output
            info = c.get_batch(bid)
            assert (info.done, info.cancelled, info.state) == (12, 12, "cancelled")
            assert c.get_batch(done_bid).state == "completed"
    finally:
        s.stop()


def test_completion_deadline_fails_unfinished_items(tmp_path):
    engine = MockEngine(token_delay_s=0.01)
    s = start_server(tmp_path, engine, batch_in_flight=2)
    try:
        with Client(s.target) as c:
            bid = c.submit_batch([{"prompt": "d", "max_tokens": 3}] * 2
                                 + [{"prompt": "slow", "max_tokens": 1000}] * 4, deadline=0.5)
            assert wait_until(lambda: c.get_batch(bid).state == "expired", timeout=3)
            assert wait_until(lambda: c.get_batch(bid).done == 6, timeout=2)
            info = c.get_batch(bid)
            assert info.failed == 4 and info.error == "batch deadline exceeded"
            results = list(c.batch_results(bid, timeout=5))
            assert [r.finish_reason for r in results[:2]] == ["length", "length"]
            assert all(r.finish_reason == "error" and "deadline" in r.error for r in results[2:])
            assert wait_until(lambda: c.stats()["kv_blocks_offline"] == 0, timeout=1.0)
    finally:
        s.stop()


def test_results_stream_follows_a_running_batch(tmp_path):
    engine = MockEngine(token_delay_s=0.02)  # 4 waves of 5 tokens: about 0.4 s
    s = start_server(tmp_path, engine, batch_in_flight=2)
    try:
        with Client(s.target) as c:
            bid = c.submit_batch([{"prompt": f"f{i}", "max_tokens": 5} for i in range(8)])
            stream = c.batch_results(bid, timeout=10)
            first = next(stream)  # arrives before the batch is done
            assert first.index == 0 and c.get_batch(bid).state == "running"
            assert [r.index for r in stream] == list(range(1, 8))
    finally:
        s.stop()


@pytest.mark.parametrize("n", [1, 300])
def test_many_small_items(tmp_path, n):
    s = start_server(tmp_path, MockEngine(), batch_in_flight=64)
    try:
        with Client(s.target) as c:
            bid = c.submit_batch([{"token_ids": [5 + i % 200], "max_tokens": 1} for i in range(n)])
            results = list(c.batch_results(bid, timeout=30))
            assert [r.index for r in results] == list(range(n))
            assert [r.token_ids for r in results] == [[5 + i % 200] for i in range(n)]
    finally:
        s.stop()


class _CountingStore:
    """A store proxy that counts claims (what the runner asks the store while it works)."""

    def __init__(self, store):
        self._store, self.claims = store, 0

    def claim(self, *a, **k):
        self.claims += 1
        return self._store.claim(*a, **k)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_runner_does_not_poll_a_drained_queue(tmp_path):
    """With items in flight and nothing left to claim, the runner claims again only every
    idle_claim_s (it used to claim every poll_s: 100 store round trips a second); a local
    submit (wake) is claimed at once."""
    from conserve_server.batch.runner import BatchRunner
    engine = MockEngine(token_delay_s=0.05)
    store = _CountingStore(BatchStore(str(tmp_path)))
    runner = BatchRunner(store, engine, max_in_flight=8, poll_s=0.01, idle_claim_s=5.0)
    slow = [(pb.GenerateRequest(prompt=f"p{i}", request_id=f"r{i}",
                                sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)),
             [10 + i]) for i in range(2)]
    bid, _ = store.create_batch("t", slow)
    runner.start()
    try:
        wait_until(lambda: runner.in_flight == 2, timeout=10)
        before = store.claims
        import time
        time.sleep(1.0)  # both items still running (40 tokens x 50 ms)
        assert runner.in_flight == 2
        polled = store.claims - before
        assert polled <= 2, f"{polled} claims in 1 s on a drained queue"
        bid2, _ = store.create_batch("t", _items(1))
        t0 = time.monotonic()
        runner.wake()
        wait_until(lambda: store.get(bid2).state != "queued", timeout=10)
        assert time.monotonic() - t0 < 2.5  # claimed on the wake, not after idle_claim_s
        wait_until(lambda: store.get(bid).state == "completed", timeout=30)
    finally:
        runner.stop()
        store.close()
        engine.shutdown()
