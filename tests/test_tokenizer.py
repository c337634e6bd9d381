"""Tokenizer: GGUF/HF tokenizers vs. transformers, chat templates, streaming detokenization."""
from __future__ import annotations

import os

import pytest

from conserve_jax.models import loader
from conserve_jax.models.gguf_loader import reverse_permute
from conserve_jax.models.presets import byte_level_tokenizer
from conserve_jax.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.hf_fixtures import llama_dir, qwen2_dir  # noqa: F401  (fixtures)

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3068\u4e2d\u6587\u53e5\u5b50",
    "emoji \U0001f600\U0001f680 and flags \U0001f1eb\U0001f1f7",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "numbers 1234567890 3.14159 -42 1e-6",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|endoftext|>special</s><s> tokens",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "print('hi')"},
     {"role": "user", "content": "Thanks \U0001f600"}],
]


@pytest.fixture(scope="module")
def default_tokenizer() -> Tokenizer:
    from conserve_jax.models.gguf_loader import tokenizer_from_gguf
    import gguf

    return tokenizer_from_gguf(gguf.GGUFReader(loader.default_model_path()))


@pytest.fixture(scope="module")
def hf_default_tokenizer():
    from transformers import AutoTokenizer

    path = loader.default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_default_tokenizer_matches_transformers(default_tokenizer, hf_default_tokenizer):
    tok, ref = default_tokenizer, hf_default_tokenizer
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert not tok.add_bos
    for text in TEXTS:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.encode("<|im_start|>") == [1]
    for i in (0, 1, 2, 100, 4000, 49151):
        assert tok.id_to_token(i) == ref.convert_ids_to_tokens(i)


def test_default_tokenizer_decode_round_trip(default_tokenizer, hf_default_tokenizer):
    for text in TEXTS:
        ids = default_tokenizer.encode(text)
        assert default_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert default_tokenizer.decode(ids) == hf_default_tokenizer.decode(ids, skip_special_tokens=True)
    ids = default_tokenizer.encode("<|im_start|>user\nhello<|im_end|>")
    assert default_tokenizer.decode(ids) == "user\nhello"


def test_default_chat_template_matches_transformers(default_tokenizer, hf_default_tokenizer):
    assert default_tokenizer.has_chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = default_tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            ref = hf_default_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == ref


def test_hf_dir_tokenizer_matches_transformers(llama_dir, qwen2_dir):
    from transformers import AutoTokenizer

    for directory in (llama_dir, qwen2_dir):
        tok, ref = loader.load_model(directory).tokenizer, AutoTokenizer.from_pretrained(directory)
        for text in TEXTS:
            assert tok.encode(text) == ref(text)["input_ids"], text
            assert tok.decode(tok.encode(text), skip_special_tokens=False).removeprefix("<s>") == text
        for messages in CONVERSATIONS:
            assert tok.apply_chat_template(messages) == ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)


def test_chat_template_errors():
    tok = byte_level_tokenizer()
    for bad in ([], [{"content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}], ["hi"]):
        with pytest.raises(ValueError):
            tok.apply_chat_template(bad)
    raising = Tokenizer(tok.backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])
    plain = Tokenizer(tok.backend)
    assert not plain.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_variables_and_trim():
    tok = byte_level_tokenizer()
    template = ("{{ bos_token }}{% for m in messages %}\n  {{ m['content'] | tojson }}\n{% endfor %}"
                "{% if add_generation_prompt %}[gen]{% endif %}{{ eos_token }}")
    t = Tokenizer(tok.backend, bos_token_id=0, eos_token_ids=(1,), chat_template=template)
    out = t.apply_chat_template([{"role": "user", "content": "h\u00e9<b>"}])
    assert out == '<s>  "h\u00e9<b>"\n[gen]</s>'
    assert t.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False) == '<s>  "x"\n</s>'


def test_preset_tokenizer_round_trip_and_bos():
    tok = byte_level_tokenizer(512)
    assert tok.vocab_size == 512 and tok.add_bos and tok.bos_token_id == 0
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 0 and tok.decode(ids, skip_special_tokens=False) == "<s>" + text
        assert max(ids) < 512
    assert tok.decode(range(260, 263)) == "<r260><r261><r262>"


def _stream(tok: Tokenizer, ids: list[int], chunk: int, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("which", ["default", "preset"])
def test_incremental_detokenizer(which, default_tokenizer):
    tok = default_tokenizer if which == "default" else byte_level_tokenizer(512)
    text = ("Caf\u00e9 \u65e5\u672c\u8a9e \U0001f600\U0001f680 na\u00efve<|im_end|> \u00fcber "
            "\U0001f1eb\U0001f1f7 end \u4e2d\u6587")
    ids = tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        for chunk in (1, 2, 3, 7):
            deltas = _stream(tok, ids, chunk, skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_holds_partial_characters():
    tok = byte_level_tokenizer()
    ids = tok.encode("\U0001f600!", add_special_tokens=False)  # 4 byte tokens + "!"
    assert len(ids) == 5
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([i]) for i in ids] == ["", "", "", "\U0001f600", "!"]
    assert detok.finish() == ""
    broken = IncrementalDetokenizer(tok)
    assert broken.push(ids[:2]) == ""
    assert broken.finish() == tok.decode(ids[:2])  # flushed as U+FFFD at the end


def test_incremental_detokenizer_with_prompt_context(default_tokenizer):
    tok = default_tokenizer
    prompt = tok.encode("The answer is")
    gen = tok.encode(" forty-two, \u00e9t\u00e9.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(detok.push([i]) for i in gen) + detok.finish()
    assert out == tok.decode(prompt + gen)[len(tok.decode(prompt)):]


def test_reverse_permute_inverts_llama_cpp_permute():
    import numpy as np

    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)
    np.testing.assert_array_equal(reverse_permute(llama_cpp_permute(w, 3), 3), w)
