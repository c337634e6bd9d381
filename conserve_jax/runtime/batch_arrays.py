"""Turn a `StepPlan` into padded host arrays of bucketed shapes (numpy only).

Called by the runner on the step-loop thread. Padding rows write to the scratch block 0
and are masked out of attention; padded sample rows point at row 0 and are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conserve_jax.runtime.buckets import BucketSet, bucket_for
from conserve_jax.runtime.sampler import SamplingRows
from conserve_jax.runtime.step_plan import StepPlan


@dataclass
class BatchArrays:
    token_ids: np.ndarray  # [T] i32, T = D + TP
    positions: np.ndarray  # [T]
    slot_blocks: np.ndarray  # [T]
    slot_offsets: np.ndarray  # [T]
    dec_tables: np.ndarray  # [D, NB]
    dec_lens: np.ndarray  # [D]
    pre_tables: np.ndarray  # [BP, NB] blocks of the context before each chunk
    pre_start: np.ndarray  # [BP]
    pre_seq: np.ndarray  # [TP]
    sample_rows: np.ndarray  # [S] rows of hidden to sample from
    sampling: SamplingRows
    num_sampled: int
    shape_key: tuple[int, int, int, int]  # (D, TP, BP, NB)


def build_batch(plan: StepPlan, buckets: BucketSet, block_size: int) -> BatchArrays:
    n_dec = len(plan.decodes)
    n_pre_tok = sum(len(p.tokens) for p in plan.prefills)
    D = bucket_for(n_dec, buckets.decode)
    TP = bucket_for(n_pre_tok, buckets.prefill_tokens)
    BP = bucket_for(max(1, len(plan.prefills)), buckets.prefill_seqs)
    ctx = [d.position + 1 for d in plan.decodes] + [p.start for p in plan.prefills]
    NB = bucket_for(max(1, -(-max(ctx) // block_size)), buckets.context_blocks)
    T = D + TP

    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_blocks = np.zeros(T, np.int32)
    slot_offsets = np.zeros(T, np.int32)
    dec_tables = np.zeros((D, NB), np.int32)
    dec_lens = np.zeros(D, np.int32)
    pre_tables = np.zeros((BP, NB), np.int32)
    pre_start = np.zeros(BP, np.int32)
    pre_seq = np.full(TP, -1, np.int32)

    def table(bt: list[int], ctx_len: int) -> np.ndarray:
        return np.asarray(bt[: -(-ctx_len // block_size)], np.int32)

    for i, d in enumerate(plan.decodes):
        token_ids[i] = d.token
        positions[i] = d.position
        t = table(d.block_table, d.position + 1)
        dec_tables[i, : len(t)] = t
        dec_lens[i] = d.position + 1
        slot_blocks[i] = d.block_table[d.position // block_size]
        slot_offsets[i] = d.position % block_size
    sample_rows = list(range(n_dec))
    row = D
    for j, p in enumerate(plan.prefills):
        n = len(p.tokens)
        pos = np.arange(p.start, p.start + n, dtype=np.int32)
        bt = np.asarray(p.block_table, np.int32)
        token_ids[row: row + n] = p.tokens
        positions[row: row + n] = pos
        slot_blocks[row: row + n] = bt[pos // block_size]
        slot_offsets[row: row + n] = pos % block_size
        pre_seq[row - D: row - D + n] = j
        t = table(p.block_table, p.start)
        pre_tables[j, : len(t)] = t
        pre_start[j] = p.start
        if p.sample is not None:
            sample_rows.append(row + n - 1)
        row += n

    specs = plan.sampled_specs()
    S = bucket_for(max(1, len(specs)), buckets.sample_rows)
    rows = SamplingRows.empty(S)
    for i, s in enumerate(specs):
        rows.temperature[i] = s.temperature
        rows.top_k[i] = max(0, s.top_k)
        rows.top_p[i] = s.top_p
        rows.seed[i] = np.uint32(s.seed & 0xFFFFFFFF)
        rows.counter[i] = s.counter
    sample_idx = np.zeros(S, np.int32)
    sample_idx[: len(sample_rows)] = sample_rows
    return BatchArrays(token_ids, positions, slot_blocks, slot_offsets, dec_tables, dec_lens,
                       pre_tables, pre_start, pre_seq, sample_idx, rows, len(specs), (D, TP, BP, NB))
