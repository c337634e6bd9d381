"""Resume-from-layer: an iteration abandoned at a safepoint is continued later from the
layer where it stopped instead of being recomputed.

- Runner: abandon at layer k, run other iterations, resume: the same tokens, logprobs and
  KV as the iteration run through (also when stopped twice, and with grouped layers).
- Scheduler: a parked iteration's sequences stay out of new plans; it is handed back
  intact, or discarded (tokens counted) when one of its sequences is evicted, removed or
  loses the blocks it wrote to.
- Policy: a resumed iteration's safepoints measure the layer time of the resumed part.
Deterministic: no timing assertions (the engine-level check is in test_coserve.py).
"""
import jax
import numpy as np
import pytest

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan
from tests.test_coserve_isolation import FakeClock, commit, make_sched, make_seq


@pytest.fixture(scope="module")
def loaded():
    return load_model("random:small", seed=5)  # 4 layers


def _runner(loaded, interval=1):
    cfg = EngineConfig(model="random:small", max_model_len=128, max_num_seqs=4,
                       max_prefill_tokens=32, safepoint_interval=interval,
                       cache=CacheConfig(block_size=16, num_blocks=32))
    return ModelRunner(loaded.config, loaded.params, cfg)


SPEC = SampleSpec(0.0, 0, 1.0, 0, 0, 5)
PROMPT = [int(t) for t in np.random.default_rng(1).integers(3, 200, 40)]
# an offline iteration (a prefill chunk that samples, and a decode), and an unrelated
# iteration on other blocks that runs while the first one is suspended
FIRST = StepPlan(prefills=[PrefillItem(PROMPT[:32], 0, [1, 2])])
OFFLINE = StepPlan(prefills=[PrefillItem(PROMPT[32:], 32, [1, 2, 3], SPEC)],
                   decodes=[DecodeItem(9, 20, [5, 6], SPEC)])
OTHER = StepPlan(prefills=[PrefillItem(PROMPT[:24], 0, [10, 11], SPEC)])


def _tokens(res):
    return [(t.token, t.logprob, [i for i, _ in t.top]) for t in res.tokens]


def _reference(loaded, interval):
    r = _runner(loaded, interval)
    r.execute(FIRST)
    res = r.execute(OFFLINE)
    r.execute(OTHER)
    return _tokens(res), [np.asarray(k) for k, _ in r.caches]


@pytest.mark.parametrize("interval,stops", [(1, [2]), (1, [1, 3]), (2, [2])])
def test_resumed_iteration_equals_the_uninterrupted_one(loaded, interval, stops):
    ref_tokens, ref_kv = _reference(loaded, interval)
    r = _runner(loaded, interval)
    r.execute(FIRST)
    seen = []
    assert r.execute(OFFLINE, lambda done: seen.append(done) or done == stops[0]) is None
    it = r.take_suspended()
    assert it.layers_done == stops[0] and r.take_suspended() is None
    r.execute(OTHER)  # other work runs while it is suspended
    for stop in stops[1:]:  # stopped again after resuming
        assert r.resume(it, lambda done: seen.append(done) or done == stop) is None
        it = r.take_suspended()
        assert it.layers_done == stop
    res = r.resume(it, lambda done: seen.append(done) or False)
    n = loaded.config.num_layers
    # every check once, each resumed part starting right after the layer it stopped at
    bounds = [0] + stops + [n - 1]
    assert seen == [d for a, b in zip(bounds, bounds[1:])
                    for d in range(a + interval, b + 1, interval) if d < n]
    tokens = _tokens(res)
    assert [t[0] for t in tokens] == [t[0] for t in ref_tokens]
    assert [t[2] for t in tokens] == [t[2] for t in ref_tokens]
    np.testing.assert_allclose([t[1] for t in tokens], [t[1] for t in ref_tokens], atol=1e-5)
    jax.block_until_ready(r.caches)
    for a, b in zip([np.asarray(k) for k, _ in r.caches], ref_kv):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _parked_sched():
    """An offline-only step planned, run and parked at a safepoint."""
    sched, pol = make_sched(1.2)
    for i in range(2):
        sched.add(make_seq(f"off{i}", 300, online=False))
    step = sched.schedule()
    assert step.entries and not step.has_online
    handle = object()
    sched.park(step, handle)
    return sched, pol, step, handle


def test_parked_sequences_stay_out_of_new_plans():
    sched, _, step, handle = _parked_sched()
    parked = {id(e.seq) for e in step.entries}
    sched.add(make_seq("on", 40, online=True))
    sched.add(make_seq("off-late", 100, online=False))
    nxt = sched.schedule()
    assert nxt.has_online and not parked & {id(e.seq) for e in nxt.entries}
    commit(sched, nxt)
    p = sched.take_parked()
    assert p is not None and p.step is step and p.handle is handle
    before = [e.seq.num_computed for e in step.entries]
    commit(sched, step)  # resumed and finished: committed as planned
    assert sched.parked is None
    assert [e.seq.num_computed for e in step.entries] == [b + e.num_tokens for b, e in
                                                          zip(before, step.entries)]
    c = sched.counters
    assert (c.preemptions, c.preemptions_resumed, c.preempted_tokens_discarded) == (1, 1, 0)


@pytest.mark.parametrize("how", ["evict", "remove", "blocks_changed", "abandon"])
def test_parked_iteration_is_discarded_when_its_sequences_change(how):
    sched, _, step, _ = _parked_sched()
    seq = step.entries[0].seq
    if how == "evict":
        sched.evict(seq)
    elif how == "remove":
        sched.remove(seq)
    elif how == "blocks_changed":  # e.g. a KV planner trimmed the blocks it wrote to
        sched.kv.trim(seq.request_id, 0)
        sched.kv.grow(seq.request_id, False, seq.num_computed + step.entries[0].num_tokens)
        assert sched.parked is not None
    else:  # the resumed iteration failed
        sched.abandon(step)
    assert sched.take_parked() is None and sched.parked is None
    c = sched.counters
    assert c.preempted_tokens_discarded == step.plan.num_tokens and c.preemptions_resumed == 0
    # the other sequences are schedulable again, from what they committed
    nxt = sched.schedule()
    others = {id(e.seq) for e in step.entries[1:]}
    assert others <= {id(e.seq) for e in nxt.entries}


def test_blocks_grown_while_parked_keep_it_intact():
    sched, _, step, _ = _parked_sched()
    seq = step.entries[0].seq
    assert sched.kv.grow(seq.request_id, False, 16 * (sched.kv.num_blocks(seq.request_id) + 2))
    assert sched.take_parked() is not None


def test_resumed_safepoints_measure_the_resumed_layers():
    clock, waiting = FakeClock(), []
    sched, pol = make_sched(1.2, waiting, clock)
    sched.add(make_seq("off", 300, online=False))
    step = sched.schedule()
    pol._not_placed = {id(s) for s in waiting}
    sp = pol.safepoints(step, start_layer=3)
    clock.t += 0.02
    waiting.append(make_seq("on", 40, online=True, arrival=clock.t))
    assert sp.check(5) is True  # two layers in 0.02 s: 0.01 s each
    assert pol.preemption_log.layer_times_s == [pytest.approx(0.01)]
    assert pol.preemption_log.layers_done == [5]
