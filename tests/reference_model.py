"""A plain numpy forward pass of the Llama family (no paging, no batching), used by tests
as an independent reference for the JAX runner, plus random-parameter helpers."""
from __future__ import annotations

import numpy as np

from conserve_jax.config import ModelConfig
from conserve_jax.models.llama import rope_inv_freq


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    w = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
    layers = []
    for _ in range(cfg.num_layers):
        lp = {"input_norm": 1 + w(H), "post_norm": 1 + w(H),
              "q_proj": w(H, cfg.num_heads * hd), "k_proj": w(H, cfg.num_kv_heads * hd),
              "v_proj": w(H, cfg.num_kv_heads * hd), "o_proj": w(cfg.num_heads * hd, H),
              "gate_proj": w(H, I), "up_proj": w(H, I), "down_proj": w(I, H)}
        if cfg.attention_bias:
            lp.update(q_bias=w(cfg.num_heads * hd), k_bias=w(cfg.num_kv_heads * hd),
                      v_bias=w(cfg.num_kv_heads * hd))
        layers.append(lp)
    p = {"embed": w(cfg.vocab_size, H) * 10, "layers": layers, "final_norm": 1 + w(H)}
    if not cfg.tie_word_embeddings:
        p["lm_head"] = w(H, cfg.vocab_size)
    return p


def _rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g


def _rope(x, pos, inv):
    ang = pos[:, None] * inv[None]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    h = x.shape[-1] // 2
    return np.concatenate([x[..., :h] * c - x[..., h:] * s, x[..., h:] * c + x[..., :h] * s], -1)


def reference_logits(cfg: ModelConfig, p: dict, ids: list[int]) -> np.ndarray:
    """float64 logits [len(ids), V] of a full causal forward pass."""
    f = lambda a: np.asarray(a, np.float64)
    T, nh, kvh, hd = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = np.arange(T, dtype=np.float64)
    inv = rope_inv_freq(cfg).astype(np.float64)
    x = f(p["embed"])[ids]
    mask = np.tril(np.ones((T, T), bool))
    for lp in p["layers"]:
        h = _rms(x, f(lp["input_norm"]), cfg.rms_norm_eps)
        q, k, v = h @ f(lp["q_proj"]), h @ f(lp["k_proj"]), h @ f(lp["v_proj"])
        if "q_bias" in lp:
            q, k, v = q + f(lp["q_bias"]), k + f(lp["k_bias"]), v + f(lp["v_bias"])
        q = _rope(q.reshape(T, nh, hd), pos, inv)
        k = _rope(k.reshape(T, kvh, hd), pos, inv)
        v = v.reshape(T, kvh, hd)
        rep = nh // kvh
        k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(mask[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, nh * hd)
        x = x + o @ f(lp["o_proj"])
        h = _rms(x, f(lp["post_norm"]), cfg.rms_norm_eps)
        g = h @ f(lp["gate_proj"])
        x = x + (g / (1 + np.exp(-g)) * (h @ f(lp["up_proj"]))) @ f(lp["down_proj"])
    x = _rms(x, f(p["final_norm"]), cfg.rms_norm_eps)
    head = f(p["embed"]).T if cfg.tie_word_embeddings else f(p["lm_head"])
    return x @ head


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
