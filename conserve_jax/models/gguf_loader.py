"""GGUF loading: config, dequantized float32 params and tokenizer from one .gguf file.

Contract: `load_gguf(path) -> (ModelConfig, params, Tokenizer)` with params in the format of
`loader.py`. Supported: architectures "llama" (also Mistral/SmolLM files) and "qwen2"; every
tensor type `gguf.quants.dequantize` handles (F32, F16, BF16, Q4_0/1, Q8_0, K-quants, ...);
tokenizer model "gpt2" (byte-level BPE). Anything else raises ValueError.

Orientation: a GGUF tensor's `shape` lists dimensions innermost first; `dequantize` returns
the array in row-major (torch) order, [out_features, in_features] for a linear weight, which we
transpose to the params' [in, out]. llama.cpp's converter permutes the rows of Q and K of
"llama" models per head from HF's rotate_half RoPE layout to interleaved pairs; we undo it the
way transformers' GGUF loader does (qwen2 files are not permuted). The tokenizer is rebuilt like
transformers does for a GGUF: byte-level BPE from tokens + merges, a pre-tokenizer split chosen
by `tokenizer.ggml.pre` (GPT-2 ByteLevel regex when unknown, e.g. "smollm"), control tokens
(type 3) and user-defined tokens (type 4) added whole.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from conserve_jax.config import ModelConfig
from conserve_jax.models.param_shapes import check_params
from conserve_jax.tokenizer import Tokenizer, bytes_to_unicode

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

_LAYER_TENSORS = {
    "attn_norm.weight": ("input_norm", False), "ffn_norm.weight": ("post_norm", False),
    "attn_q.weight": ("q_proj", True), "attn_k.weight": ("k_proj", True), "attn_v.weight": ("v_proj", True),
    "attn_output.weight": ("o_proj", True), "attn_q.bias": ("q_bias", False), "attn_k.bias": ("k_bias", False),
    "attn_v.bias": ("v_bias", False), "ffn_gate.weight": ("gate_proj", True), "ffn_up.weight": ("up_proj", True),
    "ffn_down.weight": ("down_proj", True),
}


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: per head, rows (pair, half) -> (half, pair).

    `w` is in row-major order with the output dimension first ([n_heads*head_dim, ...]).
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in names:
        raise ValueError(f"unsupported rope_scaling in GGUF ({scaling or 'rope_freqs tensor'})")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    # The embedding's row count is authoritative (the token list may be shorter than a padded vocab).
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError("GGUF has no token_embd.weight tensor")
    vocab = int(embed.shape[-1])
    eos = [_field(reader, "tokenizer.ggml.eos_token_id"), _field(reader, "tokenizer.ggml.eot_token_id")]
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)), architecture=arch)


def params_from_gguf(reader, config: ModelConfig) -> dict:
    from gguf.quants import dequantize

    permute = config.architecture == "llama"
    layers = [dict() for _ in range(config.num_layers)]
    params: dict = {"layers": layers}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(d) for d in reversed(t.shape))
        if w.shape != expected:
            w = w.reshape(expected)
        name = t.name
        if name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_TENSORS:
                logger.debug("ignoring GGUF tensor %s", name)
                continue
            key, transpose = _LAYER_TENSORS[rest]
            if permute and key in ("q_proj", "k_proj"):
                w = reverse_permute(w, config.num_heads if key == "q_proj" else config.num_kv_heads)
            layers[int(idx)][key] = np.ascontiguousarray(w.T) if transpose else w
        elif name == "token_embd.weight":
            params["embed"] = w
        elif name == "output_norm.weight":
            params["final_norm"] = w
        elif name == "output.weight":
            params["lm_head"] = np.ascontiguousarray(w.T)
        else:
            logger.debug("ignoring GGUF tensor %s", name)
    check_params(params, config)
    return params


def tokenizer_from_gguf(reader, config: Optional[ModelConfig] = None) -> Tokenizer:
    """Byte-level BPE tokenizer from GGUF metadata (see module docstring)."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r}; supported: gpt2 (byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type") or [])
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[key] = i
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre")
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        if pre not in (None, "default", "gpt2", "smollm"):
            logger.warning("GGUF pre-tokenizer %r not known; using GPT-2 byte-level splitting", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(tok, normalized=False, special=True)
               for tok, ty in zip(tokens, types) if ty == 3 and set(tok) <= alphabet]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(tok, normalized=False, special=False)
            for tok, ty in zip(tokens, types) if ty == 4 and tok in vocab]
    if user:
        backend.add_tokens(user)

    def token(key: str) -> Optional[str]:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = config.bos_token_id if config else _field(reader, "tokenizer.ggml.bos_token_id")
    eos = config.eos_token_ids if config else [_field(reader, "tokenizer.ggml.eos_token_id")]
    special = {"bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id"),
               "unk_token": token("tokenizer.ggml.unknown_token_id"),
               "pad_token": token("tokenizer.ggml.padding_token_id")}
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=[e for e in eos if e is not None],
                     add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                     chat_template=_field(reader, "tokenizer.chat_template"), special_tokens=special)


def load_gguf(path: str) -> tuple[ModelConfig, dict, Tokenizer]:
    """Config, dequantized float32 params and tokenizer of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    config = config_from_gguf(reader)
    params = params_from_gguf(reader, config)
    tokenizer = tokenizer_from_gguf(reader, config)
    logger.info("loaded GGUF %s: %s, %d layers, vocab %d", path, config.architecture, config.num_layers,
                config.vocab_size)
    return config, params, tokenizer
