"""Our ragged paged attention (`models/attention.py`) against the Pallas kernels the
installed JAX ships for the same layout, run on CPU in Pallas interpret mode (issue 24,
item 2: the layout is the attention's contract, so on TPU/GPU a Pallas kernel can replace
the XLA loop; this keeps that path honest).

One random iteration in the runner's layout (`runtime/batch_arrays.py`): 4 decode rows
(contexts of 37, 1, 16 and 58 tokens, the new token's K/V already in the cache) in 6 decode
slots, then 2 prefill chunks with earlier context (7 rows after 21 tokens, 9 rows after 40,
both crossing a block boundary; their K/V written to the cache before attention, as a layer
does), then padding to 32 rows; blocks of 8 tokens shuffled across the cache, tables padded
with the scratch block 0 (filled with large values that must never leak). `pre_tables`
hold only the blocks before each chunk, as the runner builds them.

- `jax.experimental.pallas.ops.tpu.ragged_paged_attention` (mixed prefill and decode, the
  kernel our layout was made for), in TPU interpret mode (`pltpu.force_tpu_interpret_mode`,
  which simulates its DMAs and semaphores on CPU): every real row. `ragged_kernel_inputs`
  is the jittable adapter from our layout to its arguments; it is also checked against
  the kernel's pure-JAX reference, `ref_ragged_paged_attention`.
- `jax.experimental.pallas.ops.tpu.paged_attention` (decode only; its K/V pages are our
  caches as they are): the decode rows, in TPU interpret mode.
- `jax.experimental.pallas.ops.gpu.paged_attention` (decode only, Triton), with its
  `interpret=True`: the decode rows.

float32 throughout (K/V values exactly representable in bfloat16, since the TPU decode
kernel casts its pages to bfloat16); outputs must match ours to 1e-5. A kernel that cannot
run in interpret mode on this JAX skips with the exception it raised, never passes
silently: with jax 0.10.2 the ragged kernel does (`UNSUPPORTED`: TPU interpret mode cannot
load through a reshaped ref), so its rows are covered by its pure-JAX reference and, for
the decode rows, by the two decode kernels, which do run.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conserve_jax.models.attention import AttentionMeta, ragged_paged_attention

KVH, G, HD, BS, MB = 2, 2, 128, 8, 8  # kv heads, q heads per kv head, head dim, block, blocks/seq
T, DC, BP = 32, 6, 3  # token rows, decode slots, prefill slots
DECODES = [37, 1, 16, 58]  # context lengths, the new token included
PREFILLS = [(21, 7), (40, 9)]  # (context before the chunk, chunk rows)
CHUNK = 2  # our loop's blocks per trip
TOL = dict(rtol=1e-5, atol=1e-5)


def _bf16_exact(x):
    """float32 values that bfloat16 holds exactly: the TPU decode kernel casts its K/V
    pages to bfloat16, which must not be what the comparison measures."""
    return np.asarray(x, jnp.bfloat16).astype(np.float32)


def _case(seed=0):
    """(q, k_new, v_new, k_cache, v_cache, meta, full block tables per sequence)."""
    rng = np.random.default_rng(seed)
    nseq = len(DECODES) + len(PREFILLS)
    nb = 1 + nseq * MB
    k, v = _bf16_exact(rng.standard_normal((2, KVH, nb, BS, HD)))
    k[:, 0], v[:, 0] = 1e3, -1e3  # the scratch block: masked wherever a table pads with it
    tables = rng.permutation(np.arange(1, nb)).astype(np.int32).reshape(nseq, MB)
    q = (rng.standard_normal((T, KVH, G, HD)) * HD ** -0.5).astype(np.float32)  # scaled
    kn, vn = _bf16_exact(rng.standard_normal((2, T, KVH, HD)))
    pos, slot_b, slot_o = (np.zeros(T, np.int32) for _ in range(3))
    dec_tables, dec_lens = np.zeros((DC, MB), np.int32), np.zeros(DC, np.int32)
    pre_tables, pre_start = np.zeros((BP, MB), np.int32), np.zeros(BP, np.int32)
    pre_seq = np.full(T, -1, np.int32)
    for i, n in enumerate(DECODES):  # as build_batch: the table up to the new token
        nblk = -(-n // BS)
        dec_tables[i, :nblk], dec_lens[i], pos[i] = tables[i, :nblk], n, n - 1
        slot_b[i], slot_o[i] = tables[i, (n - 1) // BS], (n - 1) % BS
        kn[i], vn[i] = k[:, slot_b[i], slot_o[i]], v[:, slot_b[i], slot_o[i]]  # already written
    row = len(DECODES)
    for j, (start, rows) in enumerate(PREFILLS):
        s = len(DECODES) + j
        nblk = -(-start // BS)  # as build_batch: only the blocks before the chunk
        pre_tables[j, :nblk], pre_start[j] = tables[s, :nblk], start
        for r in range(rows):
            p = start + r
            pos[row + r], pre_seq[row + r] = p, j
            slot_b[row + r], slot_o[row + r] = tables[s, p // BS], p % BS
            k[:, slot_b[row + r], slot_o[row + r]] = kn[row + r]  # the layer writes, then attends
            v[:, slot_b[row + r], slot_o[row + r]] = vn[row + r]
        row += rows
    a = jnp.asarray
    meta = AttentionMeta(a(slot_b), a(slot_o), a(pos), a(dec_tables), a(dec_lens),
                         a(pre_tables), a(pre_start), a(pre_seq))
    return q, kn, vn, k, v, meta, tables


def _real_rows():
    return len(DECODES) + sum(rows for _, rows in PREFILLS)


def _ours(q, kn, vn, k, v, meta):
    f = jax.jit(ragged_paged_attention, static_argnames=("chunk",))
    return np.asarray(f(jnp.asarray(q), jnp.asarray(kn), jnp.asarray(vn), jnp.asarray(k),
                        jnp.asarray(v), meta, chunk=CHUNK))


def _numpy_reference(q, k, v, tables):
    """Per real row: plain softmax over its sequence's cached keys up to its position."""
    out = {}
    rows = [(i, i, n) for i, n in enumerate(DECODES)]
    row = len(DECODES)
    for j, (start, n) in enumerate(PREFILLS):
        rows += [(row + r, len(DECODES) + j, start + r + 1) for r in range(n)]
        row += n
    for r, s, ctx in rows:
        kk = k[:, tables[s]].reshape(KVH, MB * BS, HD)[:, :ctx]
        vv = v[:, tables[s]].reshape(KVH, MB * BS, HD)[:, :ctx]
        sc = np.einsum("kgd,knd->kgn", q[r].astype(np.float64), kk)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        out[r] = np.einsum("kgn,knd->kgd", p / p.sum(-1, keepdims=True), vv)
    return out


def ragged_kernel_inputs(q, k_cache, v_cache, meta: AttentionMeta):
    """Our layout -> the arguments of JAX's TPU `ragged_paged_attention` (call it with
    sm_scale=1: our q is already scaled). Jittable, fixed shapes: what a TPU backend would
    call in place of ours.

    The kernel's sequences are ours in row order: the n_dec decode rows (q_len 1, kv_len
    the context), then the prefill chunks (q_len the chunk's rows, kv_len the context
    before the chunk plus the chunk: the kernel reads the chunk's own keys from the cache,
    where the layer has written them). Our `pre_tables` hold only the blocks before the
    chunk, so the chunk's blocks come from `slot_blocks` at the rows' positions. K and V
    pages are interleaved per head: [blocks, block_size, 2 * kvh (k0, v0, k1, ...), hd].
    Returns (q [T, kvh*g, hd], kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)."""
    t, kvh, g, hd = q.shape
    dc, bp = meta.dec_tables.shape[0], meta.pre_tables.shape[0]
    bs = k_cache.shape[2]
    n_dec = jnp.sum(meta.dec_lens > 0)
    pre_rows = jnp.sum(meta.pre_seq[None, :] == jnp.arange(bp)[:, None], axis=1)  # [Bp]
    n_pre = jnp.sum(pre_rows > 0)
    own = jnp.where(meta.pre_seq >= 0, meta.pre_seq, bp)  # padding rows: dropped below
    pre_tables = meta.pre_tables.at[own, meta.positions // bs].set(meta.slot_blocks,
                                                                   mode="drop")
    s = jnp.arange(dc + bp)
    is_dec = s < n_dec
    j = jnp.clip(s - n_dec, 0, bp - 1)
    is_pre = ~is_dec & (s - n_dec < n_pre)
    d = jnp.minimum(s, dc - 1)
    kv_lens = jnp.where(is_dec, meta.dec_lens[d],
                        jnp.where(is_pre, meta.pre_start[j] + pre_rows[j], 0))
    q_lens = jnp.where(is_dec, 1, jnp.where(is_pre, pre_rows[j], 0))
    page_indices = jnp.where(is_dec[:, None], meta.dec_tables[d], pre_tables[j])
    cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens)]).astype(jnp.int32)
    kv_pages = jnp.stack([k_cache.transpose(1, 2, 0, 3), v_cache.transpose(1, 2, 0, 3)],
                         axis=3).reshape(k_cache.shape[1], bs, 2 * kvh, hd)
    num_seqs = (n_dec + n_pre).reshape(1).astype(jnp.int32)
    return (q.reshape(t, kvh * g, hd), kv_pages, kv_lens.astype(jnp.int32),
            page_indices.astype(jnp.int32), cu_q_lens, num_seqs)


# What interpret mode cannot do in the installed JAX, as found by running the kernels (a
# failure raised inside the interpreter's callbacks surfaces as a JaxRuntimeError).
# jax 0.10.2: TPU interpret mode's `get` turns a ref's transforms into index ranges and
# handles indexing only (`interpret/utils.py`, `to_range`), but the ragged kernel reshapes
# its VMEM K/V buffer ref (`cur_async_copy_kv.wait().reshape(...)`) before loading it.
# (Pallas's generic interpreter, interpret=True, fails on it too, earlier: discharging its
# stores raises AttributeError: 'TypedInt' object has no attribute 'shape'.)
UNSUPPORTED = ("'ReshapeTransform' object has no attribute 'indices'",)


def _interpreted(what, run):
    """Run a kernel in interpret mode. If it fails for a reason interpret mode is known not
    to support in this JAX, skip with that reason; any other failure fails the test."""
    try:
        return np.asarray(run())
    except (NotImplementedError, jax.errors.JaxRuntimeError) as e:
        from jax.experimental.pallas import tpu as pltpu
        pltpu.reset_tpu_interpret_mode_state()
        known = [m for m in UNSUPPORTED if m in str(e)]
        if not isinstance(e, NotImplementedError) and not known:
            raise
        reason = known[0] if known else str(e).splitlines()[0]
        pytest.skip(f"{what} does not run in Pallas interpret mode on CPU with jax "
                    f"{jax.__version__}: {type(e).__name__}: {reason}")


def test_our_attention_matches_a_plain_softmax_on_this_case():
    """The case itself (chunk keys read from the cache, tables as the runner pads them)."""
    q, kn, vn, k, v, meta, tables = _case()
    out = _ours(q, kn, vn, k, v, meta)
    for r, ref in _numpy_reference(q, k, v, tables).items():
        np.testing.assert_allclose(out[r], ref, err_msg=f"row {r}", **TOL)


def test_tpu_ragged_paged_attention_kernel_matches_ours():
    """Every real row, decode and prefill, through JAX's mixed ragged kernel."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        dynamic_validate_inputs, ragged_paged_attention as pallas_ragged)
    q, kn, vn, k, v, meta, _ = _case()
    ours = _ours(q, kn, vn, k, v, meta)
    args = jax.jit(ragged_kernel_inputs)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), meta)
    qk, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = args
    assert int(num_seqs[0]) == len(DECODES) + len(PREFILLS)
    assert int(cu_q_lens[num_seqs[0]]) == _real_rows()
    assert list(np.asarray(kv_lens[:int(num_seqs[0])])) == (
        DECODES + [start + rows for start, rows in PREFILLS])
    dynamic_validate_inputs(*args)

    def run():
        with pltpu.force_tpu_interpret_mode():
            return pallas_ragged(qk, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                 sm_scale=1.0, num_kv_pages_per_block=2,
                                 num_queries_per_block=8)  # 4 query blocks; no TPU tuning table

    out = _interpreted("jax's TPU ragged_paged_attention", run).reshape(T, KVH, G, HD)
    n = _real_rows()
    np.testing.assert_allclose(out[:n], ours[:n], **TOL)


def test_ragged_kernel_reference_matches_ours():
    """The adapter against the ragged kernel's own pure-JAX reference
    (`ref_ragged_paged_attention`, shipped beside it): our layout maps onto the kernel's
    semantics, whether or not the kernel itself can be interpreted here."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ref_ragged_paged_attention)
    q, kn, vn, k, v, meta, _ = _case()
    ours = _ours(q, kn, vn, k, v, meta)
    args = jax.jit(ragged_kernel_inputs)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), meta)
    out = np.asarray(ref_ragged_paged_attention(*args, sm_scale=1.0))
    n = _real_rows()
    np.testing.assert_allclose(out.reshape(n, KVH, G, HD), ours[:n], **TOL)


def test_tpu_paged_attention_kernel_matches_our_decode_rows():
    """All decode slots (empty ones have length 0) through JAX's TPU decode kernel, whose
    K/V pages are our caches unchanged."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
    q, kn, vn, k, v, meta, _ = _case()
    ours = _ours(q, kn, vn, k, v, meta)

    def run():
        with pltpu.force_tpu_interpret_mode():
            return paged_attention(jnp.asarray(q[:DC]).reshape(DC, KVH * G, HD),
                                   jnp.asarray(k), jnp.asarray(v), meta.dec_lens,
                                   meta.dec_tables, pages_per_compute_block=2)

    out = _interpreted("jax's TPU paged_attention", run).reshape(DC, KVH, G, HD)
    n = len(DECODES)
    np.testing.assert_allclose(out[:n], ours[:n], **TOL)


def test_gpu_paged_attention_kernel_matches_our_decode_rows():
    """All decode slots through JAX's GPU (Triton) decode kernel with interpret=True."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    q, kn, vn, k, v, meta, _ = _case()
    ours = _ours(q, kn, vn, k, v, meta)

    def run():
        return paged_attention(jnp.asarray(q[:DC]).reshape(DC, KVH * G, HD), jnp.asarray(k),
                               jnp.asarray(v), meta.dec_tables, meta.dec_lens,
                               pages_per_compute_block=2, k_splits=2, interpret=True)

    out = _interpreted("jax's GPU paged_attention", run).reshape(DC, KVH, G, HD)
    n = len(DECODES)
    np.testing.assert_allclose(out[:n], ours[:n], **TOL)
