"""Tiny random Hugging Face checkpoints built with transformers, for loader and model tests.

Each `make_*(directory)` writes a complete HF model directory (config.json, safetensors weights,
generation_config.json, tokenizer.json, tokenizer_config.json with a ChatML chat template) and
returns its path. Weights are torch float32 from a fixed seed, and every tensor, norms and biases
included, is re-drawn randomly so that no bug can hide behind ones or zeros. Shapes: hidden 64,
4 layers, 4 heads, 2 KV heads, intermediate 128, vocab 320, max_position_embeddings 512.

- `make_llama_gqa`: LlamaForCausalLM, untied, saved sharded (model.safetensors.index.json);
  generation_config adds eos id 3 ("<|im_end|>") to config's 2 ("</s>").
- `make_qwen2`: Qwen2ForCausalLM, q/k/v bias, tied embeddings, Qwen2-style tokenizer (no BOS,
  eos "<|im_end|>" = id 2).
- `make_mistral`: MistralForCausalLM, sliding_window 4096 (>= max positions, so ignored).
- `make_llama3_scaled`: Llama with rope_scaling {"rope_type": "llama3", factor 8, low 1, high 4,
  original_max_position_embeddings 128} and rope_theta 500000.

Pytest fixtures (session scope): `llama_dir`, `qwen2_dir`, `mistral_dir`, `llama3_dir`. Use them
with `from tests.hf_fixtures import llama_dir, ...` (importing the fixture registers it).
"""
from __future__ import annotations

import json
import os

import pytest

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
VOCAB_SIZE = 320
TOKENIZER_VOCAB = 300
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "def add(a, b):\n    return a + b\n",
    "Serving engines batch requests; the scheduler decides what runs next.",
    "Unicode: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, emoji \U0001f600.",
] * 4

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)


def write_tokenizer(directory: str, style: str = "llama") -> None:
    """Train a small byte-level BPE and save tokenizer.json + tokenizer_config.json.

    "llama" style: ids 0-4 are <unk>, <s>, </s>, <|im_end|>, <|im_start|>; the post-processor
    prepends <s> (add_bos_token true). "qwen2" style mirrors what transformers' Qwen2Tokenizer
    builds (NFC, Qwen2 split regex; ids 0-2 <|endoftext|>, <|im_start|>, <|im_end|>; no BOS).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        specials = QWEN2_SPECIAL_TOKENS
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "unk_token": None, "add_bos_token": False}
    else:
        specials = SPECIAL_TOKENS
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if config["add_bos_token"]:  # like real Llama tokenizer.json files: the post-processor prepends BOS
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(os.path.join(directory, "tokenizer.json"))
    config.update(chat_template=CHATML_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast")
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def _randomize(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def _build(directory: str, model_cls, config, seed: int, max_shard_size=None, generation_config=None,
           tokenizer_style: str = "llama") -> str:
    import torch

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _randomize(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if generation_config is not None:
        with open(os.path.join(directory, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    write_tokenizer(directory, tokenizer_style)
    return str(directory)


def make_llama_gqa(directory: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_COMMON, rope_theta=10000.0, tie_word_embeddings=False)
    return _build(directory, LlamaForCausalLM, config, seed=1, max_shard_size="40KB",
                  generation_config={"bos_token_id": 1, "eos_token_id": [2, 3]})


def make_qwen2(directory: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_COMMON, rope_theta=1000000.0, tie_word_embeddings=True)
    return _build(directory, Qwen2ForCausalLM, config, seed=2, tokenizer_style="qwen2")


def make_mistral(directory: str) -> str:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**_COMMON, head_dim=16, sliding_window=4096, tie_word_embeddings=False)
    return _build(directory, MistralForCausalLM, config, seed=3)


def make_llama3_scaled(directory: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}
    config = LlamaConfig(**_COMMON, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=False)
    return _build(directory, LlamaForCausalLM, config, seed=4)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return make_llama_gqa(str(tmp_path_factory.mktemp("hf_llama")))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> str:
    return make_qwen2(str(tmp_path_factory.mktemp("hf_qwen2")))


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory) -> str:
    return make_mistral(str(tmp_path_factory.mktemp("hf_mistral")))


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> str:
    return make_llama3_scaled(str(tmp_path_factory.mktemp("hf_llama3")))
