"""Device side of KV checkpointing: gather blocks out of the paged caches, scatter them back.

Owned by the runtime because it touches the runner's device caches. Contract: every method
is called by the engine's step-loop thread (the thread that owns `runner.caches`). `gather`
copies the given blocks of every layer into one fresh device array (a copy, so later donation
of the caches cannot disturb it) and starts its device->host transfer; `scatter` writes host
blocks back into the donated caches. Block counts are padded to powers of two (scratch block
0 as padding) so that nothing compiles after `warmup`. Restored blocks travel in the host
pool's own layout [n, L, 2, kvh, bs, hd], moved to the device in one transfer, and are
transposed to the caches' layout on the device (no host-side transposing copy).

Multi-process (the caches span other processes' devices, split along the KV-head axis):
each process holds and moves only its own heads. `block_shape` is then this process's part
of a block, `gather` returns a `LocalBlocks` (its `np.asarray` is this process's heads) and
`scatter` takes this process's heads and builds the global array from them. Every process
must make the same gather and scatter calls in the same order (runtime/kv_replica.py sees
to it); the calls themselves hold no collectives.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from conserve_jax.runtime.buckets import bucket_for, powers_of_two
from conserve_jax.runtime.sharding import AXIS


def _gather(caches, ids):
    return jnp.stack([jnp.stack([k[:, ids], v[:, ids]]) for k, v in caches])  # [L,2,kvh,n,bs,hd]


def _scatter_layer(k, v, ids, data, i):
    """Layer `i` of `data` [n, L, 2, kvh, bs, hd] (the host pool's layout) into that layer's
    caches. One executable per block count serves every layer (`i` is traced): compiling
    one scatter of all layers took 2-6 s per block count, this one a fraction of that."""
    d = jax.lax.dynamic_index_in_dim(data, i, axis=1, keepdims=False)  # [n, 2, kvh, bs, hd]
    return (k.at[:, ids].set(jnp.moveaxis(d[:, 0], 0, 1)),
            v.at[:, ids].set(jnp.moveaxis(d[:, 1], 0, 1)))


class LocalBlocks:
    """This process's heads of a gathered global array [L, 2, kvh, n, bs, hd]: its shards
    start their device->host copies at once; `np.asarray` (any thread) waits for them and
    joins them along the head axis in head order."""

    def __init__(self, arr) -> None:
        self.shards = sorted(arr.addressable_shards, key=lambda s: s.index[2].start or 0)
        for sh in self.shards:
            sh.data.copy_to_host_async()

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(sh.data) for sh in self.shards], axis=2)
        return out if dtype is None else out.astype(dtype)


def transfer_sizes(max_blocks_per_seq: int) -> list[int]:
    """Block-count buckets of one gather or scatter (each compiles once)."""
    return powers_of_two(1, max(1, min(max_blocks_per_seq * 4, 1024)))


class KVTransfer:
    def __init__(self, runner) -> None:
        self.runner = runner
        k0 = runner.caches[0][0]
        kvh, _, bs, hd = k0.shape
        self.block_size = bs
        self.dtype = k0.dtype
        self.local_only = not k0.sharding.is_fully_addressable  # multi-process
        self.global_heads = kvh
        if self.local_only:  # this process's heads only
            kvh = sum(sh.data.shape[0] for sh in k0.addressable_shards)
        self.block_shape = (len(runner.caches), 2, kvh, bs, hd)  # one block, every layer
        self.sizes = transfer_sizes(runner.max_blocks_per_seq)
        self.max_blocks_per_call = self.sizes[-1]
        if self.local_only:
            mesh = k0.sharding.mesh
            self._data_sharding = NamedSharding(mesh, P(None, None, None, AXIS))
            self._gather = jax.jit(_gather, out_shardings=NamedSharding(
                mesh, P(None, None, AXIS)))
        else:
            self._gather = jax.jit(_gather)
        self._scatter = jax.jit(_scatter_layer, donate_argnums=(0, 1))

    def padded_count(self, n: int) -> int:
        """How many blocks a transfer of `n` blocks carries (its compiled bucket)."""
        return bucket_for(n, self.sizes)

    def _padded(self, dev_ids: list[int]) -> np.ndarray:
        ids = np.zeros(self.padded_count(len(dev_ids)), np.int32)
        ids[: len(dev_ids)] = dev_ids
        return ids

    def gather(self, dev_ids: list[int]):
        """Device array [L, 2, kvh, n, bs, hd] (n >= len(dev_ids), padded) with its host copy
        under way (multi-process: `LocalBlocks`, this process's heads); `np.asarray` on it
        (any thread) waits for the copy."""
        assert len(dev_ids) <= self.max_blocks_per_call
        ids = self._padded(dev_ids)
        arr = self.runner.first_calls.call(("kv_gather", len(ids)), self._gather,
                                           self.runner.caches, ids)
        if self.local_only:
            return LocalBlocks(arr)
        arr.copy_to_host_async()
        return arr

    def scatter(self, dev_ids: list[int], blocks: np.ndarray) -> None:
        """Write host `blocks` [padded_count(len(dev_ids)), L, 2, kvh, bs, hd] into device
        blocks `dev_ids` (same order). The caller pads (the checkpointer gathers its pool
        rows already padded, so no second host copy is made here); rows past len(dev_ids)
        land in scratch block 0. On CPU `device_put` aliases a 64-byte-aligned `blocks`
        instead of copying it, so this returns only once the caches are written: the caller
        may then reuse `blocks` (the next iteration would wait for the caches anyway)."""
        assert len(dev_ids) <= self.max_blocks_per_call
        ids = self._padded(dev_ids)
        assert len(blocks) == len(ids), (len(blocks), len(ids))
        if self.local_only:  # this process's heads of the global [n, L, 2, kvh, bs, hd]
            shape = (*blocks.shape[:3], self.global_heads, *blocks.shape[4:])
            data = jax.make_array_from_process_local_data(self._data_sharding, blocks, shape)
        else:
            data = jax.device_put(blocks)  # one host->device transfer (or none: aliased)
        scatter = functools.partial(self.runner.first_calls.call, ("kv_scatter", len(ids)),
                                    self._scatter)
        self.runner.caches = [scatter(k, v, ids, data, i)
                              for i, (k, v) in enumerate(self.runner.caches)]
        jax.block_until_ready(self.runner.caches)

    def compiled_count(self) -> int:
        return self._gather._cache_size() + self._scatter._cache_size()

    def warmup(self) -> None:
        """Compile gather and scatter for every block-count bucket, through `gather` and
        `scatter` themselves (so the argument types are the ones used later)."""
        for n in self.sizes:
            arr = np.asarray(self.gather([0] * n))  # [L, 2, kvh, n, bs, hd]
            self.scatter([0] * n, np.moveaxis(arr, 3, 0))  # returns with the caches written
