"""The runner's layer grouping: one jitted call per layer, per safepoint interval, or for the
whole model gives the same tokens and logprobs and writes the same KV; safepoints are
called after every `safepoint_interval` layers (also 1) and abandoning returns None."""
import jax
import numpy as np
import pytest

from conserve_jax.config import CacheConfig, ConserveConfig, EngineConfig
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.model_runner import ModelRunner, default_layers_per_call, group_sizes
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan


@pytest.fixture(scope="module")
def loaded():
    return load_model("random:tiny", seed=3)


def _runner(loaded, layers_per_call=None, interval=2):
    cfg = EngineConfig(model="random:tiny", max_model_len=128, max_num_seqs=4,
                       max_prefill_tokens=32,
                       cache=CacheConfig(block_size=16, num_blocks=32),
                       conserve=ConserveConfig(safepoint_interval=interval))
    return ModelRunner(loaded.config, loaded.params, cfg, layers_per_call)


def _plans():
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, 5)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 200, 40)]
    first = StepPlan(prefills=[PrefillItem(prompt[:32], 0, [1, 2, 3, 4])])
    second = StepPlan(prefills=[PrefillItem(prompt[32:], 32, [1, 2, 3, 4], spec)],
                      decodes=[DecodeItem(9, 20, [5, 6], spec)])
    third = StepPlan(decodes=[DecodeItem(11, 40, [1, 2, 3, 4], spec),
                              DecodeItem(12, 21, [5, 6], spec)])
    return [first, second, third]


def _run(runner, safepoint=None):
    out = []
    for plan in _plans():
        res = runner.execute(plan, safepoint)
        out.append([(t.token, t.logprob, t.top) for t in res.tokens])
    return out, [np.asarray(k) for k, _ in runner.caches]


def test_group_sizes():
    assert group_sizes(30, 4) == [4] * 7 + [2]
    assert group_sizes(30, 30) == [30]
    assert group_sizes(5, 1) == [1] * 5


def test_default_grouping_is_three_calls_and_no_unused_executables(loaded):
    assert [default_layers_per_call(n) for n in (30, 32, 24, 2, 1)] == [10, 11, 8, 1, 1]
    assert group_sizes(32, default_layers_per_call(32)) == [11, 11, 10]
    small = load_model("random:small", seed=3)  # 4 layers: default calls of 2
    runner = _runner(small, interval=None)  # no safepoints: only the default groups exist
    assert runner.fast_groups == [2, 2]
    assert set(runner._groups) == {2}
    assert set(_runner(small, interval=1)._groups) == {1, 2}
    assert set(_runner(small, layers_per_call=4, interval=None)._groups) == {4}


def test_grouping_does_not_change_results(loaded):
    ref_tokens, ref_kv = _run(_runner(loaded, layers_per_call=1))
    n = loaded.config.num_layers
    flat = lambda rows: [x for row in rows for x in row]
    for per_call in (n,):  # the whole model in one call
        tokens, kv = _run(_runner(loaded, layers_per_call=per_call))
        assert [t for t, _, _ in flat(tokens)] == [t for t, _, _ in flat(ref_tokens)]
        np.testing.assert_allclose([lp for _, lp, _ in flat(tokens)],
                                   [lp for _, lp, _ in flat(ref_tokens)], atol=1e-5)
        for (_, _, top), (_, _, ref_top) in zip(flat(tokens), flat(ref_tokens)):
            assert [i for i, _ in top] == [i for i, _ in ref_top]
        for a, b in zip(kv, ref_kv):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # with a safepoint that never abandons: same again, checked after every interval
    calls = []
    tokens, _ = _run(_runner(loaded, interval=1), lambda done: calls.append(done) or False)
    assert [t for t, _, _ in flat(tokens)] == [t for t, _, _ in flat(ref_tokens)]
    assert calls == list(range(1, n)) * 3


def test_safepoint_abandon_returns_none(loaded):
    runner = _runner(loaded, interval=1)
    seen = []
    assert runner.execute(_plans()[0], lambda done: seen.append(done) or done == 1) is None
    assert seen == [1]
    jax.block_until_ready(runner.caches)  # the caches stay usable after abandoning
    assert runner.execute(_plans()[0]) is not None
