"""Shape buckets: every array shape that reaches jitted code is one of a small set.

Pure functions of the engine configuration; the runner pads to them and the warm-up
compiles them all, so serving never compiles after warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass

from conserve_jax.models.llama import uses_decode_chunks, uses_prefill_chunks


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


@dataclass(frozen=True)
class BucketSet:
    decode: list[int]  # decode sequences per iteration (0 = none)
    prefill_tokens: list[int]  # prefill tokens per iteration (0 = none)
    prefill_seqs: list[int]  # sequences the prefill tokens come from
    context_blocks: list[int]  # blocks gathered per sequence
    sample_rows: list[int]  # rows of logits sampled per iteration
    # attention reads large context buckets this many blocks at a time, only up to the
    # longest context (0: always the whole bucket); models.llama.paged_attention
    attention_chunk: int = 0

    @classmethod
    def build(cls, max_num_seqs: int, max_prefill_tokens: int, max_prefill_seqs: int,
              max_blocks_per_seq: int, attention_chunk: int = 0) -> "BucketSet":
        return cls(
            decode=[0] + powers_of_two(1, max_num_seqs),
            prefill_tokens=[0] + powers_of_two(min(32, max_prefill_tokens), max_prefill_tokens),
            prefill_seqs=powers_of_two(1, max_prefill_seqs),
            context_blocks=powers_of_two(min(4, max_blocks_per_seq), max_blocks_per_seq),
            sample_rows=powers_of_two(1, max_num_seqs + max_prefill_seqs),
            attention_chunk=attention_chunk,
        )

    def decode_blocks(self, need: int, rows: int) -> int:
        """Blocks of context each decode row's attention reads when the batch's longest
        context takes `need` blocks and the decode rows' bucket is `rows`: the bucket, or
        whole chunks up to `need` when `decode_attention` loops over chunks."""
        nb = bucket_for(max(1, need), self.context_blocks)
        return self._read(need, nb) if uses_decode_chunks(rows, nb, self.attention_chunk) else nb

    def prefill_blocks(self, need: int) -> int:
        """The same for prefill rows' earlier context (`uses_prefill_chunks`)."""
        nb = bucket_for(max(1, need), self.context_blocks)
        return self._read(need, nb) if uses_prefill_chunks(nb, self.attention_chunk) else nb

    def _read(self, need: int, nb: int) -> int:
        c = self.attention_chunk
        return min(-(-nb // c), -(-max(1, need) // c)) * c

    def layer_shapes(self) -> list[tuple[int, int, int, int]]:
        """Every (decode, prefill_tokens, prefill_seqs, context_blocks) the runner may use."""
        out = []
        for d in self.decode:
            for t in self.prefill_tokens:
                if d == 0 and t == 0:
                    continue
                for b in (self.prefill_seqs if t else [1]):
                    for nb in self.context_blocks:
                        out.append((d, t, b, nb))
        return out
