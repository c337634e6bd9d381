"""`LLM.chat` (vLLM-shaped): the chat template is applied through the tokenizer, one
conversation or a list of them, and bad input is a ValueError naming the conversation."""
import pytest

from conserve_jax.entrypoints.llm import LLM
from conserve_jax.sampling_params import SamplingParams

CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def llm():
    with LLM(warmup=False, model="random:tiny", max_model_len=256, max_num_seqs=4, max_prefill_tokens=64,
             num_blocks=128) as llm:
        yield llm


def test_chat_renders_the_template_and_generates(llm):
    tok = llm.tokenizer
    assert tok.has_chat_template
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = llm.chat(CONV, sp)
    assert len(out) == 1
    rendered = tok.apply_chat_template(CONV, add_generation_prompt=True)
    assert out[0].prompt == rendered
    assert out[0].prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    ref = llm.generate([out[0].prompt_token_ids], sp)[0]
    assert out[0].token_ids == ref.token_ids and len(ref.token_ids) == 6
    assert out[0].text == ref.text


def test_chat_list_of_conversations_in_order(llm):
    convs = [CONV, [{"role": "user", "content": "Second"}], [{"role": "user", "content": "3"}]]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    many = llm.chat(convs, sp)
    assert [o.prompt for o in many] == [llm.tokenizer.apply_chat_template(c) for c in convs]
    assert [o.token_ids for o in many] == [llm.chat(c, sp)[0].token_ids for c in convs]
    online = llm.chat(convs[1], sp, offline=False)[0]
    assert online.token_ids == many[1].token_ids


def test_chat_bad_input_names_the_conversation(llm):
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        llm.chat([CONV, [{"role": "user"}]])
    with pytest.raises(ValueError, match="messages"):
        llm.chat([])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        llm.chat(["not a conversation", CONV])
    with pytest.raises(ValueError, match="LLM.chat"):
        llm.generate(CONV)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.chat([CONV, CONV], [SamplingParams()])


def test_llm_runs_without_safepoints_unless_asked(llm):
    """Nothing can arrive while generate blocks, so LLM's offline iterations carry no layer
    safepoints by default; an explicit safepoint_interval is kept; tokens are the same."""
    assert llm.engine.config.conserve.safepoint_interval is None
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    calls = []
    orig = llm.engine.runner.execute

    def spy(plan, safepoint=None):
        calls.append(safepoint)
        return orig(plan, safepoint)

    llm.engine.runner.execute = spy
    try:
        plain = [o.token_ids for o in llm.generate(prompts, sp)]
    finally:
        llm.engine.runner.execute = orig
    assert calls and all(c is None for c in calls)
    with LLM(warmup=False, model="random:tiny", max_model_len=256, max_num_seqs=4, max_prefill_tokens=64,
             num_blocks=128, safepoint_interval=2) as other:
        assert other.engine.config.conserve.safepoint_interval == 2
        assert [o.token_ids for o in other.generate(prompts, sp)] == plain
