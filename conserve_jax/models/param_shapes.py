"""The parameter tree every loader produces, and its check.

Loaders (HF safetensors, GGUF, presets) all return `{"embed", "final_norm", ["lm_head"],
"layers": [...]}` with these shapes; `check_params` raises ValueError naming the tensor when
one is missing, unexpected or mis-shaped. Pure host code.
"""
from __future__ import annotations

from conserve_jax.config import ModelConfig


def expected_shapes(config: ModelConfig) -> dict:
    """Shape of every params entry for `config` (layer entries are per layer)."""
    h, q, kv, i = (config.hidden_size, config.num_heads * config.head_dim,
                   config.num_kv_heads * config.head_dim, config.intermediate_size)
    layer = {"input_norm": (h,), "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "post_norm": (h,), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    if config.attention_bias:
        layer.update(q_bias=(q,), k_bias=(kv,), v_bias=(kv,))
    top = {"embed": (config.vocab_size, h), "final_norm": (h,)}
    if not config.tie_word_embeddings:
        top["lm_head"] = (h, config.vocab_size)
    return {"top": top, "layer": layer}


def check_params(params: dict, config: ModelConfig) -> None:
    """Raise ValueError when a tensor is missing, unexpected or mis-shaped."""
    shapes = expected_shapes(config)
    for key, shape in shapes["top"].items():
        if key not in params:
            raise ValueError(f"checkpoint is missing {key!r}")
        if params[key].shape != shape:
            raise ValueError(f"{key}: shape {params[key].shape} != expected {shape}")
    for n, layer in enumerate(params["layers"]):
        missing = set(shapes["layer"]) - set(layer)
        extra = set(layer) - set(shapes["layer"])
        if missing or extra:
            raise ValueError(f"layer {n}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for key, shape in shapes["layer"].items():
            if layer[key].shape != shape:
                raise ValueError(f"layer {n} {key}: shape {layer[key].shape} != expected {shape}")
