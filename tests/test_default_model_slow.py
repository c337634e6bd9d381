"""The embedded default model (SmolLM2-135M-Instruct, GGUF) against transformers loading
the same GGUF file: greedy tokens identical and logprobs within 1e-4 over a 64-token
prompt and 32 decoded tokens, alone and batched."""
import os

import numpy as np
import pytest

from conserve_jax import LLM, SamplingParams
from conserve_jax.models.loader import default_model_path
from tests.transformers_ref import greedy_reference, load_hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    with LLM(warmup=False, model="default", max_model_len=512, max_num_seqs=4, max_prefill_tokens=128,
             num_blocks=128) as llm:
        yield llm


def _prompts(tok):
    text = tok.apply_chat_template([{"role": "user", "content":
                                     "Explain in two sentences why the sky is blue, then "
                                     "name three colours of a rainbow and one fruit."}])
    a = tok.encode(text, add_special_tokens=False)
    assert len(a) >= 40
    a = (a + tok.encode(" Please answer briefly and clearly.", add_special_tokens=False) * 8)[:64]
    b = tok.encode("The capital of France is", add_special_tokens=False)
    return [a, b]


def test_default_model_matches_transformers(llm):
    path = default_model_path()
    hf = load_hf(os.path.dirname(path), gguf_file=os.path.basename(path))
    prompts = _prompts(llm.tokenizer)
    refs = [greedy_reference(hf, p, 32) for p in prompts]
    sp = SamplingParams(max_tokens=32, temperature=0.0, logprobs=0, ignore_eos=True)
    alone = llm.generate([prompts[0]], sp)[0]
    batched = llm.generate(prompts, sp)
    for out, (toks, lps) in [(alone, refs[0])] + list(zip(batched, refs)):
        assert out.token_ids == toks
        np.testing.assert_allclose([lp.logprob for lp in out.logprobs], lps, atol=1e-4, rtol=0)
