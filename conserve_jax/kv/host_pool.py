"""Bounded host-memory pool of KV block checkpoints.

One slot holds one block of KV for every layer: [layers, 2 (K/V), kv_heads, block_size,
head_dim]. Threading: slots are allocated and freed only by the step-loop thread; slot
*contents* are written by the checkpointer's copy thread and read by the step-loop thread
only after `KVCheckpointer.wait_pending()` (so reads never race writes).

`gather` copies slots into a staging buffer that is reused (its pages stay resident) and
aligned to 64 bytes, so that on CPU `jax.device_put` of it aliases instead of copying: a
restore of 64 blocks (47 MB) then pays one copy instead of two plus their page faults.
The buffer grows to the largest restore chunk seen (at most the transfer's
`max_blocks_per_call` blocks) and is kept.
"""
from __future__ import annotations

import numpy as np

ALIGN = 64  # bytes; XLA:CPU aliases host buffers aligned to this instead of copying them


def aligned_empty(shape: tuple[int, ...], dtype, align: int = ALIGN) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off: off + nbytes].view(dtype).reshape(shape)


class HostPool:
    def __init__(self, num_slots: int, block_shape: tuple[int, ...], dtype) -> None:
        self.num_slots = max(0, num_slots)
        self.data = np.zeros((self.num_slots,) + tuple(block_shape), dtype)
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._staging = aligned_empty((0,) + tuple(block_shape), dtype)

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

    def gather(self, slots: list[int]) -> np.ndarray:
        """The contents of `slots` (repeats allowed), [len(slots), *block_shape], in the
        reused staging buffer: valid until the next `gather`. Step-loop thread only."""
        n = len(slots)
        if n > len(self._staging):
            self._staging = aligned_empty((n,) + self.data.shape[1:], self.data.dtype)
        out = self._staging[:n]
        np.take(self.data, slots, axis=0, out=out, mode="clip")  # "raise" buffers `out`
        return out
