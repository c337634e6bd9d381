"""Llama-family decoder in JAX: the three pieces the runner calls one after another.

`embed_tokens` (token ids -> hidden, plus the RoPE tables shared by all layers),
`run_layers` (consecutive transformer blocks over paged KV, each with its own params and
cache pair; `decoder_layer` is one block), and `final_logits` (final norm + LM head). The
runner jits `run_layers` for a few group sizes (layers per call) once per token bucket;
every group of that size reuses the same compiled executable.

Token layout of an iteration: one ragged token axis, padded to a token-count bucket by the
runner (decode rows first, then the prefill chunks; `attention.py` states the layout).
Padding rows write their KV to the scratch block 0 and are masked out of every attention.
Pure functions: no state, caches come in and go out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from conserve_jax.config import ModelConfig
from conserve_jax.models.attention import AttentionMeta, ragged_paged_attention

# XLA:CPU runs a bfloat16 dot with fewer than this many rows on a slow path (8x slower
# than float32 at one row, measured here); padding to it costs ~1.2x a float32 row
MIN_LOW_PRECISION_ROWS = 8


def project(eq: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """einsum(eq, x, w) for a weight matmul (x's first axis: token rows), returned in
    `out_dtype` (default x's). A weight stored in a lower precision than x (`weight_dtype`)
    gets x rounded to its dtype and products accumulated in float32."""
    out_dtype = out_dtype or x.dtype
    if w.dtype == x.dtype:
        if out_dtype == x.dtype:
            return jnp.einsum(eq, x, w)
        return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)
    rows = x.shape[0]
    xl = x.astype(w.dtype)
    if rows < MIN_LOW_PRECISION_ROWS:
        xl = jnp.pad(xl, [(0, MIN_LOW_PRECISION_ROWS - rows)] + [(0, 0)] * (x.ndim - 1))
    return jnp.einsum(eq, xl, w, preferred_element_type=jnp.float32)[:rows].astype(out_dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2], with Llama-3 scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    s = cfg.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * np.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = np.where(mid, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(ang), jnp.sin(ang)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def decoder_layer(p: dict, x, cos, sin, k_cache, v_cache, meta: AttentionMeta, *,
                  cfg: ModelConfig, attention_chunk: int, row_parallel=project):
    """One pre-norm transformer block: attention over paged KV, then a SwiGLU MLP.

    `p` is one layer of `layer_params` (fused QKV and gate/up weights: one dot each).
    `row_parallel(eq, x, w)` computes the o and down projections (whose contraction axis
    tensor parallelism splits): `project` by default, whose partial sums the compiler
    all-reduces; the runner may pass its own reduction (runtime/sharding.py).
    Returns (x, k_cache, v_cache) with this iteration's K/V written to the caches."""
    t = x.shape[0]
    kvh, g2, hd = p["qkv"].shape[1:]
    g = g2 - 2
    dt = x.dtype
    h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    qkv = project("th,hkjd->tkjd", h, p["qkv"])  # [T, kvh, g+2, hd]
    if "qkv_bias" in p:
        qkv = qkv + p["qkv_bias"]
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    qk = apply_rope(qkv[:, :, : g + 1], c, s)  # q heads and the k head of each group
    q = qk[:, :, :g] * jnp.asarray(hd ** -0.5, dt)
    k, v = qk[:, :, g], qkv[:, :, g + 1]  # [T, kvh, hd]
    k_cache = k_cache.at[:, meta.slot_blocks, meta.slot_offsets].set(
        k.transpose(1, 0, 2).astype(k_cache.dtype))
    v_cache = v_cache.at[:, meta.slot_blocks, meta.slot_offsets].set(
        v.transpose(1, 0, 2).astype(v_cache.dtype))
    a = ragged_paged_attention(q, k, v, k_cache, v_cache, meta, attention_chunk)
    a = a.reshape(t, kvh * g * hd)
    x = x + row_parallel("ta,ah->th", a, p["o"])
    h = rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
    gu = project("th,hci->tci", h, p["gate_up"])  # [T, 2, I]
    x = x + row_parallel("ti,ih->th", jax.nn.silu(gu[:, 0]) * gu[:, 1], p["down"])
    return x, k_cache, v_cache


def apply_rope(x, c, s):
    """Rotate-half RoPE on the last axis of x; c/s broadcast against x[..., :hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = c.astype(x.dtype), s.astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def run_layers(layers: list, x, cos, sin, caches: list, meta: AttentionMeta, *,
               cfg: ModelConfig, attention_chunk: int, row_parallel=project):
    """Apply consecutive layers (unrolled). caches: one (k, v) pair per layer;
    `attention_chunk`: KV blocks per loop trip of `ragged_paged_attention`;
    `row_parallel`: as in `decoder_layer`. Returns (x, new caches)."""
    new = []
    for p, (kc, vc) in zip(layers, caches):
        x, kc, vc = decoder_layer(p, x, cos, sin, kc, vc, meta, cfg=cfg,
                                  attention_chunk=attention_chunk, row_parallel=row_parallel)
        new.append((kc, vc))
    return x, new


def embed_tokens(embed: jax.Array, token_ids: jax.Array, positions: jax.Array,
                 inv_freq: jax.Array, dtype=None):
    """-> hidden [T, H] (in `dtype`, default the table's) and the RoPE cos/sin tables
    [T, hd/2] used by every layer."""
    cos, sin = rope_tables(positions, inv_freq)
    return embed[token_ids].astype(dtype or embed.dtype), cos, sin


def final_logits(final_norm: jax.Array, head: jax.Array, hidden: jax.Array, eps: float,
                 tied: bool) -> jax.Array:
    """hidden [B, H] -> float32 logits [B, V]. `head` is [H, V], or the embedding [V, H]
    when tied."""
    h = rms_norm(hidden, final_norm, eps).astype(jnp.float32)
    return project("bh,vh->bv" if tied else "bh,hv->bv", h, head)


def layer_params(layer: dict, cfg: ModelConfig, dtype, kv_repeat: int = 1) -> dict:
    """Loader layer dict (numpy, [in, out]) -> the runner's per-layer params (numpy):

    qkv [H, kvh, g+2, hd]: for each KV head, its g query heads, then its K and V head
    (so splitting the kvh axis splits attention heads for tensor parallelism);
    optional qkv_bias [kvh, g+2, hd]; o [heads*hd, H]; gate_up [H, 2, I]; down [I, H];
    input_norm, post_norm [H].

    kv_repeat > 1 replicates each KV head that many times (consecutively), for tensor
    parallelism over more devices than the model has KV heads."""
    hd, nh = cfg.head_dim, cfg.num_heads
    kvh = cfg.num_kv_heads * kv_repeat
    g = nh // kvh

    def heads(w, n):  # [..., n*hd] -> [..., n, hd]
        return w.reshape(*w.shape[:-1], n, hd)

    def fuse(q, k, v):
        q = heads(q, nh).reshape(*q.shape[:-1], kvh, g, hd)
        k = np.repeat(heads(k, cfg.num_kv_heads), kv_repeat, axis=-2)[..., None, :]
        v = np.repeat(heads(v, cfg.num_kv_heads), kv_repeat, axis=-2)[..., None, :]
        return np.concatenate([q, k, v], axis=-2)

    c = lambda a: np.ascontiguousarray(np.asarray(a, dtype=dtype))
    p = {
        "input_norm": c(layer["input_norm"]),
        "post_norm": c(layer["post_norm"]),
        "qkv": c(fuse(layer["q_proj"], layer["k_proj"], layer["v_proj"])),
        "o": c(layer["o_proj"]),
        "gate_up": c(np.stack([layer["gate_proj"], layer["up_proj"]], axis=1)),
        "down": c(layer["down_proj"]),
    }
    if "q_bias" in layer:
        p["qkv_bias"] = c(fuse(layer["q_bias"], layer["k_bias"], layer["v_bias"]))
    return p
