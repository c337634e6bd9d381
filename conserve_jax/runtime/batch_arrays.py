"""Turn a `StepPlan` into padded host arrays of bucketed shapes (numpy only).

Called by the runner on the step-loop thread. The layout is `models/attention.py`'s: one
token axis padded to a token bucket, fixed-width block tables. Padding rows write to the
scratch block 0 and are masked out of attention; padded sample rows point at row 0 and are
dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conserve_jax.runtime.buckets import BucketSet, bucket_for
from conserve_jax.runtime.sampler import SamplingRows
from conserve_jax.runtime.step_plan import StepPlan


@dataclass
class BatchArrays:
    token_ids: np.ndarray  # [T] i32: decode rows, then prefill rows, then padding
    positions: np.ndarray  # [T]
    slot_blocks: np.ndarray  # [T]
    slot_offsets: np.ndarray  # [T]
    dec_tables: np.ndarray  # [Dc, MB], Dc = min(T, max_num_seqs)
    dec_lens: np.ndarray  # [Dc] (0: not a decode row)
    pre_tables: np.ndarray  # [Bp, MB] blocks of each prefill sequence (Bp = max_prefill_seqs)
    pre_start: np.ndarray  # [Bp] where each chunk starts (its context before the chunk)
    pre_seq: np.ndarray  # [T] prefill sequence of each row (-1: not a prefill row)
    sample_rows: np.ndarray  # [S] rows of hidden to sample from
    sampling: SamplingRows
    num_sampled: int
    shape_key: int  # T, the token bucket


def build_batch(plan: StepPlan, buckets: BucketSet, block_size: int) -> BatchArrays:
    n_dec = len(plan.decodes)
    n_tok = n_dec + sum(len(p.tokens) for p in plan.prefills)
    if len(plan.prefills) > buckets.max_prefill_seqs or n_dec > buckets.max_num_seqs:
        raise ValueError(f"plan of {n_dec} decodes and {len(plan.prefills)} prefills exceeds "
                         f"max_num_seqs {buckets.max_num_seqs} / max_prefill_seqs "
                         f"{buckets.max_prefill_seqs}")
    T = bucket_for(max(1, n_tok), buckets.tokens)
    Dc, Bp, MB = buckets.decode_rows(T), buckets.max_prefill_seqs, buckets.max_blocks_per_seq

    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_blocks = np.zeros(T, np.int32)
    slot_offsets = np.zeros(T, np.int32)
    dec_tables = np.zeros((Dc, MB), np.int32)
    dec_lens = np.zeros(Dc, np.int32)
    pre_tables = np.zeros((Bp, MB), np.int32)
    pre_start = np.zeros(Bp, np.int32)
    pre_seq = np.full(T, -1, np.int32)

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
    row = n_dec
    for j, p in enumerate(plan.prefills):
        n = len(p.tokens)
        pos = np.arange(p.start, p.start + n, dtype=np.int32)
        bt = np.asarray(p.block_table, np.int32)
        token_ids[row: row + n] = p.tokens
        positions[row: row + n] = pos
        slot_blocks[row: row + n] = bt[pos // block_size]
        slot_offsets[row: row + n] = pos % block_size
        pre_seq[row: row + n] = j
        t = table(p.block_table, p.start)
        pre_tables[j, : len(t)] = t
        pre_start[j] = p.start
        if p.sample is not None:
            sample_rows.append(row + n - 1)
        row += n
    specs = plan.sampled_specs()
    S = buckets.sample_rows(T)
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
                       pre_tables, pre_start, pre_seq, sample_idx, rows, len(specs), T)
