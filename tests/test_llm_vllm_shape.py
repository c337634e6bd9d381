"""`LLM` outputs the vLLM way and its progress bar (issue 29, items 5 and 8): `out.outputs[0]`
is vLLM's `CompletionOutput` over the same answer (today's fields unchanged), and
`use_tqdm=True` (the default, as vLLM's) draws "Processed prompts" with requests done and
tokens/s on stderr. A real engine on the tiny random model."""
from __future__ import annotations

import math
import re

import pytest

from conserve_jax.entrypoints.llm import LLM
from conserve_jax.sampling_params import SamplingParams

CONV = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def llm():
    with LLM(warmup=False, model="random:tiny", max_model_len=256, max_num_seqs=4,
             max_prefill_tokens=64, num_blocks=128) as llm:
        yield llm


def test_outputs_zero_is_the_same_answer(llm):
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=0)
    out = llm.generate(["hello there", [5, 6, 7]], sp, use_tqdm=False)
    for o in out:
        assert len(o.outputs) == 1
        c = o.outputs[0]
        assert (c.index, c.text, c.token_ids, c.finish_reason) == (0, o.text, o.token_ids,
                                                                   o.finish_reason)
        assert len(c.token_ids) == 5 and o.finished and c.finish_reason == "length"
        assert c.logprobs == o.logprobs and len(c.logprobs) == 5
        assert math.isclose(c.cumulative_logprob, sum(lp.logprob for lp in o.logprobs))
    chat = llm.chat(CONV, SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0]
    assert chat.outputs[0].text == chat.text and chat.outputs[0].cumulative_logprob is None


def test_progress_bar_shows_requests_and_tokens_per_second(llm, capsys):
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate(["a", "bb", "ccc"], sp)  # use_tqdm defaults to on
    err = capsys.readouterr().err
    assert re.search(r"Processed prompts: 100%\|.*\| 3/3 \[", err), err
    assert re.search(r"est\. speed input: [\d.]+ toks/s, output: [1-9][\d.]* toks/s", err), err
    llm.chat([CONV, CONV], sp)
    assert "2/2" in capsys.readouterr().err
    llm.generate(["a"], sp, use_tqdm=False)
    llm.chat(CONV, sp, use_tqdm=False)
    assert capsys.readouterr().err == ""
