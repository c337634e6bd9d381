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

With prefix caching a request's leading blocks may be shared cached blocks (its prefix
hits): those are not copied (their slot is None, a gap); on restore the scheduler takes
them from the cache again, and copies from host only the blocks after the hits
(`saved_run` says how far the host copy runs without a gap).
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
        self._slots: dict[str, list] = {}  # request id -> host slot of block i (None: not copied)
        self._jobs: "queue.Queue" = queue.Queue()
        self._pending = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._copy_loop, name="kv-checkpoint-copy",
                                        daemon=True)
        self._thread.start()

    @property
    def block_shape(self) -> tuple:
        """One block as `export_blocks` returns and `import_blocks` takes it (every layer,
        K and V, every KV head)."""
        return tuple(self.transfer.block_shape)

    def num_saved_blocks(self, request_id: str) -> int:
        """Leading blocks checkpointed or deliberately left out (cached prefix hits)."""
        return len(self._slots.get(request_id, ()))

    def saved_run(self, request_id: str, first: int) -> int:
        """How many blocks from block `first` on are on host, without a gap."""
        n = 0
        for s in self._slots.get(request_id, ())[first:]:
            if s is None:
                break
            n += 1
        return n

    # ---- device -> host ---------------------------------------------------------------
    def checkpoint_new_blocks(self, requests: list) -> None:
        """For each (request id, block table, committed tokens, leading blocks to leave
        out): copy the newly completed, not yet checkpointed blocks to host. The blocks
        left out are the request's prefix-cache hits (shared; the cache keeps them). A
        hit block left out earlier (a None slot) that is past `skip` now was evicted from
        the cache and recomputed by the request itself: it is copied too, so that the
        host copy runs without a gap again and a later restore reaches past it."""
        dev_ids, slots = [], []
        for rid, blocks, num_computed, skip in requests:
            have = self._slots.setdefault(rid, [])
            full = min(num_computed // self.block_size, len(blocks))
            if len(have) < min(skip, full):
                have.extend([None] * (min(skip, full) - len(have)))
            gaps = [i for i in range(skip, min(len(have), full)) if have[i] is None]
            new = gaps + list(range(len(have), full))
            if not new:
                continue
            got = self.pool.allocate(len(new))
            if not got:
                self.counters.blocks_skipped_pool_full += len(new)
                continue
            for i, slot in zip(gaps, got):
                have[i] = slot
            have.extend(got[len(gaps):])
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
    def restore(self, request_id: str, dev_ids: list[int], first: int = 0) -> None:
        """Write the request's saved blocks `first`, `first + 1`, ... into device blocks
        `dev_ids` (each must be on host: see `saved_run`)."""
        self.wait_pending()
        slots = self._slots[request_id][first: first + len(dev_ids)]
        if len(slots) < len(dev_ids) or any(s is None for s in slots):
            raise RuntimeError(f"{request_id}: blocks {first}..{first + len(dev_ids) - 1} "
                               f"are not all on host")
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
    def export_blocks(self, request_id: str, num_computed: int,
                      table: list[int] = ()) -> np.ndarray:
        """A copy of the request's blocks that hold committed KV, [n, *block_shape]: the
        first num_computed // block_size, each from host, or, for a block left out of the
        checkpoint (a prefix hit), from device block `table[i]` (the request's block
        table: it must still hold those blocks); stops at the first block found in
        neither. Waits for copies under way. Step-loop thread."""
        self.wait_pending()
        slots = self._slots.get(request_id, [])
        n = min(len(slots), num_computed // self.block_size)
        take = []
        for i in range(n):
            if slots[i] is None and i >= len(table):
                break
            take.append(i)
        out = np.empty((len(take), *self.pool.data.shape[1:]), self.pool.data.dtype)
        host = [j for j, i in enumerate(take) if slots[i] is not None]
        if host:
            out[host] = self.pool.data[[slots[take[j]] for j in host]]
        dev = [j for j, i in enumerate(take) if slots[i] is None]
        step = self.transfer.max_blocks_per_call
        for start in range(0, len(dev), step):
            part = dev[start: start + step]
            arr = np.asarray(self.transfer.gather([table[take[j]] for j in part]))
            for c, j in enumerate(part):
                out[j] = arr[:, :, :, c]
        return out

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
            self.pool.free([s for s in slots if s is not None])

    def close(self) -> None:
        """Finish pending copies and stop the copy thread (engine shutdown)."""
        self.wait_pending()
        self._jobs.put(None)
        self._thread.join(timeout=10)
