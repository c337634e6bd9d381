"""Random-weight model presets ("random:<name>"), like vLLM's dummy load format.

Contract:
- `PRESETS` maps a preset name to a fully filled `ModelConfig`.
- `random_params(config, seed)` returns the loader's params dict (see `loader.py`) with float32
  numpy arrays: every weight ~ N(0, 0.02^2), every RMSNorm weight = 1, biases ~ N(0, 0.02^2).
  The result depends only on (config, seed): arrays are drawn from one `numpy.random.default_rng`
  in a fixed order.
- `byte_level_tokenizer(vocab_size)` builds the tokenizer random presets use: ids 0-3 are
  "<s>", "</s>", "<|im_start|>", "<|im_end|>" (special), ids 4-259 the 256 byte tokens, and any
  further ids up to `vocab_size` are plain filler tokens "<rN>" that decode to visible text (so a
  random model's output is never silently empty). No merges: one token per byte. BOS "<s>" is
  prepended by `encode`; EOS ids are "</s>" and "<|im_end|>"; the chat template is ChatML.
"""
from __future__ import annotations

import logging

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from conserve_jax.config import ModelConfig
from conserve_jax.tokenizer import Tokenizer, bytes_to_unicode

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3
NUM_BASE_TOKENS = len(SPECIAL_TOKENS) + 256

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COMMON = dict(bos_token_id=BOS_ID, eos_token_ids=(EOS_ID, IM_END_ID), max_position_embeddings=4096,
               rms_norm_eps=1e-5, architecture="llama")

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, **_COMMON),
    "tiny-qwen": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=True,
                             rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=BOS_ID,
                             eos_token_ids=(EOS_ID, IM_END_ID), max_position_embeddings=4096,
                             architecture="qwen2"),
    "small": ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                         num_kv_heads=2, head_dim=32, **_COMMON),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                                tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID, IM_END_ID),
                                max_position_embeddings=8192, architecture="llama"),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset 'random:{name}'; available: "
                         + ", ".join(f"random:{n}" for n in PRESETS))
    return PRESETS[name]


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Deterministic random weights in the loader's params format (float32 numpy)."""
    rng = np.random.default_rng(seed)
    h, q, kv, inter = (config.hidden_size, config.num_heads * config.head_dim,
                       config.num_kv_heads * config.head_dim, config.intermediate_size)

    def normal(*shape: int) -> np.ndarray:
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(0.02)
        return a

    def ones(n: int) -> np.ndarray:
        return np.ones((n,), np.float32)

    params: dict = {"embed": normal(config.vocab_size, h), "layers": []}
    for _ in range(config.num_layers):
        layer = {"input_norm": ones(h), "q_proj": normal(h, q), "k_proj": normal(h, kv),
                 "v_proj": normal(h, kv)}
        if config.attention_bias:
            layer.update(q_bias=normal(q), k_bias=normal(kv), v_bias=normal(kv))
        layer.update(o_proj=normal(q, h), post_norm=ones(h), gate_proj=normal(h, inter),
                     up_proj=normal(h, inter), down_proj=normal(inter, h))
        params["layers"].append(layer)
    params["final_norm"] = ones(h)
    if not config.tie_word_embeddings:
        params["lm_head"] = normal(h, config.vocab_size)
    return params


def byte_level_tokenizer(vocab_size: int = NUM_BASE_TOKENS) -> Tokenizer:
    """The byte-level tokenizer of the random presets (see module docstring)."""
    if vocab_size < NUM_BASE_TOKENS:
        raise ValueError(f"byte-level tokenizer needs vocab_size >= {NUM_BASE_TOKENS}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<r{len(vocab)}>"] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return Tokenizer(backend, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID, IM_END_ID), add_bos=True,
                     chat_template=CHATML_TEMPLATE,
                     special_tokens={"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID]})
