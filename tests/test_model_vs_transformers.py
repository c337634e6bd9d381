"""The engine against transformers in float32: greedy tokens identical, logprobs of the
greedy tokens within 1e-4, over a 64-token prompt and 32 decoded tokens; alone, batched
with other requests of different lengths, and tensor-parallel on fake CPU devices."""
import numpy as np
import pytest

from conserve_jax import LLM, SamplingParams
from tests.transformers_ref import greedy_reference, load_hf, random_prompt

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, logprobs=0, ignore_eos=True)


def _check(out, ref_toks, ref_lps):
    assert out.token_ids == ref_toks
    got = np.array([lp.logprob for lp in out.logprobs])
    np.testing.assert_allclose(got, ref_lps, atol=1e-4, rtol=0)


def _llm(path, **kw):
    base = dict(max_model_len=512, max_num_seqs=8, max_prefill_tokens=64, num_blocks=256,
                warmup=False)
    base.update(kw)
    return LLM(model=path, **base)


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen2_dir", "mistral_dir", "llama3_dir"])
def test_single_request_matches_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    hf = load_hf(path)
    prompt = random_prompt(64, 300, seed=1)
    ref = greedy_reference(hf, prompt, 32)
    with _llm(path) as llm:
        _check(llm.generate([prompt], GREEDY)[0], *ref)


@pytest.mark.parametrize("slots,chunk", [(4, 16), (8, 2)])
def test_batched_requests_of_different_lengths(llama_dir, slots, chunk):
    hf = load_hf(llama_dir)
    prompts = [random_prompt(n, 300, seed=n) for n in (5, 64, 17, 100, 1, 33, 250)]
    refs = [greedy_reference(hf, p, 32) for p in prompts]
    # small chunks and few slots: prompts are chunked and mixed with other requests' decodes.
    # With 8 slots and chunks of 2 blocks, iterations with 5+ decodes (bucket 8) read their
    # context through decode attention's chunk loop
    with _llm(llama_dir, max_num_seqs=slots, max_prefill_tokens=32, max_prefill_seqs=2,
              attention_chunk=chunk) as llm:
        outs = llm.generate(prompts, GREEDY)
    for out, ref in zip(outs, refs):
        _check(out, *ref)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("fixture", ["llama_dir", "qwen2_dir"])
def test_tensor_parallel_matches(fixture, tp, request):
    path = request.getfixturevalue(fixture)
    hf = load_hf(path)
    prompts = [random_prompt(n, 300, seed=n) for n in (64, 9)]
    refs = [greedy_reference(hf, p, 32) for p in prompts]
    with _llm(path, tp=tp) as llm:
        outs = llm.generate(prompts, GREEDY)
        cache = llm.engine.runner.caches[0][0]
        assert len(cache.sharding.device_set) == tp  # the KV cache really is split
    for out, ref in zip(outs, refs):
        _check(out, *ref)
