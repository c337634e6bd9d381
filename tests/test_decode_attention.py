"""Decode attention over the paged cache read chunk by chunk (`decode_chunk`): the same
result as reading the whole context bucket at once and as a plain numpy softmax, for
rows of different lengths, padding rows, chunk boundaries, buckets that are not a
multiple of the chunk, and loops that stop before the bucket's end; and what the latency
model counts as the blocks read."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conserve_jax.models.llama import decode_attention
from conserve_jax.runtime.buckets import BucketSet

KVH, G, HD, BS = 2, 3, 8, 4


def _case(rng, lens, nb):
    """A cache with distinct random blocks per row and the rows' block tables (padding
    entries name the scratch block 0, which holds garbage)."""
    rows = len(lens)
    cache_blocks = 1 + rows * nb
    k = rng.standard_normal((KVH, cache_blocks, BS, HD)).astype(np.float32)
    v = rng.standard_normal((KVH, cache_blocks, BS, HD)).astype(np.float32)
    k[:, 0], v[:, 0] = 1e3, -1e3  # scratch: must never leak into a real row
    tables = np.zeros((rows, nb), np.int32)
    perm = rng.permutation(np.arange(1, cache_blocks))
    for b, n in enumerate(lens):
        used = -(-n // BS)
        tables[b, :used] = perm[b * nb: b * nb + used]
    q = rng.standard_normal((rows, KVH, G, HD)).astype(np.float32)
    return q, k, v, tables, np.asarray(lens, np.int32)


def _reference(q, k, v, tables, lens):
    out = np.zeros_like(q)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        blocks = tables[b, : -(-n // BS)]
        kb = k[:, blocks].reshape(KVH, -1, HD)[:, :n]  # [kvh, n, hd]
        vb = v[:, blocks].reshape(KVH, -1, HD)[:, :n]
        s = np.einsum("kgd,knd->kgn", q[b], kb)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b] = np.einsum("kgn,knd->kgd", p, vb)
    return out


@pytest.mark.parametrize("lens,nb,chunk", [
    ([37, 5, 0, 16, 1], 10, 4),    # bucket not a multiple of the chunk; a padding row
    ([8, 8], 8, 2),                # contexts end exactly on chunk boundaries
    ([3, 9], 16, 2),               # the loop stops after 3 of 8 chunks
    ([64], 16, 16),                # bucket == chunk: read at once
    ([1, 2, 3, 4, 5, 6, 7, 61], 16, 3),
])
def test_chunked_equals_whole_bucket_and_reference(lens, nb, chunk):
    rng = np.random.default_rng(sum(lens) + nb)
    q, k, v, tables, lens_a = _case(rng, lens, nb)
    args = [jnp.asarray(a) for a in (q, k, v, tables, lens_a)]
    once = np.asarray(jax.jit(lambda *a: decode_attention(*a, chunk=0))(*args))
    chunked = np.asarray(jax.jit(lambda *a: decode_attention(*a, chunk=chunk))(*args))
    ref = _reference(q, k, v, tables, lens_a)
    real = lens_a > 0
    np.testing.assert_allclose(chunked[real], ref[real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(once[real], ref[real], atol=2e-5, rtol=1e-5)
    assert np.isfinite(chunked).all()  # padding rows: garbage, but never NaN/inf


def test_latency_model_counts_the_blocks_the_loop_reads():
    b = BucketSet.build(8, 64, 1, 128, decode_chunk=16)
    assert b.context_blocks[-2:] == [64, 128]
    assert b.decode_blocks(9) == 16  # bucket 16 <= chunk: the whole bucket
    assert b.decode_blocks(65) == 80  # bucket 128, read in chunks of 16 up to 65 blocks
    assert b.decode_blocks(128) == 128
    assert BucketSet.build(8, 64, 1, 128).decode_blocks(65) == 128  # chunking off
    odd = BucketSet.build(8, 64, 1, 100, decode_chunk=16)  # last bucket 100: 7 chunks max
    assert odd.decode_blocks(99) == 112
