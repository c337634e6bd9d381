"""Block bookkeeping for sequences: grow, free, count by request class.

Owned by the scheduler on the step-loop thread. Wraps `BlockAllocator` so that every
block a sequence holds is tracked in `seq.blocks`, and the online/offline split needed
by stats and by the "online may take from offline, never the reverse" rule is exact.
"""
from __future__ import annotations

from conserve_jax.kv.block_allocator import BlockAllocator, blocks_needed
from conserve_jax.scheduling.sequence import Sequence


class KVManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.used_online = 0
        self.used_offline = 0

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def extra_blocks(self, seq: Sequence, upto_tokens: int) -> int:
        """Blocks `seq` must gain so that positions [0, upto_tokens) have a home."""
        return max(0, blocks_needed(upto_tokens, self.block_size) - len(seq.blocks))

    def grow(self, seq: Sequence, upto_tokens: int) -> bool:
        n = self.extra_blocks(seq, upto_tokens)
        if n > self.allocator.num_free:
            return False
        if n:
            seq.blocks.extend(self.allocator.allocate(n))
            self._count(seq, n)
        return True

    def trim(self, seq: Sequence, keep_tokens: int) -> int:
        """Free `seq`'s blocks beyond those positions [0, keep_tokens) need (blocks reserved
        ahead of use, e.g. for a predicted response). Returns the number freed."""
        keep = max(0, blocks_needed(keep_tokens, self.block_size))
        extra = seq.blocks[keep:]
        if extra:
            del seq.blocks[keep:]
            self.allocator.free(extra)
            self._count(seq, -len(extra))
        return len(extra)

    def release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.allocator.free(seq.blocks)
            self._count(seq, -len(seq.blocks))
            seq.blocks = []

    def _count(self, seq: Sequence, n: int) -> None:
        if seq.online:
            self.used_online += n
        else:
            self.used_offline += n
