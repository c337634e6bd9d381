"""Block tables of requests: grow, free, count by request class; share cached prefixes.

Owned by the scheduler on the step-loop thread. Wraps `BlockAllocator` and keeps, keyed by
request id, the device blocks each request holds (its block table, in position order), so
that the online/offline split needed by stats and by the "online may take from offline,
never the reverse" rule is exact. Knows nothing of requests beyond their id, class, token
ids and the key chain of those tokens (`prefix_hash`), which the caller keeps.

Prefix caching (when built with `prefix_caching=True`; the engine follows its config): `register_full` gives each full,
committed block its content key; `match_prefix` finds the blocks of a prompt's longest
cached prefix and `attach_prefix` starts a request's table with them (shared, read only).
Used counts are per table: a block two requests share counts in both.
"""
from __future__ import annotations

from typing import Sequence

from conserve_jax.kv.block_allocator import BlockAllocator, blocks_needed
from conserve_jax.kv.prefix_hash import extend_chain

_NONE: tuple = ()


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.used_online = 0
        self.used_offline = 0
        self._tables: dict[str, list[int]] = {}
        self._online: dict[str, bool] = {}
        self._registered: dict[str, int] = {}  # request id -> leading blocks with keys

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

    def num_registered(self, request_id: str) -> int:
        """Leading blocks of the request's table that carry a content key."""
        return self._registered.get(request_id, 0)

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
        self._registered[request_id] = min(self._registered.get(request_id, 0), keep)
        if not table:
            del self._tables[request_id]
            del self._online[request_id]
            self._registered.pop(request_id, None)
        return len(extra)

    def release(self, request_id: str) -> None:
        """Free the request's blocks; those with a content key stay cached (the table's
        last block is the first of them to be reused)."""
        table = self._tables.pop(request_id, None)
        self._registered.pop(request_id, None)
        if table:
            self.allocator.free(table)
            self._count(self._online.pop(request_id), -len(table))

    # ---- prefix caching -----------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], chain: list[bytes], root: bytes,
                     max_tokens: int) -> list[int]:
        """Blocks holding the longest cached prefix of `token_ids` made of full blocks
        covering at most `max_tokens` tokens (extends `chain` as far as it looks). Takes
        no reference: `attach_prefix` does."""
        if not self.prefix_caching:
            return []
        n = max(0, max_tokens) // self.block_size
        extend_chain(chain, root, token_ids, self.block_size, n)
        out = []
        for key in chain[:n]:
            b = self.allocator.lookup(key)
            if b is None:
                break
            out.append(b)
        return out

    def attach_prefix(self, request_id: str, online: bool, blocks: list[int]) -> None:
        """Start the (blockless) request's table with cached blocks from `match_prefix`."""
        if self._tables.get(request_id):
            raise ValueError(f"{request_id} already holds KV blocks")
        if not blocks:
            return
        for b in blocks:
            self.allocator.hit(b, online)
        self._tables[request_id] = list(blocks)
        self._online[request_id] = online
        self._registered[request_id] = len(blocks)
        self._count(online, len(blocks))

    def register_full(self, request_id: str, token_ids: Sequence[int], chain: list[bytes],
                      root: bytes, num_computed: int) -> int:
        """Give the request's newly full, committed blocks (positions < `num_computed`)
        their content keys; returns how many blocks were looked at."""
        table = self._tables.get(request_id)
        if not self.prefix_caching or not table:
            return 0
        full = min(num_computed // self.block_size, len(table))
        start = self._registered.get(request_id, 0)
        if full <= start:
            return 0
        extend_chain(chain, root, token_ids, self.block_size, full)
        online = self._online[request_id]
        for i in range(start, full):
            self.allocator.register(table[i], chain[i], online)
        self._registered[request_id] = full
        return full - start

    def _count(self, online: bool, n: int) -> None:
        if online:
            self.used_online += n
        else:
            self.used_offline += n
