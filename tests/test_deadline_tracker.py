"""`DeadlineTracker` (issue 27, items 1, 4, 6) over a real sqlite store, a fake engine whose
offline counters the test advances, and a fake clock: harvest rate, admission of infeasible
batches (refused with the field named, or accepted with --accept-infeasible), estimates,
at-risk, and the outcome statistics of ended batches."""
from __future__ import annotations

import time

import pytest

from conserve_jax.engine_api import EngineStats
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.scheduling.harvest import WorkCost
from conserve_server.batch.deadline_pace import ItemProgress
from conserve_server.batch.deadlines import DEADLINE_ERROR, DeadlineTracker
from conserve_server.batch.store import SqliteBatchStore, open_store
from conserve_server.config import DeadlineOptions
from tests.pg_cluster import pg_cluster, pg_url  # noqa: F401  (fixtures)


class FakeEngine:
    def __init__(self):
        self.st = EngineStats()

    def stats(self):
        return self.st


class Clock:
    def __init__(self, t=None):
        self.t = time.time() if t is None else t

    def __call__(self):
        return self.t


def items(n, prompt_len=10, max_tokens=20, hint=None):
    out = []
    for i in range(n):
        r = pb.GenerateRequest(request_id=f"r{i}", sampling=pb.SamplingParams(max_tokens=max_tokens))
        if hint is not None:
            r.expected_output_tokens = hint
        out.append((r, list(range(3, 3 + prompt_len))))
    return out


@pytest.fixture
def setup(tmp_path):
    store = SqliteBatchStore(str(tmp_path))
    eng, clock = FakeEngine(), Clock()
    tr = DeadlineTracker(store, eng, DeadlineOptions(harvest_window_s=60.0,
                                                     harvest_min_history_s=5.0,
                                                     at_risk_margin=0.2), clock=clock)
    yield store, eng, clock, tr
    store.close()


def harvest(eng, clock, tr, seconds, tokens_per_s):
    """Advance the fake clock `seconds`, the engine generating offline tokens at a rate."""
    eng.st.offline_waiting = 1
    for _ in range(int(seconds)):
        clock.t += 1.0
        eng.st.offline_tokens_total += tokens_per_s
        tr.tick()


def test_no_history_accepts_without_estimate(setup):
    store, eng, clock, tr = setup
    work, refusal = tr.judge(items(4), "t", clock.t + 1.0, "completion_window")
    assert refusal is None and work.estimate_at is None
    assert work.prompt_tokens == 40 and 4 <= work.output_tokens <= 80  # predictor: <= max_tokens


def test_infeasible_batch_refused_naming_the_field(setup):
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)  # 10 tokens (work units) per second
    assert tr.meter.rate() == pytest.approx(10.0)
    # 4 items x (10 prompt + 20 hinted output) = 120 units: 12 s at 10/s
    work, refusal = tr.judge(items(4, hint=20), "t", clock.t + 60, "completion_window")
    assert refusal is None and work.estimate_at - clock.t == pytest.approx(12.0)
    bid, _ = store.create_batch("t", items(4, hint=20), clock.t + 60, work=work)
    # a second one due in 20 s: 120 units of its own, and the first one's 120 are due later
    # (60 s), so it fits alone
    work2, refusal = tr.judge(items(4, hint=20), "t", clock.t + 20, "completion_window")
    assert refusal is None and work2.estimate_at - clock.t == pytest.approx(12.0)
    # due in 15 s but behind an earlier deadline's 120 units: 24 s > 15 s -> refused
    store.create_batch("t", items(4, hint=20), clock.t + 10, work=work2)
    _, refusal = tr.judge(items(4, hint=20), "t", clock.t + 15, "completion_window")
    assert refusal is not None and refusal.startswith("completion_window:")
    assert "in about 24 s" in refusal and "ends in 15 s" in refusal
    assert tr.snapshot().refused == 1
    # the same batch accepted (to expire) with accept_infeasible
    tr.options = DeadlineOptions(accept_infeasible=True)
    work3, refusal = tr.judge(items(4, hint=20), "t", clock.t + 15, "completion_window")
    assert refusal is None and work3.estimate_at - clock.t == pytest.approx(24.0)
    assert tr.snapshot().accepted_infeasible == 1


def test_nothing_harvested_refuses_every_deadline(setup):
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 0)  # backlogged, but the online load takes everything
    assert tr.meter.rate() == 0.0
    _, refusal = tr.judge(items(1), "t", clock.t + 3600, "deadline")
    assert refusal is not None and "never" in refusal and refusal.startswith("deadline:")
    work, refusal = tr.judge(items(1), "t", None, "deadline")  # no deadline: always accepted
    assert refusal is None


def test_estimates_at_risk_and_outcomes(setup):
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)
    w, _ = tr.judge(items(2, hint=20), "t", clock.t + 100, "deadline")  # 60 units: 6 s
    ok, _ = store.create_batch("t", items(2, hint=20), clock.t + 100, work=w)
    w2, _ = tr.judge(items(2, hint=20), "t", clock.t + 13, "deadline")  # 6 s, only 13 s left
    risky, _ = store.create_batch("t", items(2, hint=20), clock.t + 13, work=w2)
    tr.tick()
    # EDF: risky (due first) finishes in 6 s: slack 7 s of 6 s needed -> not at risk
    e = tr.estimate_of(risky)
    assert e.finish_at - clock.t == pytest.approx(6.0) and not e.at_risk
    assert tr.estimate_of(ok).finish_at - clock.t == pytest.approx(12.0)
    # the harvest rate drops to 1/s: risky now needs 60 s for 13 s: at risk
    harvest(eng, clock, tr, 60, 1)
    assert tr.meter.rate() == pytest.approx(1.0)
    # ok: 120 s of work behind risky for 40 s left; risky (past due) has the least slack
    assert tr.at_risk() == [risky, ok]
    snap = tr.snapshot()
    assert snap.at_risk_batches == 2 and snap.at_risk_items == 4
    # both miss even when served first (risky is past due; ok needs 60 s of its 40):
    # hopeless, so neither gets priority (it would not save them)
    assert tr.estimate_of(risky).hopeless and tr.estimate_of(ok).hopeless
    assert tr.urgent_batches() == []
    tr.options = DeadlineOptions(deadline_order=False)  # claim by deadline alone
    assert tr.urgent_batches() == [] and tr.at_risk() == [risky, ok]
    # ok completes in its window, risky expires
    for c in store.claim(10):
        if c.batch_id == ok:
            store.commit_result(ok, pb.BatchResult(index=c.index), "stop")
    store.terminate(risky, "failed", DEADLINE_ERROR)
    tr.tick()
    snap = tr.snapshot()
    assert snap.met == {"batch": 1} and snap.missed == {"batch": 1}
    assert snap.at_risk_batches == 0 and snap.at_risk_items == 0
    assert len(snap.estimate_errors) == 1  # only the completed batch has an error
    row = store.get(ok)
    actual = row.finished_at - row.created_at
    assert snap.estimate_errors[0] == pytest.approx((row.estimate_at - row.created_at - actual) / actual)
    assert sum(snap.slack_hist) == 2
    tr.tick()  # ended batches are counted once
    assert tr.snapshot().met == {"batch": 1}


def test_deadline_options_are_checked():
    with pytest.raises(ValueError, match="harvest_window_s"):
        DeadlineOptions(harvest_window_s=0)
    with pytest.raises(ValueError, match="harvest_min_history_s"):
        DeadlineOptions(harvest_window_s=5, harvest_min_history_s=10)
    with pytest.raises(ValueError, match="at_risk_margin"):
        DeadlineOptions(at_risk_margin=-1)


def test_fleet_rate_on_a_shared_store(pg_url, tmp_path):
    """Two replicas on one PostgreSQL store: each publishes its own rate and both estimate
    with the sum (a replica without history publishes none)."""
    a_store = open_store(pg_url, str(tmp_path), replica_id="fleet-a")
    b_store = open_store(pg_url, str(tmp_path), replica_id="fleet-b")
    try:
        for s in (a_store, b_store):
            s.publish_rate(None)
        clock = Clock()
        ea, eb = FakeEngine(), FakeEngine()
        ta = DeadlineTracker(a_store, ea, DeadlineOptions(harvest_window_s=60.0), clock=clock)
        tb = DeadlineTracker(b_store, eb, DeadlineOptions(harvest_window_s=60.0), clock=clock)
        for eng in (ea, eb):
            eng.st.offline_waiting = 1
        for _ in range(10):
            clock.t += 1.0
            ea.st.offline_tokens_total += 10
            eb.st.offline_tokens_total += 5
            ta.tick()
            tb.tick()
        ra, rb = ta.meter.rate(), tb.meter.rate()
        assert (ra, rb) == (pytest.approx(10.0), pytest.approx(5.0))
        # both publish now (same clock: the meters do not move), then both read
        ta._next_publish = tb._next_publish = 0.0
        ta.tick()
        tb.tick()
        ta._next_publish = 0.0
        ta.tick()
        assert ta.rate() == pytest.approx(15.0) and tb.rate() == pytest.approx(15.0)
        assert tb.snapshot().harvest_rate == pytest.approx(15.0)
        # admission judges against the fleet's rate: 60 units (the hint capped at
        # max_tokens 20) need 60/15 s, inside 10 s; at this replica's own 5/s, 12 s: refused
        work, refusal = tb.judge(items(2, prompt_len=10, hint=40), "t", clock.t + 10, "deadline")
        assert refusal is None and work.estimate_at - clock.t == pytest.approx(60 / 15.0)
    finally:
        a_store.close()
        b_store.close()


def test_items_inside_the_engine_put_a_later_tight_batch_at_risk(setup):
    """A loose batch whose items all sit in the engine (claimed first) is served before a
    tight batch submitted later: the tracker, told so by the runner's counts, flags the
    tight one at once (plain EDF would call it safe) and keeps it flagged while it is
    served first, as long as it would miss without that priority."""
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)
    w, _ = tr.judge(items(10, hint=20), "t", clock.t + 100, "deadline")  # 300 units: 30 s
    loose, _ = store.create_batch("t", items(10, hint=20), clock.t + 100, work=w)
    w2, _ = tr.judge(items(2, hint=20), "t", clock.t + 20, "deadline")  # 60 units: 6 s
    assert w2.estimate_at - clock.t == pytest.approx(6.0)  # admission: EDF, it fits
    tight, _ = store.create_batch("t", items(2, hint=20), clock.t + 20, work=w2)
    tr.tick(in_engine={})
    assert tr.at_risk() == []  # nothing in the engine: EDF serves tight first
    tr.tick(in_engine={loose: 10})  # the loose items were claimed first
    e = tr.estimate_of(tight)
    assert e.finish_at - clock.t == pytest.approx(36.0) and e.at_risk
    assert tr.urgent_batches() == [tight] and not tr.estimate_of(loose).at_risk
    tr.tick(in_engine={loose: 10, tight: 2})  # now urgent: served first, still at risk
    e = tr.estimate_of(tight)
    assert e.finish_at - clock.t == pytest.approx(6.0) and e.at_risk
    assert tr.estimate_of(loose).finish_at - clock.t == pytest.approx(36.0)
    tr.tick(in_engine={loose: 1, tight: 2})  # the loose queue drained: fits without priority
    assert tr.urgent_batches() == []


def test_admission_judges_at_risk_as_the_first_tick_will(setup):
    """A tight batch that comes while a loose batch's items sit in the engine is at risk on
    the first tick (they are served before anything claimed later), so it is served first,
    in a burst. Admission judges it the same way; on the work due before it alone (EDF) it
    would look calm, its tail at the median pace beside the loose batch's prompts."""
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)
    for tpot in (0.5, 1.0, 2.0):  # median 1 s a token, lower quartile 0.5 s
        tr.observe_length(pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=20)),
                          [3, 4], "t", 20, tpot_s=tpot)
    w, _ = tr.judge(items(10, hint=20), "t", clock.t + 1000, "deadline")
    loose, _ = store.create_batch("t", items(10, hint=20), clock.t + 1000, work=w)
    tr.tick(in_engine={loose: 10})
    # EDF: its 6 s of work, then 10 tokens at 1 s beside the loose prompts (10 s) and 10 at
    # 0.5 s: 21 s, calm for a 40 s window. Served order: 36 s of work + 20 s: at risk. So
    # its burst: 20 prompt tokens at the prompt rate (here the harvest rate), 20 at 0.5 s
    w2, refusal = tr.judge(items(2, hint=20), "t", clock.t + 40, "deadline")
    assert refusal is None and w2.estimate_at - clock.t == pytest.approx(2.0 + 20 * 0.5)
    tight, _ = store.create_batch("t", items(2, hint=20), clock.t + 40, work=w2)
    tr.tick(in_engine={loose: 10})
    assert tr.urgent_batches() == [tight]
    tr.tick(in_engine={loose: 10})
    assert tr.estimate_of(tight).finish_at == pytest.approx(w2.estimate_at)


def test_borrowing_admits_what_only_borrowing_can_fit(setup):
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)
    # 120 units: 12 s at the harvest rate, window 8 s: refused under isolate
    _, refusal = tr.judge(items(4, hint=20), "t", clock.t + 8, "completion_window")
    assert refusal is not None
    tr.borrow_gain = 2.0  # borrowing serves it at up to 20/s: 6 s, fits
    work, refusal = tr.judge(items(4, hint=20), "t", clock.t + 8, "completion_window")
    # accepted; its estimate is the one without borrowing (the gain is an upper bound),
    # as every tick after estimates it
    assert refusal is None and work.estimate_at - clock.t == pytest.approx(12.0)
    b, _ = store.create_batch("t", items(4, hint=20), clock.t + 8, work=work)
    tr.tick()
    assert tr.estimate_of(b).finish_at == pytest.approx(work.estimate_at)
    _, refusal = tr.judge(items(4, hint=20), "t", clock.t + 5, "completion_window")
    assert refusal is not None  # 6 s > 5 s even with borrowing


def test_borrow_gain_of_the_engine_config():
    from conserve_jax.config import ConserveConfig, EngineConfig
    from conserve_server.batch.deadline_inputs import borrow_gain_of

    def cfg(**kw):
        return EngineConfig(model="random:tiny", conserve=ConserveConfig(**kw))
    assert borrow_gain_of(cfg()) == 1.0  # isolate
    assert borrow_gain_of(cfg(deadline_policy="borrow", isolation=1.2,
                              isolation_max=1.5)) == pytest.approx(2.5)
    assert borrow_gain_of(cfg(deadline_policy="borrow", isolation=1.0)) == float("inf")
    assert borrow_gain_of(cfg(deadline_policy="borrow", isolation="off")) == 1.0


def test_the_generation_tail_comes_from_finished_items(setup):
    """Throughput alone calls a few-item batch quick; once finished items show how long
    each output token took, its estimate adds its items' generation time."""
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)
    w, _ = tr.judge(items(2, hint=20), "t", clock.t + 30, "deadline")  # 60 units: 6 s
    assert w.estimate_at - clock.t == pytest.approx(6.0)
    for tpot in (0.5, 1.0, 2.0):  # median 1 s per token
        tr.observe_length(pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=20)),
                          [3, 4], "t", 20, tpot_s=tpot)
    assert tr.tpot() == pytest.approx(1.0) and tr.tpot_lead() == pytest.approx(0.5)
    # no other prompts go in beside its items: 20 tokens at the fast end (lower quartile);
    # the engine ran one offline item at a time, so one item's output is generated during
    # the tail, not before it (60 units less 20)
    w, refusal = tr.judge(items(2, hint=20), "t", clock.t + 100, "deadline")
    assert refusal is None and w.estimate_at - clock.t == pytest.approx(4.0 + 20 * 0.5)
    # due in 30 s it is at risk as it comes (6 s + 20 tokens at the median 1 s: 26 s, under
    # 20 % headroom), so urgent from the first tick: its burst, 2 s of prompts (20 tokens
    # at the prompt rate, here the harvest rate) then 20 tokens at 0.5 s
    w, refusal = tr.judge(items(2, hint=20), "t", clock.t + 30, "deadline")
    assert refusal is None and w.estimate_at - clock.t == pytest.approx(12.0)
    _, refusal = tr.judge(items(2, hint=20), "t", clock.t + 11, "deadline")
    assert refusal is not None  # 12 s even served first: misses 11 s
    # a batch due later, with 100 prompt tokens (10 s) that go in beside its items: 10 of
    # its 20 tokens at the median pace, 10 at the fast end
    w, _ = tr.judge(items(1, prompt_len=100, hint=20), "t", clock.t + 1000, "deadline")
    store.create_batch("t", items(1, prompt_len=100, hint=20), clock.t + 1000, work=w)
    w, refusal = tr.judge(items(2, hint=20), "t", clock.t + 100, "deadline")
    assert refusal is None and w.estimate_at - clock.t == pytest.approx(4.0 + 10 * 1.0 + 10 * 0.5)
    # at risk as it comes, it is urgent: the later batch's prompt waits, its burst is as alone
    w, refusal = tr.judge(items(2, hint=20), "t", clock.t + 30, "deadline")
    assert refusal is None and w.estimate_at - clock.t == pytest.approx(12.0)
    # with deadline_order off nothing is served first: at risk or not, it is estimated in
    # the order the engine serves it then (bench_deadlines' today read 44 s for 72 s)
    tr.options = DeadlineOptions(deadline_order=False)
    w, refusal = tr.judge(items(2, hint=20), "t", clock.t + 30, "deadline")
    assert refusal is None and w.estimate_at - clock.t == pytest.approx(4.0 + 10 * 1.0 + 10 * 0.5)


def test_items_under_way_set_the_pace_and_the_work_left(setup):
    """Before any offline item finished, the items generating now give the pace (seconds per
    token since their second); what they generated and the prompts already in
    come off the batch's remaining work and its tail, so a half-done batch is judged by
    what it has left; one whose tail alone ends past its deadline is hopeless and gets no
    priority, though at risk."""
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)  # 10 units (tokens) per second
    w, _ = tr.judge(items(2, hint=20), "t", clock.t + 30, "deadline")  # 2 x (10 + 20) tokens
    assert w.estimate_at - clock.t == pytest.approx(6.0) and tr.tpot() == 0.0  # no pace yet
    b, _ = store.create_batch("t", items(2, hint=20), clock.t + 30, work=w)
    tr.tick(in_engine={b: 2}, progress={b: [ItemProgress(10, 8.0, 8),
                                             ItemProgress(5, 3.0, 3)]})
    assert tr.tpot() == pytest.approx(1.0)  # 8 s for 8 tokens; the other: too few yet
    e = tr.estimate_of(b)
    # left: the 10 + 15 tokens they have still to generate (2.5 s; one item at a time, so
    # half of them during the tail), then the slowest one's 15 tokens at 1 s each; the
    # prompts are in
    assert e.finish_at - clock.t == pytest.approx(1.25 + 15 * 1.0)
    assert not e.at_risk
    # past the 20 tokens expected, unfinished: each still counts a quarter of it (5) as left
    # (half of the 10 during the tail)
    tr.tick(in_engine={b: 2}, progress={b: [ItemProgress(25, 23.0, 23),
                                             ItemProgress(30, 28.0, 28)]})
    assert tr.estimate_of(b).finish_at - clock.t == pytest.approx(5 / 10 + 5 * 1.0)
    tr.tick(in_engine={b: 2}, progress={b: [ItemProgress(1), ItemProgress(0)]})
    # one item still in prefill: its whole prompt and output to do, and the tail is whole
    assert tr.tpot() == 0.0  # under LIVE_MIN_TOKENS generated: not a sample yet
    assert tr.estimate_of(b).finish_at - clock.t == pytest.approx((19 + 30) / 10)
    w2, _ = tr.judge(items(1, hint=20), "t", clock.t + 10, "deadline")
    tight, _ = store.create_batch("t", items(1, hint=20), clock.t + 10, work=w2)
    pace = [ItemProgress(9, 16.0, 8)]  # another batch's item: 2 s per token
    tr.tick(in_engine={b: 1, tight: 0}, progress={b: pace})
    assert tr.tpot() == pytest.approx(2.0)
    e = tr.estimate_of(tight)  # 3 s of work, then 20 tokens at 2 s: 43 s for a 10 s window
    # at risk; not hopeless while its own item has shown no pace (its 3 s of work fit):
    # another batch's pace says nothing of the pace it gets with priority
    assert e.at_risk and not e.hopeless and tight in tr.urgent_batches()
    # its own item generates at 2 s a token: 20 tokens left, 40 s: hopeless, no priority
    slow = [ItemProgress(8, 14.0, 7)]
    tr.tick(in_engine={b: 1, tight: 1}, progress={b: pace, tight: slow})
    e = tr.estimate_of(tight)
    assert e.at_risk and e.hopeless and tight not in tr.urgent_batches()
    tr.borrow_gain = 5.0  # borrowing's most: 12 x 2 / 5 = 4.8 s, so it could still make it
    tr.tick(in_engine={b: 1, tight: 1}, progress={b: pace, tight: slow})
    assert not tr.estimate_of(tight).hopeless and tight in tr.urgent_batches()
    # its own item generated beside other jobs' prompts so far; served first, its items
    # go at the lead pace: other items generate at 0.25 s a token (the lower quartile), so
    # its burst, 12 tokens at 0.25 s, fits: not hopeless
    tr.borrow_gain = 1.0
    fast = [ItemProgress(9, 2.0, 8)] * 2
    tr.tick(in_engine={b: 5, tight: 1}, progress={b: fast + pace * 3, tight: slow})
    assert tr.tpot_lead() == pytest.approx(0.25) and tr.pace.own(tight, None) == 2.0
    assert tr.tpot() == pytest.approx(2.0)
    assert not tr.estimate_of(tight).hopeless and tight in tr.urgent_batches()
    # judged at its own fastest pace: 0.25 s
    tr.tick(in_engine={b: 1, tight: 1},
            progress={b: pace * 6, tight: [ItemProgress(10, 2.0, 8)]})
    assert tr.tpot() == pytest.approx(2.0) and tr.pace.own(tight, 2.0) == pytest.approx(0.25)
    e = tr.estimate_of(tight)  # 10 tokens left: late at the median pace, 2.5 s at its own
    assert e.at_risk and not e.hopeless and tight in tr.urgent_batches()
    # urgent now (it was at the last look): estimated at the pace priority gives, its own
    # (b, urgent too and due later, has one prompt left; it waits while tight's item
    # generates): the later of its work left (1 s) and its burst, no prompt left and 10
    # tokens at 0.25 s
    assert e.finish_at - clock.t == pytest.approx(10 * 0.25)


def test_an_urgent_job_is_estimated_at_the_fast_end_of_the_paces(setup):
    """Served first, an urgent job's items generate beside no other job's prompts: before
    they have samples of their own, its tail is at the lower quartile of the offline paces,
    a calm job's at the median."""
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)
    for tpot in (0.5, 1.0, 2.0, 4.0):
        tr.observe_length(pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=20)),
                          [3, 4], "t", 20, tpot_s=tpot)
    assert tr.tpot() == pytest.approx(2.0) and tr.tpot_lead() == pytest.approx(1.0)
    w, _ = tr.judge(items(1, hint=20), "t", clock.t + 1000, "deadline")
    calm, _ = store.create_batch("t", items(1, hint=20), clock.t + 1000, work=w)
    w, _ = tr.judge(items(1, hint=20), "t", clock.t + 44, "deadline")
    tight, _ = store.create_batch("t", items(1, hint=20), clock.t + 44, work=w)
    tr.tick(in_engine={calm: 1}, progress={calm: [ItemProgress()]})
    # tight: 3 s of work behind calm's 3 s in the engine; calm's 10-token prompt (1 s) goes
    # in beside its item: 0.5 token at the median 2 s, 19.5 at 1 s. At risk: judged at the
    # median pace, as if calm's prompts went in all along (46 s for 44); its own output
    # (2 s) is generated during its tail
    e = tr.estimate_of(tight)
    assert e.finish_at - clock.t == pytest.approx(4.0 + 0.5 * 2.0 + 19.5 * 1.0) and e.at_risk
    assert tight in tr.urgent_batches()
    tr.tick(in_engine={calm: 1}, progress={calm: [ItemProgress()]})
    e = tr.estimate_of(tight)  # urgent: its burst, its 10-token prompt (1 s), 20 tokens at 1 s
    assert e.finish_at - clock.t == pytest.approx(1.0 + 20 * 1.0)
    # calm: behind tight's work; nothing goes in beside it: 20 tokens at the lower quartile
    assert tr.estimate_of(calm).finish_at - clock.t == pytest.approx(4.0 + 20 * 1.0)


def test_an_urgent_job_generates_at_the_lead_pace_while_later_urgent_prompts_wait(setup):
    """While an urgent item generates, the prompts of urgent jobs due later wait too
    (the scheduler), so the earlier job's items generate at the lead pace throughout; the
    later job's tail is after the earlier one's work and its own."""
    store, eng, clock, tr = setup
    harvest(eng, clock, tr, 10, 10)  # 10 units (tokens) per second
    for tpot in (0.5, 1.0, 2.0, 4.0):  # median 2 s, lower quartile 1 s per token
        tr.observe_length(pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=20)),
                          [3, 4], "t", 20, tpot_s=tpot)
    made = {}
    for name, n, prompt, due in (("calm", 3, 100, 10_000), ("a", 1, 10, 30), ("b", 1, 100, 40)):
        w, _ = tr.judge(items(n, prompt_len=prompt, hint=20), "t", clock.t + due, "deadline")
        made[name], _ = store.create_batch("t", items(n, prompt_len=prompt, hint=20),
                                           clock.t + due, work=w)
    inside = {made["calm"]: 3}  # 360 units inside: a and b are late behind them
    tr.tick(in_engine=inside)
    assert set(tr.urgent_batches()) == {made["a"], made["b"]}
    tr.tick(in_engine=inside)
    # a: its burst, its 10-token prompt (1 s) then 20 tokens at the lower quartile, 1 s (b's
    # prompt waits); later than its 30 units at the harvest rate (3 s)
    assert tr.estimate_of(made["a"]).finish_at - clock.t == pytest.approx(1.0 + 20 * 1)
    # b: after a's burst (21 s), its own: its 100-token prompt (10 s), 20 tokens at 1 s
    assert tr.estimate_of(made["b"]).finish_at - clock.t == pytest.approx(21.0 + 10.0 + 20 * 1)


def test_the_lead_pace_is_the_faster_of_item_paces_and_the_free_iteration_period(setup):
    """Before offline items have shown a fast pace, the lead pace (an urgent job's, and a
    new job's tail) is the engine's time per iteration that generated offline tokens with
    no offline prompt in it; the faster of the two once both are known."""
    store, eng, clock, tr = setup
    assert tr.tpot_lead() == 0.0
    # before any such iteration, the latency model's decode-only iteration of the rows
    # running or waiting now (here 5 ms a row: 4 rows, 20 ms)
    tr.cost = WorkCost(decode_iter_s=tuple(0.005 * k for k in range(1, 9)))
    eng.st.online_running, eng.st.offline_running = 1, 3
    tr.tick()
    assert tr.tpot_lead() == pytest.approx(0.02)
    eng.st.offline_waiting = 2  # 6 rows once they are in
    tr.tick()
    assert tr.tpot_lead() == pytest.approx(0.03)
    # the engine measures its iterations 1.5x the latency model's fit now
    eng.st.latency_correction = 1.5
    tr.tick()
    assert tr.tpot_lead() == pytest.approx(0.045)
    eng.st.online_running, eng.st.offline_running = 0, 0
    tr.cost = WorkCost()
    eng.st.offline_waiting = 1
    for _ in range(7):  # 20 offline tokens a second, 10 free iterations of 0.1 s
        clock.t += 1.0
        eng.st.offline_tokens_total += 20
        eng.st.offline_free_iterations += 10
        eng.st.offline_free_s += 1.0
        tr.tick()
    assert tr.tpot() == 0.0 and tr.tpot_lead() == pytest.approx(0.1)
    w, _ = tr.judge(items(1, hint=20), "t", clock.t + 100, "deadline")
    # its 10 prompt tokens at 20 a second, then its 20 tokens at 0.1 s each
    assert w.estimate_at - clock.t == pytest.approx((30 - 20) / 20 + 20 * 0.1)
    b, _ = store.create_batch("t", items(1, hint=20), clock.t + 100, work=w)
    tr.tick(in_engine={b: 1}, progress={b: [ItemProgress(9, 8.0, 8)]})  # 1 s a token
    assert tr.tpot() == pytest.approx(1.0) and tr.tpot_lead() == pytest.approx(0.1)
    tr.tick(in_engine={b: 1}, progress={b: [ItemProgress(9, 0.4, 8)]})  # 0.05 s a token
    assert tr.tpot_lead() == pytest.approx(0.05)
