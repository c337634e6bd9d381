"""Host-side pool of KV blocks: reference counts, content keys and an evictable free list.

Owned and mutated only by the KV manager (on the engine's step-loop thread). Block 0 is
reserved as the scratch block that padding tokens write to; it is never handed out.

A block is in exactly one of three states:
- used: one or more requests hold it (`ref` >= 1); never written while two hold it (only
  full, committed blocks are shared, and nobody writes a full block again);
- cached-free: nobody holds it, but it keeps its content key so that a later request
  with the same prefix can take it back (`hit`); it sits on one of two LRU lists, the
  blocks only offline work ever held, and those an online request held;
- plain free: no key.
`allocate` takes plain free blocks first, then the least recently used cached-free block
of offline work, then of online work (online prefixes are what users feel), dropping its
key. Every cached-free block therefore counts as free: caching never makes a request
wait for memory.
"""
from __future__ import annotations

import collections


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is scratch)")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() gives 1, 2, ...
        self._ref: dict[int, int] = {}  # used blocks -> holders
        self._lru_offline: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._lru_online: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._key: dict[int, bytes] = {}  # block -> content key (used or cached-free)
        self._by_key: dict[bytes, int] = {}
        self._online_held: set[int] = set()  # keyed blocks an online request has held
        self.evictions = 0  # cached-free blocks whose key was dropped to reuse them

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now: plain free plus cached-free."""
        return len(self._free) + len(self._lru_offline) + len(self._lru_online)

    @property
    def num_cached_free(self) -> int:
        return len(self._lru_offline) + len(self._lru_online)

    @property
    def num_cached(self) -> int:
        """Blocks with a content key (used or cached-free)."""
        return len(self._key)

    def ref_count(self, block: int) -> int:
        return self._ref.get(block, 0)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                lru = self._lru_offline if self._lru_offline else self._lru_online
                b, _ = lru.popitem(last=False)
                self._forget(b)
                self.evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block (a request's table, in position order): a keyed
        block whose last holder leaves becomes cached-free, the most recently used, the
        table's last block first (so it is reused before the blocks in front of it: a
        prefix is worth more than its tail); any other goes back to the plain free list."""
        cached = []
        for b in blocks:
            r = self._ref.get(b)
            if r is None:
                raise ValueError(f"block {b} freed twice or never allocated")
            if r > 1:
                self._ref[b] = r - 1
                continue
            del self._ref[b]
            if b in self._key:
                cached.append(b)
            else:
                self._free.append(b)
        for b in reversed(cached):
            (self._lru_online if b in self._online_held else self._lru_offline)[b] = None

    def lookup(self, key: bytes):
        """The block holding content `key` (used or cached-free), or None."""
        return self._by_key.get(key)

    def hit(self, block: int, online: bool) -> None:
        """Take one more reference to a keyed block found by `lookup` (off the free list if
        nobody held it)."""
        if block not in self._key:
            raise ValueError(f"block {block} has no content key")
        if block in self._ref:
            self._ref[block] += 1
        else:
            (self._lru_online if block in self._online_held else self._lru_offline).pop(block)
            self._ref[block] = 1
        if online:
            self._online_held.add(block)

    def register(self, block: int, key: bytes, online: bool) -> bool:
        """Give a used, full, committed block its content key. False (and no change) if
        another block already holds that content (computed twice at once) or the block
        has a key already."""
        if block not in self._ref:
            raise ValueError(f"block {block} is not in use")
        if key in self._by_key or block in self._key:
            return False
        self._key[block] = key
        self._by_key[key] = block
        if online:
            self._online_held.add(block)
        return True

    def _forget(self, block: int) -> None:
        key = self._key.pop(block, None)
        if key is not None:
            del self._by_key[key]
        self._online_held.discard(block)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
