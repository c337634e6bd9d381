"""Ragged paged attention: every row of one token axis attends to its own sequence's KV.

The layout is the contract (the runner builds it, `ragged_paged_attention` reads it; a
Pallas ragged paged-attention kernel on TPU/GPU can replace the XLA code below without
touching the scheduler or the runner). An iteration's tokens form one axis of T rows
(T from a few token-count buckets); no other dimension of any array depends on the work:

- rows [0, n_dec) are decode rows, one per decoding sequence; the next rows are the prefill
  chunks of at most `max_prefill_seqs` sequences, each chunk's rows contiguous and in
  position order; the rest is padding (written to the scratch block 0, never read);
- `dec_tables` [Dc, MB], `dec_lens` [Dc]: the block table and context length (the new
  token included) of decode row i < Dc, where Dc = min(T, max_num_seqs); rows without a
  decode have length 0;
- `pre_tables` [Bp, MB], `pre_start` [Bp]: for each prefill sequence (Bp =
  max_prefill_seqs), its blocks and where its chunk starts (its context before the chunk);
  `pre_seq` [T]: which prefill sequence a row belongs to (-1: not a prefill row);
- MB = max_blocks_per_seq, fixed: lengths are data, not shapes.

Each part of the context is read by a loop whose trip count is data (`chunk` blocks per
trip, only as far as the longest context of that part), with one online softmax across
the parts: decode rows read their whole context from the cache (this iteration's key is
already written); prefill rows read their context before the chunk from the cache and the
chunk itself, causally, from this iteration's keys (`k_new`, `v_new`) in blocks of
QUERY_BLOCK rows, so that keys past a block's last row are never scored. Short contexts
cost few trips, long ones more, in the same executable.

Scores of masked keys are NEG_INF, a finite number: a row with nothing to attend to (a
padding row) ends with finite garbage, never NaN, so it cannot poison other rows through
a 0 x NaN product. Pure functions, jitted by the runner inside each layer group.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

NEG_INF = -1e30
QUERY_BLOCK = 128  # prefill rows per causal block (keys past a block's last row are skipped)


@dataclass(frozen=True)
class AttentionMeta:
    """Per-iteration indices shared by every layer (device arrays, int32; see the module
    docstring). slot_blocks/slot_offsets [T]: where each row's K/V is written (padding ->
    block 0); positions [T]."""

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


def _gather(cache: jax.Array, tables: jax.Array) -> jax.Array:
    """cache [kvh, NB, bs, hd], tables [B, nb] -> [kvh, B, nb*bs, hd]."""
    g = cache.at[:, tables].get(mode="promise_in_bounds")  # [kvh, B, nb, bs, hd]
    kvh, b, nb, bs, hd = g.shape
    return g.reshape(kvh, b, nb * bs, hd)


def tail_chunk(chunk: int) -> int:
    """Blocks per trip of the tail loop that reads what whole `chunk`s leave over."""
    return max(1, chunk // 4)


def chunked_reads(tables, chunk: int, block_size: int, longest, step, init):
    """Run `carry = step(carry, blocks, first_token)` over slices of `tables` [B, nb] as far
    as `longest` tokens: whole `chunk`-block slices first, then the rest in
    `tail_chunk(chunk)`-block slices, so a short context reads no more than a tail chunk
    past its end (a 128-token context reads 8 blocks, not 16). `blocks` [B, c] is the
    slice (the scratch block 0 past the table's end: its positions are masked anyway),
    `first_token` the position of its first key. Trip counts are data."""
    nb = tables.shape[1]
    small = tail_chunk(chunk)
    width = max(-(-nb // chunk) * chunk, nb + small)
    tables = jnp.pad(tables, ((0, 0), (0, width - nb)))
    big_trips = jnp.clip(longest // (chunk * block_size), 0, nb // chunk)
    first = big_trips * chunk  # blocks the big loop covers
    rest = jnp.maximum(longest - first * block_size, 0)
    small_trips = (rest + small * block_size - 1) // (small * block_size)

    def big(i, carry):
        blocks = jax.lax.dynamic_slice_in_dim(tables, i * chunk, chunk, axis=1)
        return step(carry, blocks, i * chunk * block_size)

    def tail(i, carry):
        at = first + i * small
        blocks = jax.lax.dynamic_slice_in_dim(tables, at, small, axis=1)
        return step(carry, blocks, at * block_size)

    carry = jax.lax.fori_loop(0, big_trips, big, init)
    return jax.lax.fori_loop(0, small_trips, tail, carry)


def blocks_read(need: int, chunk: int, max_blocks: int) -> int:
    """Blocks `chunked_reads` reads for a context of `need` blocks (host-side mirror, for
    the latency model's features)."""
    if need <= 0:
        return 0
    big = min(need // chunk, max_blocks // chunk) * chunk
    small = tail_chunk(chunk)
    return big + -(-(need - big) // small) * small


def _online_step(carry, s, weighted_values):
    """One chunk of keys into a running softmax. carry: (max, denominator) [..., rows] and
    accumulated values [..., rows, hd]; `s` the chunk's masked float32 scores [..., rows,
    keys]; `weighted_values(p)` the chunk's values weighted by the probabilities."""
    m, den, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    rescale = jnp.exp(m - m_new)
    return m_new, den * rescale + p.sum(-1), acc * rescale[..., None] + weighted_values(p)


def _merge(a, b):
    """Two partial softmaxes (max, denominator, values) over disjoint keys -> one."""
    m = jnp.maximum(a[0], b[0])
    ra, rb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
    return m, a[1] * ra + b[1] * rb, a[2] * ra[..., None] + b[2] * rb[..., None]


def _empty(kvh: int, g: int, rows: int, hd: int):
    m = jnp.full((kvh, g, rows), NEG_INF, jnp.float32)
    return m, jnp.zeros_like(m), jnp.zeros((kvh, g, rows, hd), jnp.float32)


DECODE_GROUP = 8  # decode rows per group: only groups holding a decode row read the cache


def _decode_part(q, k_cache, v_cache, tables, lens, chunk: int):
    """Decode rows' whole context from the cache. q [kvh, g, Dc, hd] -> partial softmax
    over [kvh, g, Dc]. Rows with a decode are rows [0, n_dec) (`lens` > 0 there).

    Rows go in groups of DECODE_GROUP, in a loop whose trip count is the number of groups
    holding a decode (data): an iteration with 7 decodes in a 16-row decode table reads
    one group's contexts, not two, and each group reads only as far as its own longest
    context. Rows of groups never visited keep an empty softmax (max NEG_INF, denominator
    0), which `_merge` weighs as nothing."""
    kvh, g, dc, hd = q.shape
    qd = q.transpose(2, 0, 1, 3)  # [Dc, kvh, g, hd]
    if dc <= DECODE_GROUP:  # one group: no outer loop (its trip count is 0 without decodes)
        m, den, acc = _decode_rows(qd, k_cache, v_cache, tables, lens, chunk)
    else:
        m, den, acc = _decode_groups(qd, k_cache, v_cache, tables, lens, chunk)
    # to the merge layout [kvh, g, Dc(, hd)]
    return m.transpose(0, 2, 1), den.transpose(0, 2, 1), acc.transpose(0, 2, 1, 3)


def _decode_groups(qd, k_cache, v_cache, tables, lens, chunk: int):
    """`_decode_rows` over the live groups of DECODE_GROUP rows of qd [Dc, kvh, g, hd]
    (padded to whole groups); same outputs as `_decode_rows` for all Dc rows."""
    dc, kvh, g, hd = qd.shape
    grp = DECODE_GROUP
    groups = -(-dc // grp)
    pad = groups * grp - dc
    if pad:
        qd = jnp.pad(qd, ((0, pad), (0, 0), (0, 0), (0, 0)))
        tables = jnp.pad(tables, ((0, pad), (0, 0)))
        lens = jnp.pad(lens, (0, pad))
    live = (jnp.sum(lens > 0) + grp - 1) // grp

    def one_group(i, out):
        rows = i * grp
        qg = jax.lax.dynamic_slice_in_dim(qd, rows, grp, axis=0)
        tg = jax.lax.dynamic_slice_in_dim(tables, rows, grp, axis=0)
        lg = jax.lax.dynamic_slice_in_dim(lens, rows, grp, axis=0)
        part = _decode_rows(qg, k_cache, v_cache, tg, lg, chunk)
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, p, rows, axis=1)
                     for o, p in zip(out, part))

    m0 = jnp.full((kvh, groups * grp, g), NEG_INF, jnp.float32)
    init = (m0, jnp.zeros_like(m0), jnp.zeros((kvh, groups * grp, g, hd), jnp.float32))
    m, den, acc = jax.lax.fori_loop(0, live, one_group, init)
    return m[:, :dc], den[:, :dc], acc[:, :dc]


def _decode_rows(qd, k_cache, v_cache, tables, lens, chunk: int):
    """One group of decode rows: qd [G, kvh, g, hd] -> (max, denominator) [kvh, G, g] and
    values [kvh, G, g, hd]. Each row gathers its own table's chunk: [kvh, G, span, hd].

    Layout matters on CPU: the gathered K is the scores dot's left operand and the keys
    stay on axis 2 of the scores [kvh, G, span, g], so both dots are plain batched
    matmuls over (kvh, G) with no transposed copy of the gathered context (with the
    scores as [kvh, g, G, span] XLA:CPU ran the values dot ~5x slower)."""
    rows, kvh, g, hd = qd.shape

    def step(carry, blocks, first_token):
        kd, vd = _gather(k_cache, blocks), _gather(v_cache, blocks)  # [kvh, G, span, hd]
        span = kd.shape[2]
        s = jnp.einsum("kbld,bkgd->kblg", kd, qd, preferred_element_type=jnp.float32)
        valid = (first_token + jnp.arange(span))[None, :] < lens[:, None]  # [G, span]
        s = jnp.where(valid[None, :, :, None], s, NEG_INF)
        m, den, acc = carry  # [kvh, G, g], [kvh, G, g], [kvh, G, g, hd]
        m_new = jnp.maximum(m, s.max(2))
        p = jnp.exp(s - m_new[:, :, None, :])
        rescale = jnp.exp(m - m_new)
        pv = jnp.einsum("kblg,kbld->kbgd", p.astype(qd.dtype), vd,
                        preferred_element_type=jnp.float32)
        return m_new, den * rescale + p.sum(2), acc * rescale[..., None] + pv

    m0 = jnp.full((kvh, rows, g), NEG_INF, jnp.float32)
    return chunked_reads(tables, chunk, k_cache.shape[2], jnp.max(lens), step,
                         (m0, jnp.zeros_like(m0), jnp.zeros((kvh, rows, g, hd), jnp.float32)))


def _prefill_context_part(q, k_cache, v_cache, meta: AttentionMeta, chunk: int):
    """Prefill rows' context before their chunk, from the cache, for all T rows (rows of
    other kinds are masked). q [kvh, g, T, hd] -> partial softmax over [kvh, g, T]."""
    kvh, g, t, hd = q.shape
    bp = meta.pre_tables.shape[0]
    seq = meta.pre_seq
    start = jnp.where(seq >= 0, meta.pre_start[jnp.maximum(seq, 0)], 0)  # [T]

    def step(carry, blocks, first_token):
        kp = _gather(k_cache, blocks)  # [kvh, bp, span, hd]
        span = kp.shape[2]
        kp = kp.reshape(kvh, bp * span, hd)
        vp = _gather(v_cache, blocks).reshape(kvh, bp * span, hd)
        key_seq = jnp.repeat(jnp.arange(bp), span)
        key_pos = first_token + jnp.tile(jnp.arange(span), bp)
        ok = (key_seq[None, :] == seq[:, None]) & (key_pos[None, :] < start[:, None])
        s = jnp.einsum("kgtd,kjd->kgtj", q, kp, preferred_element_type=jnp.float32)
        s = jnp.where(ok[None, None], s, NEG_INF)
        return _online_step(carry, s, lambda p: jnp.einsum(
            "kgtj,kjd->kgtd", p.astype(q.dtype), vp, preferred_element_type=jnp.float32))

    return chunked_reads(meta.pre_tables, chunk, k_cache.shape[2], jnp.max(meta.pre_start),
                         step, _empty(kvh, g, t, hd))


def ragged_paged_attention(q, k_new, v_new, k_cache, v_cache, meta: AttentionMeta,
                           chunk: int):
    """q [T, kvh, g, hd] (scaled, rotated); k_new/v_new [T, kvh, hd] this iteration's keys
    and values, already written to the caches. Returns [T, kvh, g, hd]. `chunk`: KV blocks
    per loop trip (> 0).

    An iteration without prefill rows (decoding only: the common step) skips the prefill
    parts through a `lax.cond`: at one decode row their setup, masks and merges were
    ~0.03-0.06 ms a layer of ops with nothing to do."""
    t, kvh, g, hd = q.shape
    dc = meta.dec_tables.shape[0]
    qt = q.transpose(1, 2, 0, 3)  # [kvh, g, T, hd]
    dec = _decode_part(qt[:, :, :dc], k_cache, v_cache, meta.dec_tables, meta.dec_lens, chunk)
    if dc < t:  # rows past the decode capacity have no decode part
        rest = _empty(kvh, g, t - dc, hd)
        dec = tuple(jnp.concatenate([a, b], axis=2) for a, b in zip(dec, rest))

    def decode_only(dec):
        m, den, acc = dec  # rows without a decode (padding) have den 0: give them zeros
        return (acc / jnp.where(den > 0, den, 1.0)[..., None]).astype(q.dtype)

    def with_prefill(dec):
        return _with_prefill(qt, k_new, v_new, k_cache, v_cache, meta, chunk, dec)

    out = jax.lax.cond(jnp.any(meta.pre_seq >= 0), with_prefill, decode_only, dec)
    return out.transpose(2, 0, 1, 3)


def _with_prefill(qt, k_new, v_new, k_cache, v_cache, meta: AttentionMeta, chunk: int, dec):
    """Every row's output [kvh, g, T, hd] given the decode part `dec`: the prefill rows'
    context from the cache, then the chunks' own keys, causally, per query block."""
    kvh, g, t, hd = qt.shape
    kn, vn = k_new.transpose(1, 0, 2), v_new.transpose(1, 0, 2)  # [kvh, T, hd]
    ctx = _merge(dec, _prefill_context_part(qt, k_cache, v_cache, meta, chunk))
    seq, pos = meta.pre_seq, meta.positions
    outs = []
    blk = min(QUERY_BLOCK, t)
    for lo in range(0, t, blk):
        hi = min(t, lo + blk)
        sc = jnp.einsum("kgtd,ksd->kgts", qt[:, :, lo:hi], kn[:, :hi],
                        preferred_element_type=jnp.float32)
        ok = ((seq[None, :hi] == seq[lo:hi, None]) & (seq[lo:hi, None] >= 0)
              & (pos[None, :hi] <= pos[lo:hi, None]))
        sc = jnp.where(ok[None, None], sc, NEG_INF)
        part = _online_step(_empty(kvh, g, hi - lo, hd), sc, lambda p: jnp.einsum(
            "kgts,ksd->kgtd", p.astype(qt.dtype), vn[:, :hi], preferred_element_type=jnp.float32))
        m, den, acc = _merge(tuple(a[:, :, lo:hi] for a in ctx), part)
        outs.append((acc / den[..., None]).astype(qt.dtype))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
