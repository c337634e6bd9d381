"""Offline KV checkpoints in a multi-process run: every process keeps its own heads of the
checkpointed blocks in its own host pool, and the leader's checkpointer decides for all.

A `KVCheckpointer`'s pool bookkeeping (which block of which request sits in which slot,
which copies are skipped because the pool is full) follows from the sequence of calls
made to it. `LeaderCheckpointer` (process 0: the engine's checkpointer) sends every call
that changes a pool or the caches (`checkpoint_new_blocks`, `restore`, `release`,
`export_blocks`, `import_blocks`, and "open" when it is built) over the plan channel (before
it runs it; `checkpoint_new_blocks` just after, and only when it changed something); each follower's `FollowerCheckpointer` (held by runtime/follower.py) runs the
same call on its own `KVCheckpointer`, in the same order relative to the layer calls, so
every process's pool holds the same slots, each with its own heads (its `KVTransfer` moves
only those). Copies stay asynchronous on every process, as with one process.

A saved request (`export_blocks` / `import_blocks`: the SIGTERM save and the resume after a
restart) carries every head, as with one process: `export_blocks` joins the processes'
heads with an all-gather, `import_blocks` sends the leader's blocks to every process with a
broadcast and each keeps its heads. Both are collectives every process makes.

Threading: as `KVCheckpointer`: the engine's step-loop thread on the leader, the follower
loop on a follower.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from conserve_jax.kv.checkpointer import KVCheckpointer
from conserve_jax.runtime.kv_transfer import KVTransfer

HEAD_AXIS = 3  # of exported blocks [n, layers, 2, kv_heads, block_size, head_dim]


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """Which KV heads each process holds: `ranges[p]` = (first, end) of process p."""

    ranges: tuple
    me: int
    heads: int  # in all

    @classmethod
    def of(cls, cache) -> "HeadSplit":
        """From a cache array [kv_heads, blocks, block_size, head_dim] split along heads."""
        import jax

        per: dict = {}
        for dev, index in cache.sharding.devices_indices_map(cache.shape).items():
            lo, hi = index[0].indices(cache.shape[0])[:2]
            a, b = per.get(dev.process_index, (lo, hi))
            per[dev.process_index] = (min(a, lo), max(b, hi))
        ranges = tuple(per[p] for p in sorted(per))
        mine = sum(sh.data.shape[0] for sh in cache.addressable_shards)
        me = jax.process_index()
        if ranges[me][1] - ranges[me][0] != mine:
            raise RuntimeError(f"process {me}'s KV heads are not contiguous: {ranges}")
        return cls(ranges, me, cache.shape[0])

    def local(self, blocks: np.ndarray) -> np.ndarray:
        """This process's heads of exported blocks."""
        lo, hi = self.ranges[self.me]
        return np.ascontiguousarray(blocks[:, :, :, lo:hi])

    def join(self, gathered: np.ndarray) -> np.ndarray:
        """[processes, n, ...local heads...] -> [n, ...every head...] in head order."""
        order = sorted(range(len(self.ranges)), key=lambda p: self.ranges[p][0])
        return np.concatenate([gathered[p] for p in order], axis=HEAD_AXIS)


def all_heads(split: HeadSplit, local: np.ndarray) -> np.ndarray:
    """Collective: every process's heads of the same exported blocks, joined."""
    if not len(local):  # the same count on every process: all skip together
        return local
    from jax.experimental import multihost_utils

    return split.join(np.asarray(multihost_utils.process_allgather(local)))


def leader_blocks(blocks: np.ndarray) -> np.ndarray:
    """Collective: process 0's `blocks` on every process (the others pass zeros of its
    shape and dtype)."""
    if not len(blocks):
        return blocks
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(blocks))


class LeaderCheckpointer(KVCheckpointer):
    """Process 0's checkpointer: each call that changes a pool or the caches goes to the
    followers first (module docstring)."""

    def __init__(self, transfer: KVTransfer, pool_bytes: int, channel, split: HeadSplit,
                 warmup: bool) -> None:
        super().__init__(transfer, pool_bytes)
        self.channel = channel
        self.split = split
        self._send("open", pool_bytes, warmup)

    def _send(self, method: str, *args) -> None:
        self.channel.send_kv(method, list(args))

    @property
    def block_shape(self) -> tuple:
        L, two, _, bs, hd = self.transfer.block_shape
        return (L, two, self.split.heads, bs, hd)

    def checkpoint_new_blocks(self, requests: list) -> None:
        """Runs here first; only the requests whose slots changed go to the followers (most
        iterations complete no block: no message). Replaying just those is the same call on
        a follower's pool: the others allocate nothing there either. Their gathers run on
        the followers after this process's, before the next layer call (no collectives)."""
        requests = [(str(r), [int(b) for b in blocks], int(n), int(skip))
                    for r, blocks, n, skip in requests]
        before = [list(self._slots[r[0]]) if r[0] in self._slots else None for r in requests]
        super().checkpoint_new_blocks(requests)
        changed = [r for r, b in zip(requests, before) if self._slots.get(r[0]) != b]
        if changed:
            self._send("checkpoint_new_blocks", changed)

    def restore(self, request_id: str, dev_ids: list[int], first: int = 0) -> None:
        self._send("restore", request_id, [int(b) for b in dev_ids], int(first))
        super().restore(request_id, dev_ids, first)

    def release(self, request_id: str) -> None:
        if request_id in self._slots:  # a no-op elsewhere: nothing to tell
            self._send("release", request_id)
        super().release(request_id)

    def export_blocks(self, request_id: str, num_computed: int,
                      table: list[int] = ()) -> np.ndarray:
        table = [int(b) for b in table]
        self._send("export_blocks", request_id, int(num_computed), table)
        return all_heads(self.split, super().export_blocks(request_id, num_computed, table))

    def import_blocks(self, request_id: str, blocks: np.ndarray) -> int:
        if tuple(blocks.shape[1:]) != self.block_shape:
            raise ValueError(f"saved blocks have shape {blocks.shape[1:]}, "
                             f"this run's blocks {self.block_shape}")
        blocks = np.ascontiguousarray(blocks, self.pool.data.dtype)
        self._send("import_blocks", request_id, len(blocks))
        return super().import_blocks(request_id, self.split.local(leader_blocks(blocks)))


def repeat_plain_call(ckpt: Optional[KVCheckpointer], method: str, args: list) -> bool:
    """Run one of process 0's checkpointer calls that every other process repeats as it
    was made (`checkpoint_new_blocks`, `restore`, `release`) on `ckpt`, this process's own;
    False for any other call (the caller's to handle). Raises if "open" has not come yet."""
    if ckpt is None:
        raise RuntimeError(f"process 0 sent checkpointer call {method} before 'open'")
    if method == "checkpoint_new_blocks":
        ckpt.checkpoint_new_blocks([tuple(r) for r in args[0]])
    elif method == "restore":
        ckpt.restore(*args)
    elif method == "release":
        ckpt.release(*args)
    else:
        return False
    return True


class FollowerCheckpointer:
    """A follower's side: runs the leader's checkpointer calls on its own pool. Built by
    the follower loop at start; its `KVCheckpointer` exists from the leader's "open" on."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.ckpt: Optional[KVCheckpointer] = None
        self.split: Optional[HeadSplit] = None

    def apply(self, method: str, args: list) -> None:
        if method == "open":
            pool_bytes, warmup = args
            transfer = KVTransfer(self.runner)
            self.split = HeadSplit.of(self.runner.caches[0][0])
            self.ckpt = KVCheckpointer(transfer, pool_bytes)
            if warmup:
                transfer.warmup()
            return
        c = self.ckpt
        if repeat_plain_call(c, method, args):
            return
        if method == "export_blocks":
            all_heads(self.split, c.export_blocks(*args))
        elif method == "import_blocks":
            request_id, n = args
            L, two, _, bs, hd = c.transfer.block_shape
            zeros = np.zeros((n, L, two, self.split.heads, bs, hd), c.pool.data.dtype)
            c.import_blocks(request_id, self.split.local(leader_blocks(zeros)))
        else:
            raise RuntimeError(f"unknown checkpointer call {method}")

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()


def make_checkpointer(runner, pool_bytes: int, warmup: bool) -> KVCheckpointer:
    """The engine's checkpointer over `runner`'s caches: a `LeaderCheckpointer` when the
    runner leads followers, the runner's own (`PipelineLeader.make_checkpointer`, a
    `PipelineCheckpointer` of runtime/pipeline_kv.py) for a pipeline's process 0, else a
    plain one; its transfers compiled when `warmup`."""
    if hasattr(runner, "make_checkpointer"):  # a pipeline run's process 0: stages split layers
        return runner.make_checkpointer(pool_bytes, warmup)
    transfer = KVTransfer(runner)
    if runner.channel is not None:
        ckpt = LeaderCheckpointer(transfer, pool_bytes, runner.channel,
                                  HeadSplit.of(runner.caches[0][0]), warmup)
    else:
        ckpt = KVCheckpointer(transfer, pool_bytes)
    if warmup:
        transfer.warmup()
    return ckpt
