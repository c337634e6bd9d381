"""Ragged paged attention (`models/attention.py`): one token axis of decode rows, prefill
chunks and padding, every row reading its own sequence's paged context in loops whose trip
counts are data. Checked against a plain numpy softmax over each row's keys for mixed
batches, padding rows, chunk boundaries, tables that are not a multiple of the chunk,
loops that stop early or run no trip at all, several prefill sequences, decode
rows in several groups; the runner with
the loop at different chunk sizes and sharded; what the latency model counts as read."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.models.attention import AttentionMeta, ragged_paged_attention
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan

KVH, G, HD, BS = 2, 3, 8, 4


def _batch(rng, decodes, prefills, t, dc, bp, mb):
    """A random cache holding every sequence's context, and the ragged layout for
    `decodes` (context lengths, the new token included) and `prefills` ((start, rows)):
    returns q, k_new, v_new, caches, meta and, per real row, (sequence keys, values)."""
    nseq = len(decodes) + len(prefills)
    blocks = 1 + nseq * mb
    k = rng.standard_normal((KVH, blocks, BS, HD)).astype(np.float32)
    v = rng.standard_normal((KVH, blocks, BS, HD)).astype(np.float32)
    k[:, 0], v[:, 0] = 1e3, -1e3  # scratch: must never leak into a real row
    perm = rng.permutation(np.arange(1, blocks))
    tables = [perm[i * mb:(i + 1) * mb].astype(np.int32) for i in range(nseq)]
    q = rng.standard_normal((t, KVH, G, HD)).astype(np.float32)
    kn = rng.standard_normal((t, KVH, HD)).astype(np.float32)
    vn = rng.standard_normal((t, KVH, HD)).astype(np.float32)
    pos = np.zeros(t, np.int32)
    dec_tables, dec_lens = np.zeros((dc, mb), np.int32), np.zeros(dc, np.int32)
    pre_tables, pre_start = np.zeros((bp, mb), np.int32), np.zeros(bp, np.int32)
    pre_seq = np.full(t, -1, np.int32)
    keys = {}  # row -> (keys [kvh, n, hd], values)

    def cached(i, n):
        bl = tables[i][: -(-n // BS)]
        return (k[:, bl].reshape(KVH, -1, HD)[:, :n], v[:, bl].reshape(KVH, -1, HD)[:, :n])

    for i, n in enumerate(decodes):  # the new token's K/V is already in the cache
        pos[i], dec_tables[i], dec_lens[i] = n - 1, tables[i], n
        keys[i] = cached(i, n)
    row = len(decodes)
    for j, (start, rows) in enumerate(prefills):
        i = len(decodes) + j
        pre_tables[j], pre_start[j] = tables[i], start
        ck, cv = cached(i, start)
        for r in range(rows):
            pos[row + r], pre_seq[row + r] = start + r, j
            own = slice(row, row + r + 1)  # the chunk's keys up to this row
            keys[row + r] = (np.concatenate([ck, kn[own].transpose(1, 0, 2)], axis=1),
                             np.concatenate([cv, vn[own].transpose(1, 0, 2)], axis=1))
        row += rows
    z = jnp.zeros(t, jnp.int32)
    meta = AttentionMeta(z, z, jnp.asarray(pos), jnp.asarray(dec_tables), jnp.asarray(dec_lens),
                         jnp.asarray(pre_tables), jnp.asarray(pre_start), jnp.asarray(pre_seq))
    return q, kn, vn, k, v, meta, keys


def _reference(q, keys):
    out = {}
    for r, (kk, vv) in keys.items():
        s = np.einsum("kgd,knd->kgn", q[r], kk)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[r] = np.einsum("kgn,knd->kgd", p / p.sum(-1, keepdims=True), vv)
    return out


@pytest.mark.parametrize("decodes,prefills,t,dc,bp,mb,chunk", [
    ([37, 5, 16, 1], [], 4, 4, 1, 10, 4),             # decode only; table not a chunk multiple
    ([8, 8], [(8, 3)], 8, 8, 1, 8, 2),                # contexts end on chunk boundaries
    ([3, 9], [(0, 5)], 16, 8, 1, 16, 2),              # prefill without context: 0 context trips
    ([], [(37, 6), (0, 5)], 16, 8, 2, 16, 3),         # two packed prefills, padding rows
    ([], [(61, 9), (13, 4)], 16, 16, 2, 16, 16),      # one trip reads the whole table
    ([1, 2, 3, 4, 5, 6, 7, 61], [(20, 7)], 16, 8, 1, 16, 3),  # decode capacity full
    ([12], [(5, 40)], 64, 8, 1, 16, 2),               # one causal query block, padding
    ([30], [(3, 150)], 160, 8, 1, 48, 4),             # prefill rows span two query blocks
    # decode rows in groups of DECODE_GROUP (8): a table that is not a group multiple,
    # one live group of two (the second holds prefill rows), three live groups
    ([9, 40, 3, 17, 1, 25, 6, 11, 30], [(4, 3)], 16, 12, 1, 12, 2),
    ([5, 33, 2], [(21, 9)], 32, 16, 1, 12, 4),
    ([(i * 7) % 29 + 1 for i in range(17)], [], 32, 20, 1, 8, 2),
])
def test_ragged_attention_matches_a_plain_softmax(decodes, prefills, t, dc, bp, mb, chunk):
    rng = np.random.default_rng(sum(decodes) + t + mb)
    q, kn, vn, k, v, meta, keys = _batch(rng, decodes, prefills, t, dc, bp, mb)
    f = jax.jit(ragged_paged_attention, static_argnames=("chunk",))
    out = np.asarray(f(jnp.asarray(q), jnp.asarray(kn), jnp.asarray(vn), jnp.asarray(k),
                       jnp.asarray(v), meta, chunk=chunk))
    for r, ref in _reference(q, keys).items():
        np.testing.assert_allclose(out[r], ref, atol=3e-5, rtol=1e-5, err_msg=f"row {r}")
    assert np.isfinite(out).all()  # padding rows: garbage, but never NaN/inf


def test_latency_model_counts_the_blocks_the_loop_reads():
    b = BucketSet.build(8, 64, 1, 128, attention_chunk=16)
    assert b.tokens == [1, 2, 4, 8, 16, 32, 64, 72]
    # whole chunks of 16, then tail chunks of 4 up to the context
    assert b.blocks_read(0) == 0 and b.blocks_read(9) == 12 and b.blocks_read(65) == 68
    assert b.blocks_read(8) == 8 and b.blocks_read(16) == 16 and b.blocks_read(128) == 128
    # 0: the whole table per trip, its quarter for the tail
    assert BucketSet.build(8, 64, 1, 128, attention_chunk=0).blocks_read(9) == 32
    odd = BucketSet.build(8, 64, 1, 100, attention_chunk=16)  # 6 chunks, then tails
    assert odd.blocks_read(99) == 100 and odd.blocks_read(100) == 100
    assert b.decode_rows(4) == 4 and b.decode_rows(72) == 8


def _prefilled_runner(loaded, chunk, tp, contexts, prompts):
    cfg = EngineConfig(model="random:tiny", max_model_len=128, max_num_seqs=8,
                       max_prefill_tokens=32, tp=tp, attention_chunk=chunk, warmup=False,
                       cache=CacheConfig(block_size=4, num_blocks=1 + 8 * 32))
    runner = ModelRunner(loaded.config, loaded.params, cfg)
    for i, (n, prompt) in enumerate(zip(contexts, prompts)):
        for s in range(0, n, 32):
            runner.execute(StepPlan(prefills=[PrefillItem(prompt[s: s + 32], s, _table(i))]))
    return runner


def _table(i):
    return list(range(1 + 32 * i, 1 + 32 * (i + 1)))


@pytest.mark.parametrize("tp", [1, 2])
def test_runner_tokens_do_not_depend_on_the_chunk_size(tp):
    """8 decode rows with contexts of 3..101 tokens in blocks of 4, read in chunks of 2
    blocks, 5 blocks, or the whole 32-block table in one trip, sharded or not."""
    loaded = load_model("random:tiny", seed=3)
    rng = np.random.default_rng(7)
    contexts = [3, 101, 17, 40, 64, 9, 77, 33]
    prompts = [[int(t) for t in rng.integers(3, 200, n)] for n in contexts]
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, 5)
    outs = []
    for chunk in (0, 2, 5):
        runner = _prefilled_runner(loaded, chunk, tp, contexts, prompts)
        steps = []
        for step in range(3):  # the contexts grow across chunk boundaries
            plan = StepPlan(decodes=[DecodeItem(11 + step, n + step, _table(i), spec)
                                     for i, n in enumerate(contexts)])
            steps.append([(t.token, dict(t.top)) for t in runner.execute(plan).tokens])
        outs.append(steps)
    for other in outs[1:]:
        for (tok_a, top_a), (tok_b, top_b) in zip(sum(outs[0], []), sum(other, [])):
            assert tok_a == tok_b and top_a.keys() == top_b.keys()
            for t in top_a:
                assert abs(top_a[t] - top_b[t]) < 1e-5
