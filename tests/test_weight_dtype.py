"""`weight_dtype=bfloat16`: matmul weights stored in bfloat16 (inputs rounded to it,
float32 accumulation), everything else float32. Logprobs stay within a stated tolerance
of the float32 runner; weights take half the memory; batch-1 rows are padded, not sent
down XLA:CPU's slow narrow path (same results for 1 and 8 rows)."""
import jax.numpy as jnp
import numpy as np
import pytest

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.models.llama import MIN_LOW_PRECISION_ROWS, project
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan

# bfloat16 keeps 8 mantissa bits: rounding weights and matmul inputs moves the logprobs of
# the tiny random model by ~1e-2; this is the tolerance docs/configuration.md states for the option
LOGPROB_ATOL = 0.05


@pytest.fixture(scope="module")
def loaded():
    return load_model("random:tiny", seed=5)


def _runner(loaded, weight_dtype=None):
    cfg = EngineConfig(model="random:tiny", max_model_len=128, max_num_seqs=4,
                       max_prefill_tokens=32, weight_dtype=weight_dtype,
                       cache=CacheConfig(block_size=16, num_blocks=32))
    return ModelRunner(loaded.config, loaded.params, cfg)


def _top_logprobs(runner):
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, 5)
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 200, 40)]
    plans = [StepPlan(prefills=[PrefillItem(prompt[:32], 0, [1, 2, 3, 4])]),
             StepPlan(prefills=[PrefillItem(prompt[32:], 32, [1, 2, 3, 4], spec)]),
             StepPlan(decodes=[DecodeItem(11, 40, [1, 2, 3, 4], spec)])]
    out = []
    for plan in plans:
        res = runner.execute(plan)
        out += [dict(t.top) for t in res.tokens]
    return out


def test_bf16_weights_stay_within_tolerance_and_halve_memory(loaded):
    ref, low = _runner(loaded), _runner(loaded, "bfloat16")
    assert low.layers[0]["gate_up"].dtype == jnp.bfloat16
    assert low.layers[0]["input_norm"].dtype == jnp.float32  # norms stay in --dtype
    assert low.caches[0][0].dtype == jnp.float32  # and so does the KV cache
    assert low.layers[0]["qkv"].nbytes * 2 == ref.layers[0]["qkv"].nbytes
    ref_top, low_top = _top_logprobs(ref), _top_logprobs(low)
    assert len(ref_top) == len(low_top) == 2
    for r, lo in zip(ref_top, low_top):
        common = set(r) & set(lo)
        assert len(common) >= 3  # the top-5 sets mostly agree
        for tok in common:
            assert abs(r[tok] - lo[tok]) < LOGPROB_ATOL
        assert max(r.values()) != pytest.approx(max(lo.values()), abs=0)  # really bf16


def test_project_pads_narrow_rows_without_changing_them():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((MIN_LOW_PRECISION_ROWS, 16)), jnp.float32)
    full = np.asarray(project("th,ho->to", x, w))
    one = np.asarray(project("th,ho->to", x[:1], w))
    assert one.shape == (1, 24) and one.dtype == np.float32
    np.testing.assert_allclose(one[0], full[0], rtol=1e-6, atol=1e-6)
    same = project("th,ho->to", x, w.astype(jnp.float32))  # no rounding when dtypes match
    np.testing.assert_allclose(np.asarray(same), np.asarray(x) @ np.asarray(w, np.float32),
                               rtol=1e-5, atol=1e-5)
