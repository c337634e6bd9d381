"""Shape buckets: every array shape that reaches jitted code is one of a small set.

One ragged token axis (decode rows and prefill chunks together, `models/attention.py`)
padded to a token-count bucket is the only dimension of the layer calls that depends on
the work: block tables are [rows, max_blocks_per_seq] with lengths as data, the decode
rows' table has min(T, max_num_seqs) rows, the prefill tables `max_prefill_seqs` rows. So
the layer executables are one per (token bucket, layer-group size). Sampling follows the
token bucket too: an iteration of T rows samples min(T, max_num_seqs + max_prefill_seqs)
rows (padded), so the row select compiles once per token bucket and the sampler head once
per distinct row count and sampler variant.

Pure functions of the engine configuration; the runner pads to them and the warm-up
compiles them all, so serving never compiles after warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass

from conserve_jax.models.attention import DECODE_GROUP
from conserve_jax.models.attention import blocks_read as attention_blocks_read


def powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2lo, 4lo, ... up to the first value >= hi (hi itself if not a power)."""
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    out.append(hi)
    return sorted(set(out))


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


SMALL_SAMPLE_ROWS = 8  # sampled rows of the small token buckets (see BucketSet.sample_rows)


@dataclass(frozen=True)
class BucketSet:
    tokens: list[int]  # token-axis sizes: decode rows + prefill rows of one iteration
    max_sample_rows: int  # sampled rows at most (a decode each, a last prefill row each)
    max_num_seqs: int  # decode rows at most (the decode table has min(T, this) rows)
    max_prefill_seqs: int  # prefill sequences per iteration (rows of the prefill table)
    max_blocks_per_seq: int  # width of every block table
    # KV blocks attention reads per loop trip (models.attention; only as far as the
    # longest context of each part)
    attention_chunk: int

    @classmethod
    def build(cls, max_num_seqs: int, max_prefill_tokens: int, max_prefill_seqs: int,
              max_blocks_per_seq: int, attention_chunk: int = 16) -> "BucketSet":
        """`attention_chunk` 0: the whole table per trip."""
        chunk = min(attention_chunk or max_blocks_per_seq, max_blocks_per_seq)
        return cls(
            tokens=powers_of_two(1, max_num_seqs + max_prefill_tokens),
            max_sample_rows=max_num_seqs + max_prefill_seqs,
            max_num_seqs=max_num_seqs, max_prefill_seqs=max_prefill_seqs,
            max_blocks_per_seq=max_blocks_per_seq, attention_chunk=max(1, chunk))

    def decode_rows(self, tokens: int) -> int:
        """Rows of the decode table (and of the decode part of attention) in a token bucket."""
        return min(tokens, self.max_num_seqs)

    def decode_rows_read(self, tokens: int, decodes: int) -> int:
        """Decode-table rows whose contexts attention reads: whole groups of DECODE_GROUP
        rows up to the last decode (`models.attention._decode_part`), at most the table."""
        dc = self.decode_rows(tokens)
        grp = min(DECODE_GROUP, dc)
        return min(dc, -(-decodes // grp) * grp) if decodes > 0 else 0

    def blocks_read(self, need: int) -> int:
        """Blocks attention reads for a context of `need` blocks (whole chunks, then tail
        chunks up to it; 0 for no context: `models.attention.chunked_reads`)."""
        return attention_blocks_read(need, self.attention_chunk, self.max_blocks_per_seq)

    def layer_shapes(self) -> list[int]:
        """Every token bucket the layer calls may see."""
        return list(self.tokens)

    def sample_rows(self, tokens: int) -> int:
        """Rows of logits sampled in a token bucket (padded): every sampled row is one of
        the bucket's tokens. Large buckets (prefill) sample a few real rows in a padded
        head of at most max_sample_rows rows: a few ms against a prefill's hundreds. Three
        sizes only (1 row; up to SMALL_SAMPLE_ROWS; max_sample_rows), so the sampler head
        compiles 3 x its variants at warm-up instead of once per token bucket: the head
        reads the whole vocabulary's weights whatever the rows, so a few padded rows cost
        little."""
        if tokens <= 1:
            return 1
        return min(self.max_sample_rows, SMALL_SAMPLE_ROWS if tokens <= SMALL_SAMPLE_ROWS
                   else self.max_sample_rows)

    def select_shapes(self) -> list[tuple[int, int]]:
        """Every (token bucket, sampled rows) pair the row select sees."""
        return [(t, self.sample_rows(t)) for t in self.tokens]

    def head_rows(self) -> list[int]:
        """Every row count the sampler head sees."""
        return sorted({self.sample_rows(t) for t in self.tokens})
