"""Sampling: the device sampler's distributions, seeds, filters and logprobs; stop
conditions and finish reasons through the offline API."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conserve_jax import LLM, SamplingParams
from conserve_jax.runtime.sampler import sample


def _rows(n, temperature=1.0, top_k=0, top_p=1.0):
    return (jnp.full(n, temperature, jnp.float32), jnp.full(n, top_k, jnp.int32),
            jnp.full(n, top_p, jnp.float32), jnp.full(n, 7, jnp.uint32),
            jnp.arange(n, dtype=jnp.int32))


LOGITS = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.0625, 0.0625], jnp.float32))


def _freq(mode, n=8000, **kw):
    logits = jnp.broadcast_to(LOGITS, (n, 5))
    toks, *_ = jax.jit(sample, static_argnames=("mode", "num_top"))(
        logits, *_rows(n, **kw), mode=mode, num_top=0)
    return np.bincount(np.asarray(toks), minlength=5) / n


def test_temperature_sampling_follows_softmax():
    f = _freq("sample")
    np.testing.assert_allclose(f, np.exp(np.asarray(LOGITS)), atol=0.02)
    hot = _freq("sample", temperature=2.0)
    p = np.exp(np.asarray(LOGITS) / 2)
    np.testing.assert_allclose(hot, p / p.sum(), atol=0.02)


def test_top_k_and_top_p_cut_the_tail():
    f = _freq("filter", top_k=2)
    assert f[2:].sum() == 0 and abs(f[0] - 2 / 3) < 0.02
    f = _freq("filter", top_p=0.7)  # nucleus: 0.5 + 0.25 reaches 0.7
    assert f[2:].sum() == 0 and abs(f[0] - 2 / 3) < 0.02
    f = _freq("filter", top_p=0.1)
    assert f[0] == 1.0


def test_logprobs_are_of_the_raw_distribution():
    toks, chosen, top_ids, top_lp = sample(LOGITS[None], *_rows(1, temperature=0.0),
                                           mode="greedy", num_top=3)
    assert int(toks[0]) == 0
    np.testing.assert_allclose(float(chosen[0]), np.log(0.5), rtol=1e-5)
    assert list(np.asarray(top_ids[0])) == [0, 1, 2]
    np.testing.assert_allclose(np.asarray(top_lp[0]), np.log([0.5, 0.25, 0.125]), rtol=1e-5)


@pytest.fixture(scope="module")
def llm():
    with LLM(warmup=False, model="random:tiny", max_model_len=256, max_num_seqs=8, max_prefill_tokens=64,
             num_blocks=256) as llm:
        yield llm


def test_seeded_sampling_is_reproducible_across_batches(llm):
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    alone = llm.generate(["hello there"], sp)[0].token_ids
    mixed = llm.generate(["other", "hello there", "a much longer prompt than the others"],
                         [SamplingParams(max_tokens=5, temperature=1.0), sp,
                          SamplingParams(max_tokens=20, temperature=0.5, top_k=3)])
    assert mixed[1].token_ids == alone
    other_seed = llm.generate(["hello there"], SamplingParams(max_tokens=12, temperature=1.0,
                                                              top_p=0.9, seed=43))[0]
    assert other_seed.token_ids != alone


def test_top_k_one_is_greedy(llm):
    g = llm.generate(["abc"], SamplingParams(max_tokens=10, temperature=0.0))[0]
    k1 = llm.generate(["abc"], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3))[0]
    assert g.token_ids == k1.token_ids


def test_logprobs_top_n(llm):
    out = llm.generate(["abc"], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0] == (tok, pytest.approx(lp.logprob))
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    none = llm.generate(["abc"], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert none.logprobs is None


def test_stop_conditions(llm):
    base = llm.generate(["xyz"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    # stop token id: generation ends at its first occurrence, inclusive
    t = base.token_ids[5]
    first = base.token_ids.index(t)
    out = llm.generate(["xyz"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                               stop_token_ids=[t]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    # stop string: the text is cut before it and never contains it
    if len(base.text) > 6:
        s = base.text[3:6]
        out = llm.generate(["xyz"], SamplingParams(max_tokens=20, temperature=0.0,
                                                   ignore_eos=True, stop=[s]))[0]
        assert out.finish_reason == "stop"
        assert out.text == base.text[: base.text.index(s)]


def test_eos_ends_generation_unless_ignored(llm):
    base = llm.generate(["q"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    t = base.token_ids[4]
    saved = llm.engine.outputs.eos
    llm.engine.outputs.eos = {t}  # make a token the greedy path reaches the model's EOS
    try:
        out = llm.generate(["q"], SamplingParams(max_tokens=12, temperature=0.0))[0]
        ignored = llm.generate(["q"], SamplingParams(max_tokens=12, temperature=0.0,
                                                     ignore_eos=True))[0]
    finally:
        llm.engine.outputs.eos = saved
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: base.token_ids.index(t) + 1]
    assert ignored.token_ids == base.token_ids and ignored.finish_reason == "length"


def test_bad_input_raises_value_error_naming_the_field(llm):
    cases = [
        ({"prompts": [""]}, "prompt"),
        ({"prompts": [[]]}, "prompt"),
        ({"prompts": [[1] * 400]}, "prompt"),
        ({"prompts": [[100000]]}, "vocabulary"),
        ({"prompts": ["x"], "sampling_params": SamplingParams(max_tokens=-1)}, "max_tokens"),
        ({"prompts": ["x"], "sampling_params": SamplingParams(top_p=0.0)}, "top_p"),
        ({"prompts": ["x"], "sampling_params": SamplingParams(top_p=1.5)}, "top_p"),
        ({"prompts": ["x"], "sampling_params": SamplingParams(temperature=-1)}, "temperature"),
    ]
    for kw, word in cases:
        with pytest.raises(ValueError, match=word):
            llm.generate(**kw)
