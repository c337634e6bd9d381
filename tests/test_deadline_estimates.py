"""Harvest-rate meter and slack arithmetic (issue 27, item 1): a fake clock and made-up
counters, no engine."""
from __future__ import annotations

import math

import pytest

from conserve_jax.scheduling.harvest import HarvestMeter, WorkCost
from conserve_jax.scheduling.slack import JobWork, admit, edf_order, estimate


def test_meter_counts_only_backlogged_time():
    m = HarvestMeter(WorkCost(), window_s=100.0, min_span_s=1.0)
    m.observe(0.0, 0, 0, backlogged=True)
    m.observe(10.0, 0, 50, backlogged=True)  # 50 tokens in 10 backlogged seconds
    assert m.rate() == pytest.approx(5.0)
    # idle for 40 s (no offline work waiting): says nothing about the rate
    m.observe(50.0, 0, 50, backlogged=False)
    m.observe(60.0, 0, 50, backlogged=True)
    assert m.rate() == pytest.approx(5.0)
    m.observe(70.0, 0, 70, backlogged=True)  # 20 more tokens in 10 s
    assert m.rate() == pytest.approx(70 / 20)


def test_meter_window_slides_and_weights_work():
    m = HarvestMeter(WorkCost(prefill_s=0.5, decode_s=2.0), window_s=10.0, min_span_s=1.0)
    m.observe(0.0, 0, 0, True)
    m.observe(10.0, 0, 100, True)  # 200 units in 10 s
    assert m.rate() == pytest.approx(20.0)
    m.observe(20.0, 20, 100, True)  # 10 units in 10 s: the first interval slid out
    assert m.rate() == pytest.approx(1.0)
    m.observe(25.0, 20, 110, True)  # half window: 5 s of the old interval (5 units) + 20
    assert m.rate() == pytest.approx((5 + 20) / 10)
    # idle for an hour (not backlogged): the window slides over backlogged time only
    m.observe(3625.0, 20, 110, False)
    m.observe(3626.0, 20, 110, True)
    assert m.rate() == pytest.approx(2.5) and m.span() == pytest.approx((10.0, 25.0))


def test_meter_duty_is_the_share_of_backlogged_time_in_offline_iterations():
    m = HarvestMeter(WorkCost(), window_s=10.0, min_span_s=2.0)
    m.observe(0.0, 0, 0, True, busy_s=0.0)
    m.observe(1.0, 0, 5, True, busy_s=0.25)
    assert m.duty() is None  # under min_span_s
    m.observe(3.0, 0, 15, True, busy_s=1.25)
    assert m.duty() == pytest.approx(1.25 / 3)
    m.observe(4.0, 0, 15, False, busy_s=1.25)  # not backlogged: says nothing
    m.observe(14.0, 0, 15, True, busy_s=1.25)
    assert m.duty() == pytest.approx(1.25 / 3)
    for t in range(15, 25):  # ten backlogged seconds, all busy: the window forgets the rest
        m.observe(float(t), 0, 15 + t, True, busy_s=1.25 + t - 14)
    assert m.duty() == pytest.approx(1.0)
    m.observe(25.0, 0, 50, True, busy_s=0.5)  # the counter went down: the engine restarted
    assert m.duty() is None


def test_meter_needs_history_and_restarts_on_counter_reset():
    m = HarvestMeter(WorkCost(), window_s=60.0, min_span_s=5.0)
    assert m.rate() is None
    m.observe(0.0, 0, 0, True)
    m.observe(4.0, 0, 40, True)
    assert m.rate() is None  # under min_span_s of backlogged time
    m.observe(6.0, 0, 60, True)
    assert m.rate() == pytest.approx(10.0)
    m.observe(7.0, 0, 5, True)  # the engine restarted: counters went down
    assert m.rate() is None
    with pytest.raises(ValueError, match="min_span_s"):
        HarvestMeter(window_s=1.0, min_span_s=2.0)
    with pytest.raises(ValueError, match="positive"):
        WorkCost(0.0, 1.0)


def test_cost_from_a_latency_model():
    class Fake:  # 1 ms per token processed, whatever the shape
        def predict(self, w):
            return 0.001 * (w.prefill_tokens + w.num_decodes)
    c = WorkCost.from_latency_model(Fake(), max_prefill_tokens=256, max_num_seqs=8)
    assert c.prefill_s == pytest.approx(0.001) and c.decode_s == pytest.approx(0.001)
    # decode-only iterations of 1..8 rows: 1..8 ms; past 8 rows: the largest known
    assert c.decode_iteration_s(3) == pytest.approx(0.003)
    assert c.decode_iteration_s(0) == pytest.approx(0.001)
    assert c.decode_iteration_s(50) == pytest.approx(0.008)
    assert WorkCost().decode_iteration_s(3) is None
    # rescaled to the latency model's correction now (the engine measures slower)
    assert c.correction == 1.0 and c.decode_iteration_s(3, 1.5) == pytest.approx(0.0045)
    Fake.correction = 2.0  # taken while the model read 2x its fit
    c2 = WorkCost.from_latency_model(Fake(), max_prefill_tokens=256, max_num_seqs=8)
    assert c2.correction == 2.0 and c2.decode_iteration_s(3, 3.0) == pytest.approx(0.0045)
    with pytest.raises(ValueError, match="positive"):
        WorkCost(correction=0.0)

    class Zero:
        def predict(self, w):
            return 0.0
    assert WorkCost.from_latency_model(Zero(), 256, 8) == WorkCost()


def test_cost_never_asks_the_latency_model_past_its_shapes():
    """An engine built smaller than the defaults (a test's, a small --max-num-seqs): the
    cost asks for at most the model's largest token bucket and decode rows (asking past
    them raised ValueError at server start)."""
    from types import SimpleNamespace

    class Small:
        buckets = SimpleNamespace(tokens=[1, 2, 4, 8, 16, 32, 68], max_num_seqs=4)

        def predict(self, w):
            assert w.prefill_tokens + w.num_decodes <= 68 and w.num_decodes <= 4
            return 0.001 * (w.prefill_tokens + w.num_decodes)
    c = WorkCost.from_latency_model(Small(), max_prefill_tokens=512, max_num_seqs=16)
    assert c.prefill_s == pytest.approx(0.001) and c.decode_s == pytest.approx(0.001)


def test_estimates_follow_earliest_deadline_first():
    now = 1000.0
    jobs = [JobWork("loose", now + 500, 100.0), JobWork("none", None, 50.0),
            JobWork("tight", now + 30, 20.0)]
    assert [j.job_id for j in edf_order(jobs)] == ["tight", "loose", "none"]
    est = estimate(jobs, rate=2.0, now=now, at_risk_margin=0.2)
    assert est["tight"].finish_at - now == pytest.approx(10)  # 20 units at 2/s
    assert est["tight"].slack_s == pytest.approx(20)
    assert est["loose"].finish_at - now == pytest.approx(60)  # behind tight's 20
    assert est["none"].finish_at - now == pytest.approx(85) and est["none"].slack_s is None
    assert not any(e.at_risk for e in est.values())
    # at half the rate: 10 s of slack for 20 s of work is more than 0.2 x 20 s
    est = estimate(jobs, rate=1.0, now=now, at_risk_margin=0.2)
    assert est["tight"].slack_s == pytest.approx(10) and not est["tight"].at_risk
    est = estimate(jobs, rate=0.75, now=now, at_risk_margin=0.2)  # needs 26.7 s of its 30
    assert est["tight"].slack_s == pytest.approx(30 - 20 / 0.75) and est["tight"].at_risk
    assert not est["loose"].at_risk


def test_estimates_without_history_or_harvest():
    now = 0.0
    jobs = [JobWork("a", 100.0, 10.0), JobWork("done", 50.0, 0.0)]
    est = estimate(jobs, rate=None, now=now)
    assert all(e.finish_at is None and e.slack_s is None and not e.at_risk for e in est.values())
    est = estimate(jobs, rate=0.0, now=now)
    assert est["a"].at_risk and est["a"].finish_at is None
    assert not est["done"].at_risk and est["done"].finish_at == now


def test_admission_counts_work_promised_to_earlier_deadlines():
    now = 0.0
    promised = [JobWork("early", 50.0, 60.0), JobWork("late", 1000.0, 500.0)]
    # 60 units ahead + 30 of its own at 1/s: finishes at 90, window 100 -> fits
    v = admit(promised, JobWork("new", 100.0, 30.0), rate=1.0, now=now)
    assert v.feasible and v.finish_at == pytest.approx(90.0) and v.reason == "fits"
    # the later-deadline job does not count; but at 0.5/s 90 units need 180 s
    v = admit(promised, JobWork("new", 100.0, 30.0), rate=0.5, now=now)
    assert not v.feasible and v.finish_at == pytest.approx(180.0) and "80 s" in v.reason
    # alone it would fit: the refusal is due to the promised work
    assert admit([], JobWork("new", 100.0, 30.0), rate=0.5, now=now).feasible
    v = admit(promised, JobWork("new", 100.0, 30.0), rate=None, now=now)
    assert v.feasible and v.finish_at is None and v.reason == "no harvest history"
    v = admit(promised, JobWork("new", 100.0, 30.0), rate=0.0, now=now)
    assert not v.feasible and v.finish_at is None and "forever" in v.reason
    v = admit(promised, JobWork("new", None, 30.0), rate=1.0, now=now)
    assert v.feasible and v.finish_at == pytest.approx(590.0)
    assert math.isfinite(v.finish_at)


def test_work_inside_the_engine_goes_before_unclaimed_work():
    """A loose job submitted first has its items in the engine; a tight job arriving later
    queues behind them. Plain EDF says the tight job fits; the served order says it misses,
    so it is at risk at once, while the loose job is not."""
    now = 0.0
    loose = JobWork("loose", 108.0, 50.0, in_engine=50.0)
    tight = JobWork("tight", 31.0, 15.0)
    est = estimate([loose, tight], rate=1.0, now=now)
    assert est["tight"].finish_at == pytest.approx(65.0)  # 50 in the engine, then its 15
    assert est["tight"].slack_s == pytest.approx(31.0 - 65.0) and est["tight"].at_risk
    assert est["loose"].finish_at == pytest.approx(50.0) and not est["loose"].at_risk
    # nothing in the engine: plain EDF, the tight job first and safe
    est = estimate([JobWork("loose", 108.0, 50.0), tight], rate=1.0, now=now)
    assert est["tight"].finish_at == pytest.approx(15.0) and not est["tight"].at_risk
    assert est["loose"].finish_at == pytest.approx(65.0)


def test_an_urgent_job_goes_first_but_is_judged_without_its_priority():
    """Once urgent (served first), the tight job's estimate shows the priority, but its
    at-risk flag is judged as if it had none, so it stays urgent while it needs to be; the
    jobs behind it see it ahead of them."""
    now = 0.0
    loose = JobWork("loose", 108.0, 50.0, in_engine=50.0)
    tight = JobWork("tight", 31.0, 15.0, in_engine=15.0, urgent=True)
    medium = JobWork("medium", 54.0, 20.0, in_engine=20.0)
    est = estimate([loose, tight, medium], rate=1.0, now=now)
    assert est["tight"].finish_at == pytest.approx(15.0) and est["tight"].slack_s == pytest.approx(16.0)
    assert est["tight"].at_risk  # without priority: behind 70 units of in-engine work
    assert est["medium"].finish_at == pytest.approx(85.0) and est["medium"].at_risk
    assert est["loose"].finish_at == pytest.approx(85.0) and not est["loose"].at_risk
    both = estimate([loose, tight, JobWork("medium", 54.0, 20.0, 20.0, urgent=True)], 1.0, now)
    assert both["tight"].finish_at == pytest.approx(15.0)  # EDF among urgent jobs
    assert both["medium"].finish_at == pytest.approx(35.0) and both["medium"].slack_s > 0
    assert both["loose"].finish_at == pytest.approx(85.0)
    # a job that fits without priority is not at risk, urgent flag or not: it is released
    calm = estimate([JobWork("loose", 108.0, 5.0, 5.0), JobWork("t", 31.0, 15.0, 15.0, True)],
                    1.0, now)
    assert not calm["t"].at_risk


def test_served_order_matches_a_step_by_step_simulation():
    """The prefix-sum estimate against a direct simulation of the served order on random
    job sets: urgent jobs EDF, then every other job's in-engine work, then the unclaimed
    work EDF; finish = the time its last unit is served."""
    import random

    rng = random.Random(7)
    for _ in range(200):
        jobs = []
        for i in range(rng.randint(1, 7)):
            rem = rng.choice([0.0, rng.uniform(1, 50)])
            jobs.append(JobWork(f"j{i}", rng.choice([None, rng.uniform(5, 300)]), rem,
                                in_engine=rng.choice([0.0, rem, rem * rng.random()]),
                                urgent=rng.random() < 0.3))
        est = estimate(jobs, rate=1.0, now=0.0)
        t, last = 0.0, {}
        for j in edf_order([j for j in jobs if j.urgent]):
            t += j.remaining
            last[j.job_id] = t
        calm = [j for j in jobs if not j.urgent]
        t += sum(min(j.in_engine, j.remaining) for j in calm)
        for j in calm:
            last[j.job_id] = t
        for j in edf_order(calm):
            if j.remaining - min(j.in_engine, j.remaining) > 0:
                t += j.remaining - min(j.in_engine, j.remaining)
                last[j.job_id] = t
        for j in jobs:
            want = 0.0 if j.remaining <= 0 else last[j.job_id]
            assert est[j.job_id].finish_at == pytest.approx(want), (jobs, j)


def test_generation_tail_and_hopeless_jobs():
    """A job of few items is bound by how long its items generate, not by throughput; a
    job whose own work alone, served first, ends past its deadline is hopeless (no priority
    for it), unless borrowing's gain would save it; so is one whose tail alone (its slowest
    item's generation left) ends past it. Work and tail overlap: the later of the two counts."""
    now = 0.0
    few = JobWork("few", 30.0, 10.0, tail_s=25.0)  # 10 s of work, then 25 s of generating
    est = estimate([few], rate=1.0, now=now)
    assert est["few"].finish_at == pytest.approx(35.0) and est["few"].slack_s == pytest.approx(-5)
    assert est["few"].at_risk and not est["few"].hopeless
    big = JobWork("big", 30.0, 40.0)  # 40 s of work for 30 s
    assert estimate([big], rate=1.0, now=now)["big"].hopeless
    assert not estimate([big], rate=1.0, now=now, gain=2.0)["big"].hopeless  # 20 s at 2x
    v = admit([], few, rate=1.0, now=now)
    assert not v.feasible and v.finish_at == pytest.approx(35.0)
    assert admit([], few, rate=1.0, now=now, gain=2.0).feasible
    # behind 15 units of another job in the engine it is at risk, not hopeless (alone: 5+25)
    est = estimate([JobWork("o", 99.0, 15.0, in_engine=15.0), JobWork("f", 40.0, 5.0, tail_s=25.0)],
                   rate=1.0, now=now)
    assert est["f"].at_risk and not est["f"].hopeless
    slow = JobWork("slow", 20.0, 5.0, tail_s=25.0)  # 5 s of work, its last item 25 s more
    assert estimate([slow], rate=1.0, now=now)["slow"].hopeless
    assert not estimate([slow], rate=1.0, now=now, gain=2.0)["slow"].hopeless  # 12.5 s
    # judged at the fastest pace seen (tail_min_s): late at the usual pace, not lost
    busy = estimate([JobWork("busy", 20.0, 5.0, tail_s=25.0, tail_min_s=12.0)], 1.0, now)["busy"]
    assert busy.at_risk and not busy.hopeless and busy.finish_at == pytest.approx(30.0)
    # urgent, it generates faster (tail_s 5 s: fits), but at risk is judged at the tail it
    # would have without priority (25 s: late), so the flag does not drop because of it
    lead = JobWork("lead", 20.0, 5.0, urgent=True, tail_s=5.0, tail_alone_s=25.0)
    e = estimate([lead], 1.0, now)["lead"]
    assert e.finish_at == pytest.approx(10.0) and e.at_risk and not e.hopeless
    assert not estimate([JobWork("lead", 20.0, 5.0, urgent=True, tail_s=5.0)], 1.0, now)[
        "lead"].at_risk
    # its work at the harvest rate (a mean over generating-only phases too) ends past its
    # deadline, but served first it is done in its burst: 4 prompt units at 2 a second,
    # then its 5 s tail, 7 s of a 20 s window: not hopeless (nor without a prompt rate)
    few = JobWork("few", 20.0, 30.0, tail_s=5.0, prompt_left=4.0)
    assert estimate([few], 1.0, now)["few"].hopeless
    e = estimate([few], 1.0, now, prompt_rate=2.0)["few"]
    assert e.at_risk and not e.hopeless
    # a burst that ends past the deadline too keeps it hopeless
    assert estimate([few], 1.0, now, prompt_rate=0.2)["few"].hopeless


def test_prompt_rate_counts_the_seconds_prompts_went_in():
    """Offline work alternates between prompts going in and items only generating: the
    prompt rate is the prompt units over the intervals with prompt progress, where the
    harvest rate averages over both; too little such time falls back to the harvest rate."""
    m = HarvestMeter(WorkCost(prefill_s=1.0, decode_s=1.0), window_s=100.0, min_span_s=2.0)
    m.observe(0.0, 0, 0, True)
    m.observe(1.0, 50, 0, True)  # 50 prompt tokens in 1 s
    assert m.prompt_rate() is None and m.rate() is None  # no history
    m.observe(5.0, 50, 8, True)  # 4 s of generating only
    assert m.prompt_rate() == m.rate() == pytest.approx(58 / 5)  # 1 s of prompts: too little
    m.observe(6.0, 100, 10, True)  # 50 more prompt tokens (and 2 generated) in 1 s
    assert m.rate() == pytest.approx(110 / 6)
    assert m.prompt_rate() == pytest.approx(100 / 2)
    # 200 s of items only generating: the harvest window holds none of the prompt time,
    # but the prompt rate is the rate prompts go in at when they do, kept until they do
    m.observe(206.0, 100, 210, True)
    assert m.rate() == pytest.approx(200 / 200)
    assert m.prompt_rate() == pytest.approx(100 / 2)
    m.observe(207.0, 110, 210, True)  # the next prompt second counts in
    assert m.prompt_rate() == pytest.approx(110 / 3)
    m2 = HarvestMeter(WorkCost(), window_s=2.0, min_span_s=1.0)  # its own window: 2 s
    for t in range(5):
        m2.observe(float(t), 10 * t * (t + 1) // 2, 0, True)  # 10, 20, 30, 40 a second
    assert m2.prompt_rate() == pytest.approx((30 + 40) / 2)


def test_prompt_rate_is_per_prompt_iteration_second_over_the_duty():
    """Timed iterations: prompts go in at their units per second of offline iterations
    with a prompt in them, over wall time by the share of it in offline iterations (an
    online burst holds prompts back), not only over the seconds in which some went in."""
    m = HarvestMeter(WorkCost(prefill_s=1.0, decode_s=1.0), window_s=100.0, min_span_s=2.0)
    m.observe(0.0, 0, 0, True, free=(0, 0.0), busy_s=0.0)
    # 4 s: 2 s of prompt iterations (100 prompt units), 1 s of free ones (10 tokens),
    # 1 s of online work alone
    m.observe(4.0, 100, 10, True, free=(10, 1.0), busy_s=3.0)
    assert m.duty() == pytest.approx(3 / 4)
    assert m.prompt_rate() == pytest.approx(100 / 2 * 3 / 4)
    # 4 s of online work alone with prompts waiting: no prompt second, the duty falls
    m.observe(8.0, 100, 10, True, free=(10, 1.0), busy_s=3.0)
    assert m.prompt_rate() == pytest.approx(100 / 2 * 3 / 8)
    # never below the harvest rate (units are dedicated-engine seconds): 40 s of items
    # generating 20 units a second in 8 s of offline iterations (duty 11 / 48)
    m.observe(48.0, 100, 810, True, free=(90, 9.0), busy_s=11.0)
    assert m.rate() == pytest.approx(910 / 48)
    assert 100 / 2 * 11 / 48 < m.rate() == pytest.approx(m.prompt_rate())
    # seconds prompts went in, wall time: the old measure would say 100 / 4 before, and
    # still 100 / 4 after the stall
    m2 = HarvestMeter(WorkCost(), window_s=100.0, min_span_s=2.0)
    m2.observe(0.0, 0, 0, True)
    m2.observe(4.0, 100, 10, True)
    m2.observe(8.0, 100, 10, True)
    assert m2.prompt_rate() == pytest.approx(100 / 4)


def test_urgent_jobs_are_done_in_bursts_one_after_another():
    """An urgent job is done at the later of its work at the harvest rate and its burst:
    the urgent jobs due before it, each its prompts at the prompt rate and its tail, then
    its own; a calm job keeps work then tail."""
    a = JobWork("a", 100.0, remaining=6.0, urgent=True, tail_s=5.0, prompt_left=4.0)
    b = JobWork("b", 200.0, remaining=8.0, urgent=True, tail_s=5.0, prompt_left=6.0)
    calm = JobWork("c", 300.0, remaining=20.0, tail_s=5.0, prompt_left=16.0)
    est = estimate([b, a, calm], rate=0.5, now=0.0, prompt_rate=2.0)
    # a: its 6 units at 0.5 a second, 12 s, against its burst 4 / 2 + 5 = 7 s
    assert est["a"].finish_at == pytest.approx(12.0)
    # b: 14 units, 28 s, against a's burst and its own, 7 + 6 / 2 + 5 = 15 s
    assert est["b"].finish_at == pytest.approx(28.0)
    fast = estimate([b, a, calm], rate=2.0, now=0.0, prompt_rate=2.0)
    assert fast["a"].finish_at == pytest.approx(7.0)  # its burst binds now: 6 units are 3 s
    assert fast["b"].finish_at == pytest.approx(15.0)
    assert fast["c"].finish_at == pytest.approx(34 / 2.0 + 5.0)  # calm: work, then tail
    # without a prompt rate, or nothing urgent: work then tail, as before
    assert estimate([b, a, calm], rate=2.0, now=0.0)["a"].finish_at == pytest.approx(3.0 + 5.0)
    # admission: a new job urgent on arrival, done in its burst unless the work binds
    new = JobWork("new", 150.0, remaining=6.0, tail_s=5.0, prompt_left=4.0)
    assert admit([a, calm], new, 2.0, 0.0, burst_s=9.0).finish_at == pytest.approx(9.0)
    assert admit([a, calm], new, 0.5, 0.0, burst_s=9.0).finish_at == pytest.approx(24.0)


def test_free_period_is_the_engines_time_per_free_iteration():
    """The engine's seconds per iteration that generated offline tokens with no offline
    prompt in it, from its cumulative counters: too few such iterations: unknown; kept over
    stretches without any; counters going back forget it; no counters: unknown."""
    m = HarvestMeter(WorkCost(), window_s=10.0, min_span_s=1.0)
    m.observe(0.0, 0, 0, True, free=(0, 0.0))
    m.observe(1.0, 512, 2, True, free=(5, 1.0))  # 5 free iterations in 1.0 s: 0.2 s
    assert m.free_period() is None  # 5 iterations: too few yet
    m.observe(2.0, 1024, 4, False, free=(10, 2.0))  # also across a reading not backlogged
    assert m.free_period() == pytest.approx(0.2)
    for t in range(3, 30):  # 27 s of prompts only: no free iteration, the value stands
        m.observe(float(t), 512 * t, 4, True, free=(10, 2.0))
    assert m.free_period() == pytest.approx(0.2)
    m.observe(30.0, 512 * 30, 40, True, free=(110, 12.0))  # 100 at 0.1 s: the window is 10 s
    assert m.free_period() == pytest.approx(0.1)
    m.observe(31.0, 10, 5, True, free=(1, 0.1))  # the engine restarted: counters went back
    assert m.free_period() is None and m.rate() is None
    m2 = HarvestMeter(WorkCost(), window_s=10.0, min_span_s=1.0)
    m2.observe(0.0, 0, 0, True)
    m2.observe(1.0, 0, 50, True)
    assert m2.free_period() is None


def test_a_jobs_own_output_during_its_tail_is_counted_once():
    """A job's items generate beside its slowest one during its tail: its estimated
    finish is the later of all its work at the rate and the rest of it then the tail,
    while at risk keeps the cautious sum (work, then tail)."""
    now = 0.0
    # 10 units of prompts + 10 of output at 1 a second, a 15 s tail
    few = JobWork("few", 40.0, 20.0, tail_s=15.0, tail_overlap=10.0)
    e = estimate([few], 1.0, now, at_risk_margin=0.2)["few"]
    assert e.finish_at == pytest.approx(10.0 + 15.0)  # not 20 + 15
    assert e.at_risk  # judged on 20 + 15 = 35: slack 5 < 0.2 x 35
    # the tail shorter than its output at the rate: all the work bounds it
    short = JobWork("short", None, 20.0, tail_s=4.0, tail_overlap=10.0)
    assert estimate([short], 1.0, now)["short"].finish_at == pytest.approx(20.0)
    # behind 30 units of another job due sooner: its overlap only comes off its own
    first = JobWork("first", 10.0, 30.0)
    assert estimate([first, few], 1.0, now)["few"].finish_at == pytest.approx(40.0 + 15.0)
    v = admit([first], few, rate=1.0, now=now)
    assert v.finish_at == pytest.approx(40.0 + 15.0) and not v.feasible
    assert admit([], few, rate=1.0, now=now).finish_at == pytest.approx(25.0)
