"""Incremental KV checkpointing of offline requests to a host pool, and restore.

Contract: every method is called by the engine's step-loop thread. After each committed
iteration, `checkpoint_new_blocks` gathers the newly *completed* blocks of offline
sequences from all layers' caches in one jitted call (a copy, so later donation of the
caches cannot disturb it), starts the device->host transfer with `copy_to_host_async`,
and hands it to a copy thread that writes the host pool. The step loop never waits for a
copy except in `wait_pending`, called before a checkpoint is relied on (eviction,
restore). `restore` scatters host blocks back into the donated caches with one jitted
call. Shapes are padded to power-of-two block counts (scratch block 0 as padding).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from conserve_jax.kv.host_pool import HostPool
from conserve_jax.runtime.buckets import bucket_for, powers_of_two

log = logging.getLogger(__name__)


@dataclass
class CheckpointCounters:
    blocks_copied: int = 0
    blocks_skipped_pool_full: int = 0
    blocks_restored: int = 0


def _gather(caches, ids):
    return jnp.stack([jnp.stack([k[:, ids], v[:, ids]]) for k, v in caches])  # [L,2,kvh,n,bs,hd]


def _scatter(caches, ids, data):
    return [(k.at[:, ids].set(data[i, 0]), v.at[:, ids].set(data[i, 1]))
            for i, (k, v) in enumerate(caches)]


class KVCheckpointer:
    def __init__(self, runner, pool_bytes: int) -> None:
        self.runner = runner
        k0 = runner.caches[0][0]
        kvh, _, bs, hd = k0.shape
        self.block_size = bs
        self.pool = HostPool.sized(pool_bytes, (len(runner.caches), 2, kvh, bs, hd), k0.dtype)
        self.sizes = powers_of_two(1, max(1, min(runner.max_blocks_per_seq * 4, 1024)))
        self._gather = jax.jit(_gather)
        self._scatter = jax.jit(_scatter, donate_argnums=(0,))
        self.counters = CheckpointCounters()
        self._jobs: "queue.Queue" = queue.Queue()
        self._pending = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._copy_loop, name="kv-checkpoint-copy",
                                        daemon=True)
        self._thread.start()

    # ---- device -> host ---------------------------------------------------------------
    def checkpoint_new_blocks(self, seqs) -> None:
        """Copy each sequence's newly completed, not yet checkpointed blocks to host."""
        dev_ids, slots = [], []
        for seq in seqs:
            full = seq.num_computed // self.block_size
            new = list(range(len(seq.host_slots), min(full, len(seq.blocks))))
            if not new:
                continue
            got = self.pool.allocate(len(new))
            if not got:
                self.counters.blocks_skipped_pool_full += len(new)
                continue
            seq.host_slots.extend(got)
            dev_ids += [seq.blocks[i] for i in new]
            slots += got
        for start in range(0, len(dev_ids), self.sizes[-1]):
            self._copy(dev_ids[start: start + self.sizes[-1]], slots[start: start + self.sizes[-1]])

    def _copy(self, dev_ids: list[int], slots: list[int]) -> None:
        n = bucket_for(len(dev_ids), self.sizes)
        ids = np.zeros(n, np.int32)
        ids[: len(dev_ids)] = dev_ids
        arr = self._gather(self.runner.caches, ids)
        arr.copy_to_host_async()
        with self._cv:
            self._pending += 1
        self._jobs.put((arr, slots))
        self.counters.blocks_copied += len(slots)

    def _copy_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:  # close()
                return
            arr, slots = job
            try:
                host = np.asarray(arr)
                for j, s in enumerate(slots):
                    self.pool.data[s] = host[:, :, :, j]
            except Exception:  # report; the step loop sees it as a stale checkpoint
                log.exception("KV checkpoint copy failed")
            finally:
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    def wait_pending(self) -> None:
        with self._cv:
            while self._pending:
                self._cv.wait()

    # ---- host -> device -----------------------------------------------------------------
    def restore(self, slots: list[int], dev_ids: list[int]) -> None:
        """Write host slots into device blocks (same order) across all layers."""
        self.wait_pending()
        for start in range(0, len(slots), self.sizes[-1]):
            s = slots[start: start + self.sizes[-1]]
            d = dev_ids[start: start + self.sizes[-1]]
            n = bucket_for(len(s), self.sizes)
            ids = np.zeros(n, np.int32)
            ids[: len(d)] = d
            data = np.zeros((n,) + self.pool.data.shape[1:], self.pool.data.dtype)
            data[: len(s)] = self.pool.data[s]
            # [n, L, 2, kvh, bs, hd] -> [L, 2, kvh, n, bs, hd]
            data = np.ascontiguousarray(np.moveaxis(data, 0, 3))
            self.runner.caches = self._scatter(self.runner.caches, ids, data)
            self.counters.blocks_restored += len(s)

    def release(self, seq) -> None:
        if seq.host_slots:
            self.pool.free(seq.host_slots)
            seq.host_slots = []

    def compiled_count(self) -> int:
        return self._gather._cache_size() + self._scatter._cache_size()

    def close(self) -> None:
        """Finish pending copies and stop the copy thread (engine shutdown)."""
        self.wait_pending()
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def warmup(self) -> None:
        """Compile gather and scatter for every block-count bucket, with the argument types
        `checkpoint_new_blocks` and `restore` pass (host numpy data for the scatter)."""
        for n in self.sizes:
            ids = np.zeros(n, np.int32)
            arr = np.asarray(self._gather(self.runner.caches, ids))
            self.runner.caches = self._scatter(self.runner.caches, ids, arr)
        jax.block_until_ready(self.runner.caches)
