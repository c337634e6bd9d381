"""The batch runner's part in offline deadlines (issue 27, item 2 of "What to build"):
items of at-risk batches are claimed before the fair order and marked urgent in the engine,
and unmarked once the batch is no longer at risk. A stub tracker says which batches are at
risk; the runner's steps are called directly (no runner thread)."""
from __future__ import annotations

import time

from conserve_jax.engine.mock_engine import MockEngine
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.runner import BatchRunner
from conserve_server.batch.store import SqliteBatchStore


class RecordingEngine(MockEngine):
    def __init__(self):
        super().__init__(token_delay_s=0.05)  # items stay in flight while the test looks
        self.urgent_calls = []

    def set_urgent(self, request_ids):
        self.urgent_calls.append(frozenset(request_ids))
        self.urgent_ranks = dict(request_ids)
        super().set_urgent(request_ids)


class StubTracker:
    def __init__(self):
        self.risky = []
        self.ticks = 0

    def tick(self, in_engine=None, progress=None):
        self.ticks += 1
        self.in_engine = in_engine
        self.progress = progress

    def urgent_batches(self):
        return list(self.risky)

    def observe_length(self, *a):
        pass

    def note_expired(self, batch_id):
        pass


def _items(n):
    return [(pb.GenerateRequest(request_id=f"r{i}", sampling=pb.SamplingParams(max_tokens=50)),
             [10 + i]) for i in range(n)]


def test_at_risk_items_claimed_first_and_marked_urgent(tmp_path):
    store, eng = SqliteBatchStore(str(tmp_path)), RecordingEngine()
    try:
        early, _ = store.create_batch("t", _items(5), deadline=time.time() + 1000)
        late, _ = store.create_batch("t", _items(5), deadline=time.time() + 2000)
        runner = BatchRunner(store, eng, max_in_flight=3)
        runner.deadlines = tracker = StubTracker()
        tracker.risky = [late]
        runner._deadline_check()
        assert tracker.ticks == 1 and eng.urgent_calls == []  # nothing in flight to mark yet
        assert runner._fill()
        flights = list(runner._in_flight.values())
        assert [f.item.batch_id for f in flights] == [late] * 3  # EDF alone would take `early`
        assert eng.urgent_calls[-1] == frozenset(f.request_id for f in flights)
        tracker.risky = []  # no longer at risk: unmarked
        runner._deadline_check()
        assert tracker.in_engine == {late: 3}  # the tracker learns what the engine holds
        assert eng.urgent_calls[-1] == frozenset()
        n = len(eng.urgent_calls)
        runner._deadline_check()  # unchanged: the engine is not told again
        assert len(eng.urgent_calls) == n
    finally:
        eng.shutdown()
        store.close()


def test_at_risk_items_are_claimed_past_a_full_window(tmp_path):
    """A loose batch filled the claim window first; a batch found at risk later still gets
    items into the engine (up to half the window more), and only its items."""
    store, eng = SqliteBatchStore(str(tmp_path)), RecordingEngine()
    try:
        loose, _ = store.create_batch("t", _items(8), deadline=time.time() + 2000)
        runner = BatchRunner(store, eng, max_in_flight=4)
        runner.deadlines = tracker = StubTracker()
        assert runner._fill()
        assert [f.item.batch_id for f in runner._in_flight.values()] == [loose] * 4
        tight, _ = store.create_batch("t", _items(5), deadline=time.time() + 100)
        runner._claim_after = 0.0
        assert runner._fill() and len(runner._in_flight) == 4  # full: nothing more
        tracker.risky = [tight]
        runner._deadline_check()
        runner._claim_after = 0.0
        assert runner._fill()
        batches = [f.item.batch_id for f in runner._in_flight.values()]
        assert batches == [loose] * 4 + [tight] * 2  # 4 + 4 // 2: only the at-risk batch's
        assert eng.urgent_calls[-1] == frozenset(
            f.request_id for f in runner._in_flight.values() if f.item.batch_id == tight)
        # two at-risk batches: ranks follow the tracker's order (earliest deadline first)
        tracker.risky = [tight, loose]
        runner._deadline_check()
        want = {f.request_id: 0 if f.item.batch_id == tight else 1
                for f in runner._in_flight.values()}
        assert eng.urgent_ranks == want
    finally:
        eng.shutdown()
        store.close()


def test_deadline_checks_report_the_progress_of_items_in_flight(tmp_path):
    """Each deadline check reads what the in-flight items generated so far (without
    waiting) and tells the tracker, per batch; the tokens read early still reach the
    item's stored result, whole and in order."""
    store, eng = SqliteBatchStore(str(tmp_path)), RecordingEngine()
    try:
        bid, _ = store.create_batch("t", _items(2), deadline=time.time() + 1000)
        runner = BatchRunner(store, eng, max_in_flight=2)
        runner.deadlines = tracker = StubTracker()
        assert runner._fill()
        time.sleep(0.6)  # ~12 of 50 tokens at 0.05 s each
        runner._deadline_check()
        got = tracker.progress[bid]
        assert len(got) == 2 and all(2 <= p.generated < 50 for p in got)
        assert all(p.steady_s == 0.0 and p.steady_tokens == 0 for p in got)  # seen just now
        time.sleep(0.5)
        runner._deadline_check()
        later = tracker.progress[bid]
        for a, b in zip(got, later):  # the pace since: tokens and seconds after that check
            assert b.generated > a.generated and b.steady_tokens == b.generated - a.generated
            assert 0.4 < b.steady_s < 2.0
        deadline = time.time() + 10
        while runner._in_flight and time.time() < deadline:
            runner._collect()
            time.sleep(0.05)
        assert not runner._in_flight
        results = [pb.BatchResult.FromString(r) for _, r in store.results(bid, 0)]
        # the mock engine echoes the prompt: item i's prompt is [10 + i]
        assert [list(r.token_ids) for r in results] == [[10] * 50, [11] * 50]
    finally:
        eng.shutdown()
        store.close()
