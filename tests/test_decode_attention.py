"""Attention over the paged cache read chunk by chunk (`attention_chunk`): decode rows give
the same result as reading the whole context bucket at once and as a plain numpy softmax,
for rows of different lengths, padding rows, chunk boundaries, buckets that are not a
multiple of the chunk, and loops that stop before the bucket's end; prefill rows' earlier
context likewise, for packed sequences with and without earlier context; the runner with
both; and what the latency model counts as the blocks read."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.models.llama import (DECODE_CHUNK_MIN_ROWS, AttentionMeta, decode_attention,
                                       paged_attention, uses_decode_chunks, uses_prefill_chunks)
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan

KVH, G, HD, BS = 2, 3, 8, 4


def _case(rng, lens, nb):
    """A cache with distinct random blocks per row and the rows' block tables (padding
    entries name the scratch block 0, which holds garbage). Rows of length 0 (padding) are
    added up to the loop's minimum row count."""
    lens = list(lens) + [0] * (DECODE_CHUNK_MIN_ROWS - len(lens))
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
    assert uses_decode_chunks(len(lens_a), nb, chunk) == (nb > chunk)
    args = [jnp.asarray(a) for a in (q, k, v, tables, lens_a)]
    once = np.asarray(jax.jit(lambda *a: decode_attention(*a, chunk=0))(*args))
    chunked = np.asarray(jax.jit(lambda *a: decode_attention(*a, chunk=chunk))(*args))
    ref = _reference(q, k, v, tables, lens_a)
    real = lens_a > 0
    np.testing.assert_allclose(chunked[real], ref[real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(once[real], ref[real], atol=2e-5, rtol=1e-5)
    assert np.isfinite(chunked).all()  # padding rows: garbage, but never NaN/inf


def test_latency_model_counts_the_blocks_the_loop_reads():
    b = BucketSet.build(8, 64, 1, 128, attention_chunk=16)
    assert b.context_blocks[-2:] == [64, 128]
    assert b.decode_blocks(9, 8) == 16  # bucket 16 <= chunk: the whole bucket
    assert b.decode_blocks(65, 8) == 80  # bucket 128, read in chunks of 16 up to 65 blocks
    assert b.decode_blocks(65, 4) == 128  # too few rows to loop: the whole bucket
    assert b.decode_blocks(128, 32) == 128
    assert BucketSet.build(8, 64, 1, 128).decode_blocks(65, 8) == 128  # chunking off
    odd = BucketSet.build(8, 64, 1, 100, attention_chunk=16)  # last bucket 100: 7 chunks max
    assert odd.decode_blocks(99, 8) == 112
    # prefill's earlier context: in chunks only past two chunks (bucket 64+ here)
    assert b.prefill_blocks(20) == 32 and b.prefill_blocks(33) == 48 and b.prefill_blocks(69) == 80


@pytest.mark.parametrize("starts,chunk", [
    ([37, 0], 2),     # two packed sequences, one without earlier context
    ([61, 13], 3),    # bucket 16 not a multiple of 3 (padded to 18 blocks)
    ([5, 9], 1),      # the loop stops after 3 of 16 chunks
])
def test_prefill_earlier_context_in_chunks_equals_reading_at_once(starts, chunk):
    rng = np.random.default_rng(sum(starts) + chunk)
    nb, per = 16, [6, 5]  # context bucket; prefill rows per sequence (then 5 padding rows)
    tp = 16
    cache_blocks = 1 + 2 * nb
    k = jnp.asarray(rng.standard_normal((KVH, cache_blocks, BS, HD)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((KVH, cache_blocks, BS, HD)), jnp.float32)
    tables = np.zeros((2, nb), np.int32)
    for b in range(2):
        tables[b] = 1 + b * nb + np.arange(nb)
    seq = np.array([0] * per[0] + [1] * per[1] + [-1] * (tp - sum(per)), np.int32)
    pos = np.zeros(tp, np.int32)
    for b in range(2):
        rows = np.where(seq == b)[0]
        pos[rows] = starts[b] + np.arange(len(rows))
    meta = AttentionMeta(jnp.zeros(tp, jnp.int32), jnp.zeros(tp, jnp.int32), jnp.asarray(pos),
                         jnp.zeros((0, nb), jnp.int32), jnp.zeros(0, jnp.int32),
                         jnp.asarray(tables), jnp.asarray(starts, jnp.int32), jnp.asarray(seq))
    q = jnp.asarray(rng.standard_normal((tp, KVH, G, HD)), jnp.float32)
    kn = jnp.asarray(rng.standard_normal((tp, KVH, HD)), jnp.float32)
    vn = jnp.asarray(rng.standard_normal((tp, KVH, HD)), jnp.float32)
    assert uses_prefill_chunks(nb, chunk)
    f = jax.jit(paged_attention, static_argnames=("num_decode", "chunk"))
    once = np.asarray(f(q, kn, vn, k, v, meta, num_decode=0, chunk=0))
    looped = np.asarray(f(q, kn, vn, k, v, meta, num_decode=0, chunk=chunk))
    real = seq >= 0
    np.testing.assert_allclose(looped[real], once[real], atol=2e-5, rtol=1e-5)
    assert np.isfinite(looped).all()


def _prefilled_runner(loaded, chunk, tp, contexts, prompts):
    cfg = EngineConfig(model="random:tiny", max_model_len=128, max_num_seqs=8,
                       max_prefill_tokens=32, tp=tp, attention_chunk=chunk,
                       cache=CacheConfig(block_size=4, num_blocks=1 + 8 * 32))
    runner = ModelRunner(loaded.config, loaded.params, cfg)
    for i, (n, prompt) in enumerate(zip(contexts, prompts)):
        for s in range(0, n, 32):
            runner.execute(StepPlan(prefills=[PrefillItem(prompt[s: s + 32], s, _table(i))]))
    return runner


def _table(i):
    return list(range(1 + 32 * i, 1 + 32 * (i + 1)))


@pytest.mark.parametrize("tp", [1, 2])
def test_runner_decode_through_the_chunk_loop_matches_reading_at_once(tp):
    """8 decode rows (the loop's minimum) with contexts of 3..101 tokens in blocks of 4:
    buckets of 8-32 blocks, read in chunks of 2 blocks or at once, sharded or not."""
    loaded = load_model("random:tiny", seed=3)
    rng = np.random.default_rng(7)
    contexts = [3, 101, 17, 40, 64, 9, 77, 33]
    prompts = [[int(t) for t in rng.integers(3, 200, n)] for n in contexts]
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, 5)
    assert uses_decode_chunks(8, 32, 2)
    runners = [_prefilled_runner(loaded, c, tp, contexts, prompts) for c in (0, 2)]
    outs = []
    for runner in runners:
        steps = []
        for step in range(3):  # the contexts grow across chunk boundaries
            plan = StepPlan(decodes=[DecodeItem(11 + step, n + step, _table(i), spec)
                                     for i, n in enumerate(contexts)])
            steps.append([(t.token, dict(t.top)) for t in runner.execute(plan).tokens])
        outs.append(steps)
    for once, looped in zip(*outs):
        for (tok_a, top_a), (tok_b, top_b) in zip(once, looped):
            assert tok_a == tok_b and top_a.keys() == top_b.keys()
            for t in top_a:
                assert abs(top_a[t] - top_b[t]) < 1e-5

