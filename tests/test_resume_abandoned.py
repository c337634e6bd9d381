"""Resume-from-layer: an iteration abandoned at a safepoint is continued later from the
layer where it stopped instead of being recomputed.

- Runner: abandon at layer k, run other iterations, resume: the same tokens, logprobs and
  KV as the iteration run through (also when stopped twice, and with grouped layers).
- Runner: decode rows cut loose (`detach_decodes`) no longer write their sequences' KV.
- Scheduler: a parked iteration's prefill sequences stay out of new plans while its
  decodes run on; it is handed back intact, or discarded (tokens counted) when a kept
  sequence is evicted, removed or loses the blocks it wrote to; online work short of KV
  or slots evicts its sequences last.
- Policy: a resumed iteration's safepoints measure the layer time of the resumed part.
Deterministic: no timing assertions (the engine-level check is in test_coserve.py).
"""
import jax
import numpy as np
import pytest

from conserve_jax.config import CacheConfig, ConserveConfig, EngineConfig
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan
from tests.test_coserve_isolation import FakeClock, commit, make_sched, make_seq


@pytest.fixture(scope="module")
def loaded():
    return load_model("random:small", seed=5)  # 4 layers


def _runner(loaded, interval=1):
    cfg = EngineConfig(model="random:small", max_model_len=128, max_num_seqs=4,
                       max_prefill_tokens=32,
                       cache=CacheConfig(block_size=16, num_blocks=32),
                       conserve=ConserveConfig(safepoint_interval=interval))
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
    # every block but the scratch block 0, where padding rows write garbage in whatever
    # order the iterations ran (it is never read as context)
    for a, b in zip([np.asarray(k) for k, _ in r.caches], ref_kv):
        np.testing.assert_allclose(a[:, 1:], b[:, 1:], atol=1e-5)


def test_detached_decode_rows_leave_their_blocks_alone(loaded):
    """A decode cut loose from a suspended iteration runs on in another iteration; the
    resumed iteration then neither overwrites that sequence's KV nor changes the kept
    prefill chunk's result."""
    ref_tokens, _ = _reference(loaded, 1)
    own = StepPlan(decodes=[DecodeItem(77, 20, [5, 6], SPEC)])  # the decode, run on its own
    solo = _runner(loaded)
    solo.execute(FIRST)
    solo.execute(own)
    want = [(np.asarray(k)[:, 6, 4], np.asarray(v)[:, 6, 4]) for k, v in solo.caches]
    r = _runner(loaded)
    r.execute(FIRST)
    assert r.execute(OFFLINE, lambda done: done == 2) is None
    it = r.detach_decodes(r.take_suspended(), [0])
    r.execute(own)  # the detached sequence's next decode, at the same position
    res = r.resume(it)
    assert [t.token for t in res.tokens][1] == ref_tokens[1][0]  # the prefill row's token
    for (k, v), (wk, wv) in zip(r.caches, want):  # position 20 = block 6, offset 4
        np.testing.assert_allclose(np.asarray(k)[:, 6, 4], wk, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v)[:, 6, 4], wv, atol=1e-6)


def _parked_sched():
    """An offline-only step (a decode of `dec`, a prefill chunk of `pre`) planned, run and
    parked at a safepoint."""
    sched, pol = make_sched(1.2)
    dec = make_seq("dec", 100, online=False)
    sched.add(dec)
    commit(sched, sched.schedule())  # its prompt: it decodes from now on
    pre = make_seq("pre", 300, online=False)
    sched.add(pre)
    step = sched.schedule()
    assert [(e.seq, e.decode) for e in step.entries] == [(dec, True), (pre, False)]
    handle = object()
    sched.park(step, handle)
    return sched, pol, step, handle


def test_parked_prefill_waits_and_the_decode_runs_on():
    sched, _, step, handle = _parked_sched()
    dec, pre = step.entries[0].seq, step.entries[1].seq
    assert sched.counters.preempted_tokens_discarded == 1  # the decode, cut loose
    sched.add(make_seq("on", 40, online=True))
    nxt = sched.schedule()
    seqs = [e.seq for e in nxt.entries]
    assert nxt.has_online and dec in seqs and pre not in seqs
    commit(sched, nxt)
    n_dec = dec.num_computed
    p = sched.take_parked()
    assert p is not None and p.step is step and p.handle is handle
    before = pre.num_computed
    commit(sched, step)  # resumed and finished: the chunk is committed, the decode is not
    assert sched.parked is None
    assert pre.num_computed == before + step.entries[1].num_tokens
    assert dec.num_computed == n_dec
    c = sched.counters
    assert (c.preemptions, c.preemptions_resumed, c.preempted_tokens_discarded) == (1, 1, 1)


@pytest.mark.parametrize("how", ["evict", "remove", "blocks_changed", "abandon"])
def test_parked_iteration_is_discarded_when_its_sequences_change(how):
    sched, _, step, _ = _parked_sched()
    seq = step.entries[1].seq  # the kept prefill
    if how == "evict":
        sched.evict(seq)
    elif how == "remove":
        sched.remove(seq)
    elif how == "blocks_changed":  # e.g. a KV planner trimmed the blocks it wrote to
        sched.kv.trim(seq.request_id, 0)
        sched.kv.grow(seq.request_id, False, seq.num_computed + step.entries[1].num_tokens)
        assert sched.parked is not None
    else:  # the resumed iteration failed
        sched.abandon(step)
    assert sched.take_parked() is None and sched.parked is None
    c = sched.counters
    assert c.preempted_tokens_discarded == step.plan.num_tokens and c.preemptions_resumed == 0
    if how != "remove":  # schedulable again, from what it committed
        assert seq in [e.seq for e in sched.schedule().entries] or seq.status.value == "waiting"


@pytest.mark.parametrize("short_of", ["blocks", "slots"])
def test_online_work_evicts_a_parked_iterations_sequences_last(short_of):
    """An online arrival short of KV blocks (or of sequence slots) evicts the offline
    sequence outside the parked iteration, though the parked one started later: the
    parked work survives and is handed back intact."""
    sched, _, step, _ = _parked_sched()
    dec, pre = step.entries[0].seq, step.entries[1].seq
    if short_of == "blocks":  # take every free block but what `dec` would give back
        hog = make_seq("hog", 16 * (sched.kv.num_free - 1), online=False)
        assert sched.kv.grow("hog", False, len(hog.token_ids))
    else:
        sched.cfg.max_num_seqs = len(sched.running)
    on = make_seq("on", 40, online=True)
    sched.add(on)
    nxt = sched.schedule()
    assert [e.seq for e in nxt.entries] == [on]
    assert dec.status.value == "waiting" and pre.status.value == "running"
    assert sched.counters.evictions == 1
    assert sched.take_parked() is not None and sched.parked.step is step
    assert sched.counters.preempted_tokens_discarded == 1  # only the detached decode


def test_detached_decode_changing_does_not_discard():
    sched, _, step, _ = _parked_sched()
    sched.remove(step.entries[0].seq)  # the detached decode's request ends
    assert sched.take_parked() is not None


def test_blocks_grown_while_parked_keep_it_intact():
    sched, _, step, _ = _parked_sched()
    seq = step.entries[1].seq
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
