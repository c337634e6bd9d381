"""Block tables of requests: grow, free, count by request class.

Owned by the scheduler on the step-loop thread. Wraps `BlockAllocator` and keeps, keyed by
request id, the device blocks each request holds (its block table, in position order), so
that the online/offline split needed by stats and by the "online may take from offline,
never the reverse" rule is exact. Knows nothing of requests beyond their id and class.
"""
from __future__ import annotations

from conserve_jax.kv.block_allocator import BlockAllocator, blocks_needed

_NONE: tuple = ()


class KVManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.used_online = 0
        self.used_offline = 0
        self._tables: dict[str, list[int]] = {}
        self._online: dict[str, bool] = {}

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def blocks(self, request_id: str) -> list[int]:
        """The request's block table (read-only for callers; empty when it holds none)."""
        return self._tables.get(request_id, list(_NONE))

    def num_blocks(self, request_id: str) -> int:
        return len(self._tables.get(request_id, _NONE))

    def extra_blocks(self, request_id: str, upto_tokens: int) -> int:
        """Blocks the request must gain so that positions [0, upto_tokens) have a home."""
        return max(0, blocks_needed(upto_tokens, self.block_size) - self.num_blocks(request_id))

    def grow(self, request_id: str, online: bool, upto_tokens: int) -> bool:
        n = self.extra_blocks(request_id, upto_tokens)
        if n > self.allocator.num_free:
            return False
        if n:
            self._tables.setdefault(request_id, []).extend(self.allocator.allocate(n))
            self._online[request_id] = online
            self._count(online, n)
        return True

    def trim(self, request_id: str, keep_tokens: int) -> int:
        """Free the request's blocks beyond those positions [0, keep_tokens) need (blocks
        reserved ahead of use, e.g. for a predicted response). Returns the number freed."""
        table = self._tables.get(request_id)
        keep = max(0, blocks_needed(keep_tokens, self.block_size))
        if not table or len(table) <= keep:
            return 0
        extra = table[keep:]
        del table[keep:]
        self.allocator.free(extra)
        self._count(self._online[request_id], -len(extra))
        if not table:
            del self._tables[request_id]
            del self._online[request_id]
        return len(extra)

    def release(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        if table:
            self.allocator.free(table)
            self._count(self._online.pop(request_id), -len(table))

    def _count(self, online: bool, n: int) -> None:
        if online:
            self.used_online += n
        else:
            self.used_offline += n
