"""Llama-family decoder in JAX: the three pieces the runner calls one after another.

`embed_tokens` (token ids -> hidden, plus the RoPE tables shared by all layers),
`run_layers` (consecutive transformer blocks over paged KV, each with its own params and
cache pair; `decoder_layer` is one block), and `final_logits` (final norm + LM head). The
runner jits `run_layers` for a few group sizes (layers per call) once per shape bucket;
every group of that size reuses the same compiled executable.

Token layout of an iteration (all arrays padded to bucket sizes by the runner):
rows [0, Bd) are decode tokens, one per decoding sequence; rows [Bd, Bd+Tp) are prefill
tokens of at most Bp sequences. Padding rows write their KV to the scratch block 0 and are
masked out of every attention. Pure functions: no state, caches come in and go out.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from conserve_jax.config import ModelConfig

NEG_INF = -1e30
# XLA:CPU runs a bfloat16 dot with fewer than this many rows on a slow path (8x slower
# than float32 at one row, measured here); padding to it costs ~1.2x a float32 row
MIN_LOW_PRECISION_ROWS = 8


def project(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(eq, x, w) for a weight matmul (x's first axis: token rows). A weight stored
    in a lower precision than x (`weight_dtype`) gets x rounded to its dtype, products
    accumulated in float32, and the result back in x's dtype."""
    if w.dtype == x.dtype:
        return jnp.einsum(eq, x, w)
    rows = x.shape[0]
    xl = x.astype(w.dtype)
    if rows < MIN_LOW_PRECISION_ROWS:
        xl = jnp.pad(xl, [(0, MIN_LOW_PRECISION_ROWS - rows)] + [(0, 0)] * (x.ndim - 1))
    return jnp.einsum(eq, xl, w, preferred_element_type=jnp.float32)[:rows].astype(x.dtype)


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
    g = cache.at[:, tables].get(mode="promise_in_bounds")  # [kvh, B, nb, bs, hd]
    kvh, b, nb, bs, hd = g.shape
    return g.reshape(kvh, b, nb * bs, hd)


PREFILL_QUERY_BLOCK = 128  # prefill rows per causal block (keys past a block are skipped)


def paged_attention(q, k_new, v_new, k_cache, v_cache, meta: AttentionMeta, num_decode: int,
                    chunk: int = 0):
    """q [T, kvh, g, hd] (scaled, rotated); k_new/v_new [T, kvh, hd] this iteration's keys
    and values, already written to the cache. Returns [T, kvh, g, hd].

    Decode rows attend to their whole context read from the cache (`decode_attention`).
    Prefill rows attend to (a) their sequence's context before the chunk, read from the
    cache (`chunk` blocks at a time when `uses_prefill_chunks`), and (b) the chunk itself,
    causally, from k_new/v_new in row blocks so that keys past a block's last row are never
    computed; (a) and (b) share one softmax."""
    outs = []
    if num_decode:
        outs.append(decode_attention(q[:num_decode], k_cache, v_cache, meta.dec_tables,
                                     meta.dec_lens, chunk))
    if q.shape[0] > num_decode:
        outs.append(_prefill_attention(q[num_decode:], k_new[num_decode:], v_new[num_decode:],
                                       k_cache, v_cache, meta, num_decode, chunk))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


# fewer decode rows than this read the whole bucket at once even past a chunk: their
# gathered context fits in cache, and the loop's cost per trip (~17 us here) cancelled what
# skipping the padding saved (measured: 1 row 0.95-1.04x, 8 rows 0.96-1.16x, 32 rows
# 1.26-1.67x with exact and half-empty 2048-token buckets)
DECODE_CHUNK_MIN_ROWS = 8


def uses_decode_chunks(rows: int, nb: int, chunk: int) -> bool:
    """Whether `decode_attention` loops over chunks for `rows` decode rows (bucketed) and a
    context bucket of `nb` blocks."""
    return bool(chunk) and nb > chunk and rows >= DECODE_CHUNK_MIN_ROWS


def uses_prefill_chunks(nb: int, chunk: int) -> bool:
    """Whether prefill rows read their earlier context (a bucket of `nb` blocks) in a loop
    over chunks. Only past two chunks: a 512-token prefill chunk after 300-512 tokens ran
    at 0.96x in the loop, after 1024 at 1.04x, after 1100 and 1536 at 1.39x and 1.26x."""
    return bool(chunk) and nb > 2 * chunk


def decode_attention(q, k_cache, v_cache, tables, lens, chunk: int = 0):
    """q [Bd, kvh, g, hd]; tables [Bd, nb] (the context bucket); lens [Bd] tokens of context
    (rows with 0 are padding: finite garbage out). Returns [Bd, kvh, g, hd].

    With `chunk` > 0, a bucket of more than `chunk` blocks and at least
    DECODE_CHUNK_MIN_ROWS rows, the context is read `chunk` blocks at a time in a loop that
    stops after the batch's longest context, with an online softmax across chunks: the
    work follows max(lens), not the bucket, and each chunk's gathered K/V stay in cache.
    Otherwise the whole bucket is gathered at once (fewer, larger ops)."""
    if not uses_decode_chunks(tables.shape[0], tables.shape[1], chunk):
        return _decode_attention_once(q, k_cache, v_cache, tables, lens)
    return _decode_attention_chunked(q, k_cache, v_cache, tables, lens, chunk)


def _decode_attention_once(q, k_cache, v_cache, tables, lens):
    # K is the dot's left operand ([L, hd] rows as gathered), so XLA needs no transposed
    # copy of the gathered context; the softmax runs over axis 2 (keys)
    kd = _gather_context(k_cache, tables)  # [kvh, Bd, L, hd]
    vd = _gather_context(v_cache, tables)
    s = jnp.einsum("kbld,bkgd->kblg", kd, q, preferred_element_type=jnp.float32)
    valid = jnp.arange(kd.shape[2])[None, :] < lens[:, None]  # [Bd, L]
    s = jnp.where(valid[None, :, :, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=2).astype(q.dtype)
    return jnp.einsum("kblg,kbld->bkgd", p, vd)


def _chunk_loop(tables, chunk: int, block_size: int, longest):
    """Bounds of a loop over `chunk`-block slices of `tables` [B, nb] that stops after
    `longest` tokens: (tables padded to whole chunks with the scratch block 0, whose
    positions are masked anyway; tokens per chunk; trips, at least one)."""
    n = -(-tables.shape[1] // chunk)
    tables = jnp.pad(tables, ((0, 0), (0, n * chunk - tables.shape[1])))
    span = chunk * block_size
    return tables, span, jnp.clip((longest + span - 1) // span, 1, n)


def _online_softmax_step(carry, s, axis: int, weighted_values):
    """One chunk of keys into a running softmax: carry (max, denominator, accumulated
    values), `s` the chunk's masked float32 scores with keys on `axis`, and
    `weighted_values(p)` the chunk's values weighted by the (unnormalised) probabilities."""
    m, den, acc = carry
    m_new = jnp.maximum(m, s.max(axis))
    p = jnp.exp(s - jnp.expand_dims(m_new, axis))
    rescale = jnp.exp(m - m_new)
    return m_new, den * rescale + p.sum(axis), acc * rescale[..., None] + weighted_values(p)


def _decode_attention_chunked(q, k_cache, v_cache, tables, lens, chunk: int):
    bd = tables.shape[0]
    kvh, g, hd = q.shape[1:]
    tables, span, trips = _chunk_loop(tables, chunk, k_cache.shape[2], jnp.max(lens))

    def step(i, carry):  # carry: max and denominator [kvh, Bd, g]; values [kvh, Bd, g, hd]
        t = jax.lax.dynamic_slice_in_dim(tables, i * chunk, chunk, axis=1)
        kd, vd = _gather_context(k_cache, t), _gather_context(v_cache, t)
        s = jnp.einsum("kbld,bkgd->kblg", kd, q, preferred_element_type=jnp.float32)
        valid = (i * span + jnp.arange(span))[None, :] < lens[:, None]  # [Bd, span]
        s = jnp.where(valid[None, :, :, None], s, NEG_INF)
        return _online_softmax_step(carry, s, 2, lambda p: jnp.einsum(
            "kblg,kbld->kbgd", p.astype(q.dtype), vd, preferred_element_type=jnp.float32))

    m0 = jnp.full((kvh, bd, g), NEG_INF, jnp.float32)
    init = (m0, jnp.zeros_like(m0), jnp.zeros((kvh, bd, g, hd), jnp.float32))
    _, den, acc = jax.lax.fori_loop(0, trips, step, init)
    return (acc / den[..., None]).astype(q.dtype).transpose(1, 0, 2, 3)


def _prefill_attention(qp, kn, vn, k_cache, v_cache, meta: AttentionMeta, num_decode: int,
                       chunk: int = 0):
    """Runs in [kvh, g, T, ...] layout (KV heads and their query groups leading) so that
    scores and probabilities feed the dots without transposed copies."""
    seq, pos = meta.pre_seq, meta.positions[num_decode:]
    start = meta.pre_start[jnp.maximum(seq, 0)]  # [Tp]
    q = qp.transpose(1, 2, 0, 3)  # [kvh, g, Tp, hd]
    kn, vn = kn.transpose(1, 0, 2), vn.transpose(1, 0, 2)  # [kvh, Tp, hd]
    if uses_prefill_chunks(meta.pre_tables.shape[1], chunk):
        return _prefill_attention_chunked(q, kn, vn, seq, pos, start, k_cache, v_cache, meta,
                                          chunk)
    kp = _gather_context(k_cache, meta.pre_tables)  # [kvh, Bp, L, hd]
    vp = _gather_context(v_cache, meta.pre_tables)
    kvh, bp, length, hd = kp.shape
    kp, vp = kp.reshape(kvh, bp * length, hd), vp.reshape(kvh, bp * length, hd)
    key_seq = jnp.repeat(jnp.arange(bp), length)
    key_pos = jnp.tile(jnp.arange(length), bp)
    prev_ok = (key_seq[None, :] == seq[:, None]) & (key_pos[None, :] < start[:, None])
    s_prev = jnp.einsum("kgtd,kjd->kgtj", q, kp, preferred_element_type=jnp.float32)
    s_prev = jnp.where(prev_ok[None, None], s_prev, NEG_INF)
    outs = []
    for lo, hi, sc in _causal_blocks(q, kn, seq, pos):
        sp = s_prev[:, :, lo:hi]
        m = jnp.maximum(sp.max(-1, keepdims=True), sc.max(-1, keepdims=True))
        pp, pc = jnp.exp(sp - m), jnp.exp(sc - m)
        den = pp.sum(-1, keepdims=True) + pc.sum(-1, keepdims=True)
        o = (jnp.einsum("kgtj,kjd->kgtd", pp.astype(q.dtype), vp)
             + jnp.einsum("kgts,ksd->kgtd", pc.astype(q.dtype), vn[:, :hi]))
        outs.append(o / den.astype(q.dtype))
    return _rows_first(outs)


def _causal_blocks(q, kn, seq, pos):
    """(lo, hi, scores) for each block of PREFILL_QUERY_BLOCK prefill rows [lo, hi): the
    rows against the chunk's own keys up to row hi, masked causally within each sequence
    (q [kvh, g, Tp, hd], kn [kvh, Tp, hd], seq/pos [Tp])."""
    tp = q.shape[2]
    blk = min(PREFILL_QUERY_BLOCK, tp)
    for lo in range(0, tp, blk):
        hi = min(tp, lo + blk)
        sc = jnp.einsum("kgtd,ksd->kgts", q[:, :, lo:hi], kn[:, :hi],
                        preferred_element_type=jnp.float32)
        ok = (seq[None, :hi] == seq[lo:hi, None]) & (pos[None, :hi] <= pos[lo:hi, None])
        yield lo, hi, jnp.where(ok[None, None], sc, NEG_INF)


def _rows_first(blocks: list):
    """Query blocks [kvh, g, rows, hd] -> [Tp, kvh, g, hd]."""
    out = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=2)
    return out.transpose(2, 0, 1, 3)


def _prefill_attention_chunked(q, kn, vn, seq, pos, start, k_cache, v_cache,
                               meta: AttentionMeta, chunk: int):
    """`_prefill_attention` (its arrays already in [kvh, g, Tp, ...] layout; `start` each
    row's earlier context) with the earlier context read `chunk` blocks at a time, only as
    far as the longest earlier context (online softmax across chunks), then merged with the
    causal part of each query block."""
    kvh, g, tp, hd = q.shape
    bp = meta.pre_tables.shape[0]
    tables, span, trips = _chunk_loop(meta.pre_tables, chunk, k_cache.shape[2],
                                      jnp.max(meta.pre_start))
    key_seq = jnp.repeat(jnp.arange(bp), span)

    def step(i, carry):  # carry: max and denominator [kvh, g, Tp]; values [kvh, g, Tp, hd]
        t = jax.lax.dynamic_slice_in_dim(tables, i * chunk, chunk, axis=1)
        kp = _gather_context(k_cache, t).reshape(kvh, bp * span, hd)
        vp = _gather_context(v_cache, t).reshape(kvh, bp * span, hd)
        key_pos = i * span + jnp.tile(jnp.arange(span), bp)
        ok = (key_seq[None, :] == seq[:, None]) & (key_pos[None, :] < start[:, None])
        s = jnp.einsum("kgtd,kjd->kgtj", q, kp, preferred_element_type=jnp.float32)
        s = jnp.where(ok[None, None], s, NEG_INF)
        return _online_softmax_step(carry, s, -1, lambda p: jnp.einsum(
            "kgtj,kjd->kgtd", p.astype(q.dtype), vp, preferred_element_type=jnp.float32))

    m0 = jnp.full((kvh, g, tp), NEG_INF, jnp.float32)
    m_prev, den_prev, acc_prev = jax.lax.fori_loop(
        0, trips, step, (m0, jnp.zeros_like(m0), jnp.zeros((kvh, g, tp, hd), jnp.float32)))
    # rows without earlier context keep m = NEG_INF: their loop sums are scaled by 0 below
    outs = []
    for lo, hi, sc in _causal_blocks(q, kn, seq, pos):
        m = jnp.maximum(m_prev[:, :, lo:hi], sc.max(-1))
        r, pc = jnp.exp(m_prev[:, :, lo:hi] - m), jnp.exp(sc - m[..., None])
        den = den_prev[:, :, lo:hi] * r + pc.sum(-1)
        o = acc_prev[:, :, lo:hi] * r[..., None] + jnp.einsum(
            "kgts,ksd->kgtd", pc.astype(q.dtype), vn[:, :hi], preferred_element_type=jnp.float32)
        outs.append((o / den[..., None]).astype(q.dtype))
    return _rows_first(outs)


def decoder_layer(p: dict, x, cos, sin, k_cache, v_cache, meta: AttentionMeta, *,
                  cfg: ModelConfig, num_decode: int, attention_chunk: int = 0):
    """One pre-norm transformer block: attention over paged KV, then a SwiGLU MLP.

    `p` is one layer of `layer_params` (fused QKV and gate/up weights: one dot each).
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
    a = paged_attention(q, k, v, k_cache, v_cache, meta, num_decode, attention_chunk)
    a = a.reshape(t, kvh * g * hd)
    x = x + project("ta,ah->th", a, p["o"])
    h = rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
    gu = project("th,hci->tci", h, p["gate_up"])  # [T, 2, I]
    x = x + project("ti,ih->th", jax.nn.silu(gu[:, 0]) * gu[:, 1], p["down"])
    return x, k_cache, v_cache


def apply_rope(x, c, s):
    """Rotate-half RoPE on the last axis of x; c/s broadcast against x[..., :hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = c.astype(x.dtype), s.astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def run_layers(layers: list, x, cos, sin, caches: list, meta: AttentionMeta, *,
               cfg: ModelConfig, attention_chunk: int = 0):
    """Apply consecutive layers (unrolled). caches: one (k, v) pair per layer;
    `attention_chunk`: see `paged_attention`. Returns (x, new caches)."""
    num_decode = meta.dec_tables.shape[0]
    new = []
    for p, (kc, vc) in zip(layers, caches):
        x, kc, vc = decoder_layer(p, x, cos, sin, kc, vc, meta, cfg=cfg, num_decode=num_decode,
                                  attention_chunk=attention_chunk)
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
