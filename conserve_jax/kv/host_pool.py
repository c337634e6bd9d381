"""Bounded host-memory pool of KV block checkpoints.

One slot holds one block of KV for every layer: [layers, 2 (K/V), kv_heads, block_size,
head_dim]. Threading: slots are allocated and freed only by the step-loop thread; slot
*contents* are written by the checkpointer's copy thread and read by the step-loop thread
only after `KVCheckpointer.wait_pending()` (so reads never race writes).
"""
from __future__ import annotations

import numpy as np


class HostPool:
    def __init__(self, num_slots: int, block_shape: tuple[int, ...], dtype) -> None:
        self.num_slots = max(0, num_slots)
        self.data = np.zeros((self.num_slots,) + tuple(block_shape), dtype)
        self._free = list(range(self.num_slots - 1, -1, -1))

    @classmethod
    def sized(cls, pool_bytes: int, block_shape: tuple[int, ...], dtype) -> "HostPool":
        per = int(np.prod(block_shape)) * np.dtype(dtype).itemsize
        return cls(pool_bytes // per, block_shape, dtype)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            return []
        return [self._free.pop() for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)
