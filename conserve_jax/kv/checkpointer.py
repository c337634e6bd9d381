"""Incremental KV checkpointing of offline requests to a host pool, and restore.

Host side only: which blocks of which request are safely on host, the bounded pool that
holds them, and the copy thread that fills it. The device side (gathering blocks out of the
caches, scattering them back) is the runtime's `KVTransfer`, passed in as `transfer`
(anything with `block_shape`, `dtype`, `block_size`, `max_blocks_per_call`,
`gather(ids)` and `scatter(ids, blocks)`).

Contract: every method is called by the engine's step-loop thread. After each committed
iteration, `checkpoint_new_blocks` asks the transfer to gather the newly *completed* blocks
of offline requests and hands the copy to the copy thread, which writes the host pool. The
step loop never waits for a copy except in `wait_pending`, called before a checkpoint is
relied on (eviction, restore). Host slots are kept per request id; `release` frees them.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import numpy as np

from conserve_jax.kv.host_pool import HostPool

log = logging.getLogger(__name__)


@dataclass
class CheckpointCounters:
    blocks_copied: int = 0
    blocks_skipped_pool_full: int = 0
    blocks_restored: int = 0


class KVCheckpointer:
    def __init__(self, transfer, pool_bytes: int) -> None:
        self.transfer = transfer
        self.block_size = transfer.block_size
        self.pool = HostPool.sized(pool_bytes, transfer.block_shape, transfer.dtype)
        self.counters = CheckpointCounters()
        self._slots: dict[str, list[int]] = {}  # request id -> host slot of block i
        self._jobs: "queue.Queue" = queue.Queue()
        self._pending = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._copy_loop, name="kv-checkpoint-copy",
                                        daemon=True)
        self._thread.start()

    def num_saved_blocks(self, request_id: str) -> int:
        return len(self._slots.get(request_id, ()))

    # ---- device -> host ---------------------------------------------------------------
    def checkpoint_new_blocks(self, requests: list[tuple[str, list[int], int]]) -> None:
        """For each (request id, block table, committed tokens): copy the newly completed,
        not yet checkpointed blocks to host."""
        dev_ids, slots = [], []
        for rid, blocks, num_computed in requests:
            have = self._slots.setdefault(rid, [])
            full = min(num_computed // self.block_size, len(blocks))
            new = list(range(len(have), full))
            if not new:
                continue
            got = self.pool.allocate(len(new))
            if not got:
                self.counters.blocks_skipped_pool_full += len(new)
                continue
            have.extend(got)
            dev_ids += [blocks[i] for i in new]
            slots += got
        step = self.transfer.max_blocks_per_call
        for start in range(0, len(dev_ids), step):
            ids, s = dev_ids[start: start + step], slots[start: start + step]
            arr = self.transfer.gather(ids)
            with self._cv:
                self._pending += 1
            self._jobs.put((arr, s))
            self.counters.blocks_copied += len(s)

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

    def kept_tokens(self, request_id: str, num_computed: int, num_tokens: int) -> int:
        """Tokens of an evicted request whose KV is safely on host (the rest recompute);
        waits for copies under way. Never all of them: the last known token must run again
        to produce the next one."""
        self.wait_pending()
        return min(self.num_saved_blocks(request_id) * self.block_size, num_computed,
                   num_tokens - 1)

    # ---- host -> device -----------------------------------------------------------------
    def restore(self, request_id: str, dev_ids: list[int]) -> None:
        """Write the request's first len(dev_ids) saved blocks into device blocks `dev_ids`."""
        self.wait_pending()
        slots = self._slots[request_id][: len(dev_ids)]
        step = self.transfer.max_blocks_per_call
        for start in range(0, len(slots), step):
            s = slots[start: start + step]
            # one gather from the pool into its staging buffer, already padded to the
            # transfer's bucket (padding rows repeat a real slot and land in scratch block
            # 0); scatter has consumed it when it returns, so the next chunk may reuse it
            padded = s + [s[0]] * (self.transfer.padded_count(len(s)) - len(s))
            self.transfer.scatter(dev_ids[start: start + step], self.pool.gather(padded))
            self.counters.blocks_restored += len(s)

    # ---- export / import (persisting offline work across a restart) ---------------------
    def export_blocks(self, request_id: str, num_computed: int) -> np.ndarray:
        """A copy of the request's saved blocks that hold committed KV (the first
        min(saved, num_computed // block_size)), [n, *block_shape]; waits for copies under
        way. Step-loop thread."""
        self.wait_pending()
        slots = self._slots.get(request_id, [])[: num_computed // self.block_size]
        return self.pool.data[slots]  # fancy indexing: a copy, safe after release

    def import_blocks(self, request_id: str, blocks: np.ndarray) -> int:
        """Put a resumed request's saved blocks ([n, *block_shape]) into the host pool, as if
        it had been checkpointed and evicted; returns how many were taken (a prefix: fewer
        when the pool is short). Step-loop thread, before the request is first scheduled."""
        if tuple(blocks.shape[1:]) != tuple(self.pool.data.shape[1:]):
            raise ValueError(f"saved blocks have shape {blocks.shape[1:]}, "
                             f"the pool holds {self.pool.data.shape[1:]}")
        self.wait_pending()  # a queued copy may still target a slot freed and reused here
        self.release(request_id)
        n = min(len(blocks), self.pool.num_free)
        if n < len(blocks):
            log.info("host pool short: %s resumes %d of %d saved blocks", request_id, n,
                     len(blocks))
        slots = self.pool.allocate(n)
        if slots:
            self.pool.data[slots] = blocks[:n]
        self._slots[request_id] = slots
        return n

    def release(self, request_id: str) -> None:
        slots = self._slots.pop(request_id, None)
        if slots:
            self.pool.free(slots)

    def close(self) -> None:
        """Finish pending copies and stop the copy thread (engine shutdown)."""
        self.wait_pending()
        self._jobs.put(None)
        self._thread.join(timeout=10)
