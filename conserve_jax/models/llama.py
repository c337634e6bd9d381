"""Llama-family decoder in flax: the three pieces the runner calls one after another.

`embed_tokens` (token ids -> hidden, plus the RoPE tables shared by all layers),
`DecoderLayer` (one transformer block over paged KV, applied per layer with that layer's
params and cache), and `final_logits` (final norm + LM head). The runner jits each piece
once per shape bucket; every layer reuses the same compiled executable.

Token layout of an iteration (all arrays padded to bucket sizes by the runner):
rows [0, Bd) are decode tokens, one per decoding sequence; rows [Bd, Bd+Tp) are prefill
tokens of at most Bp sequences. Padding rows write their KV to the scratch block 0 and are
masked out of every attention. Pure functions: no state, caches come in and go out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conserve_jax.config import ModelConfig

NEG_INF = -1e30


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


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, hd] in the rotate-half convention; cos/sin [T, hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * scale.astype(jnp.float32)).astype(x.dtype)


@dataclass(frozen=True)
class AttentionMeta:
    """Per-iteration indices shared by every layer (device arrays, int32).

    slot_blocks/slot_offsets [T]: where each token's K/V is written (padding -> block 0).
    positions [T]. dec_tables [Bd, nb] and dec_lens [Bd]: decode sequences' blocks and
    context lengths including the new token. pre_tables [Bp, nb] and pre_start [Bp]:
    prefill sequences' blocks holding their context *before* this chunk, and where the
    chunk starts; pre_seq [Tp]: which prefill sequence each prefill row belongs to
    (-1 = pad). Prefill rows of one sequence are contiguous and in position order.
    """

    slot_blocks: jax.Array
    slot_offsets: jax.Array
    positions: jax.Array
    dec_tables: jax.Array
    dec_lens: jax.Array
    pre_tables: jax.Array
    pre_start: jax.Array
    pre_seq: jax.Array


jax.tree_util.register_dataclass(
    AttentionMeta,
    data_fields=["slot_blocks", "slot_offsets", "positions", "dec_tables", "dec_lens",
                 "pre_tables", "pre_start", "pre_seq"],
    meta_fields=[])


def _gather_context(cache: jax.Array, tables: jax.Array) -> jax.Array:
    """cache [kvh, NB, bs, hd], tables [B, nb] -> [kvh, B, nb*bs, hd]."""
    g = cache[:, tables]  # [kvh, B, nb, bs, hd]
    kvh, b, nb, bs, hd = g.shape
    return g.reshape(kvh, b, nb * bs, hd)


PREFILL_QUERY_BLOCK = 128  # prefill rows per causal block (keys past a block are skipped)


def paged_attention(q, k_new, v_new, k_cache, v_cache, meta: AttentionMeta, num_decode: int):
    """q [T, kvh, g, hd] (scaled, rotated); k_new/v_new [T, kvh, hd] this iteration's keys
    and values, already written to the cache. Returns [T, kvh, g, hd].

    Decode rows attend to their whole context read from the cache. Prefill rows attend to
    (a) their sequence's context before the chunk, read from the cache, and (b) the chunk
    itself, causally, from k_new/v_new in row blocks so that keys past a block's last row
    are never computed; (a) and (b) share one softmax."""
    outs = []
    if num_decode:
        qd = q[:num_decode]
        kd = _gather_context(k_cache, meta.dec_tables)
        vd = _gather_context(v_cache, meta.dec_tables)
        s = jnp.einsum("bkgd,kbld->bkgl", qd, kd, preferred_element_type=jnp.float32)
        valid = jnp.arange(kd.shape[2])[None, :] < meta.dec_lens[:, None]  # [Bd, L]
        s = jnp.where(valid[:, None, None, :], s, NEG_INF)
        p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
        outs.append(jnp.einsum("bkgl,kbld->bkgd", p, vd))
    if q.shape[0] > num_decode:
        outs.append(_prefill_attention(q[num_decode:], k_new[num_decode:], v_new[num_decode:],
                                       k_cache, v_cache, meta, num_decode))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def _prefill_attention(qp, kn, vn, k_cache, v_cache, meta: AttentionMeta, num_decode: int):
    kp = _gather_context(k_cache, meta.pre_tables)  # [kvh, Bp, L, hd]
    vp = _gather_context(v_cache, meta.pre_tables)
    kvh, bp, length, hd = kp.shape
    kp, vp = kp.reshape(kvh, bp * length, hd), vp.reshape(kvh, bp * length, hd)
    seq, pos = meta.pre_seq, meta.positions[num_decode:]
    key_seq = jnp.repeat(jnp.arange(bp), length)
    key_pos = jnp.tile(jnp.arange(length), bp)
    start = meta.pre_start[jnp.maximum(seq, 0)]  # [Tp]
    prev_ok = (key_seq[None, :] == seq[:, None]) & (key_pos[None, :] < start[:, None])
    s_prev = jnp.einsum("tkgd,kjd->tkgj", qp, kp, preferred_element_type=jnp.float32)
    s_prev = jnp.where(prev_ok[:, None, None, :], s_prev, NEG_INF)
    tp = qp.shape[0]
    blk = min(PREFILL_QUERY_BLOCK, tp)
    outs = []
    for lo in range(0, tp, blk):
        hi = min(tp, lo + blk)
        sc = jnp.einsum("tkgd,skd->tkgs", qp[lo:hi], kn[:hi], preferred_element_type=jnp.float32)
        ok = (seq[None, :hi] == seq[lo:hi, None]) & (pos[None, :hi] <= pos[lo:hi, None])
        sc = jnp.where(ok[:, None, None, :], sc, NEG_INF)
        sp = s_prev[lo:hi]
        m = jnp.maximum(sp.max(-1, keepdims=True), sc.max(-1, keepdims=True))
        pp, pc = jnp.exp(sp - m), jnp.exp(sc - m)
        den = pp.sum(-1, keepdims=True) + pc.sum(-1, keepdims=True)
        o = (jnp.einsum("tkgj,kjd->tkgd", pp.astype(qp.dtype), vp)
             + jnp.einsum("tkgs,skd->tkgd", pc.astype(qp.dtype), vn[:hi]))
        outs.append(o / den.astype(qp.dtype))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block: attention over paged KV, then a SwiGLU MLP."""

    cfg: ModelConfig
    num_kv_heads: int  # may exceed cfg.num_kv_heads when KV heads are replicated for TP
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, meta: AttentionMeta, num_decode: int):
        cfg, dt = self.cfg, self.dtype
        nh, kvh, hd = cfg.num_heads, self.num_kv_heads, cfg.head_dim
        t = x.shape[0]
        dense = lambda n, f, bias=False: nn.Dense(f, use_bias=bias, dtype=dt, param_dtype=dt, name=n)
        h = RMSNorm(cfg.rms_norm_eps, dt, name="input_norm")(x)
        q = dense("q_proj", nh * hd, cfg.attention_bias)(h).reshape(t, nh, hd)
        k = dense("k_proj", kvh * hd, cfg.attention_bias)(h).reshape(t, kvh, hd)
        v = dense("v_proj", kvh * hd, cfg.attention_bias)(h).reshape(t, kvh, hd)
        q = apply_rope(q, cos, sin) * jnp.asarray(hd ** -0.5, dt)
        k = apply_rope(k, cos, sin)
        k_cache = k_cache.at[:, meta.slot_blocks, meta.slot_offsets].set(
            k.transpose(1, 0, 2).astype(k_cache.dtype))
        v_cache = v_cache.at[:, meta.slot_blocks, meta.slot_offsets].set(
            v.transpose(1, 0, 2).astype(v_cache.dtype))
        q = q.reshape(t, kvh, nh // kvh, hd)
        a = paged_attention(q, k, v, k_cache, v_cache, meta, num_decode).reshape(t, nh * hd)
        x = x + dense("o_proj", cfg.hidden_size)(a)
        h = RMSNorm(cfg.rms_norm_eps, dt, name="post_norm")(x)
        g = dense("gate_proj", cfg.intermediate_size)(h)
        u = dense("up_proj", cfg.intermediate_size)(h)
        x = x + dense("down_proj", cfg.hidden_size)(jax.nn.silu(g) * u)
        return x, k_cache, v_cache


def embed_tokens(embed: jax.Array, token_ids: jax.Array, positions: jax.Array,
                 inv_freq: jax.Array):
    """-> hidden [T, H] and the RoPE cos/sin tables [T, hd/2] used by every layer."""
    cos, sin = rope_tables(positions, inv_freq)
    return embed[token_ids], cos, sin


def final_logits(final_norm: jax.Array, head: jax.Array, hidden: jax.Array, eps: float,
                 tied: bool) -> jax.Array:
    """hidden [B, H] -> float32 logits [B, V]. `head` is [H, V], or the embedding [V, H]
    when tied."""
    h = RMSNorm(eps, hidden.dtype).apply({"params": {"scale": final_norm}}, hidden)
    if tied:
        return jnp.einsum("bh,vh->bv", h, head, preferred_element_type=jnp.float32)
    return jnp.einsum("bh,hv->bv", h, head, preferred_element_type=jnp.float32)


def layer_params_to_flax(layer: dict, dtype, kv_repeat: int = 1, head_dim: Optional[int] = None) -> dict:
    """Loader layer dict (numpy, [in, out]) -> flax params for `DecoderLayer`.

    kv_repeat > 1 replicates each KV head that many times (consecutively), for tensor
    parallelism over more devices than the model has KV heads."""
    def rep(w):
        if kv_repeat == 1:
            return w
        lead = w.shape[:-1]
        w = w.reshape(*lead, -1, head_dim)
        return np.repeat(w, kv_repeat, axis=-2).reshape(*lead, -1)

    c = lambda a: np.asarray(a, dtype=dtype)
    p = {
        "input_norm": {"scale": c(layer["input_norm"])},
        "post_norm": {"scale": c(layer["post_norm"])},
        "q_proj": {"kernel": c(layer["q_proj"])},
        "k_proj": {"kernel": c(rep(layer["k_proj"]))},
        "v_proj": {"kernel": c(rep(layer["v_proj"]))},
        "o_proj": {"kernel": c(layer["o_proj"])},
        "gate_proj": {"kernel": c(layer["gate_proj"])},
        "up_proj": {"kernel": c(layer["up_proj"])},
        "down_proj": {"kernel": c(layer["down_proj"])},
    }
    if "q_bias" in layer:
        p["q_proj"]["bias"] = c(layer["q_bias"])
        p["k_proj"]["bias"] = c(rep(layer["k_bias"]))
        p["v_proj"]["bias"] = c(rep(layer["v_bias"]))
    return p
