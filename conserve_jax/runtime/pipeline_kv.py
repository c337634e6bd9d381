"""Offline KV checkpoints in a pipeline run (`EngineConfig.pp` > 1): every stage keeps its
own layers of the checkpointed blocks in its own host pool, and process 0's checkpointer
decides for all (the pipeline's counterpart of runtime/kv_replica.py, which splits heads).

`PipelineCheckpointer` (process 0, the engine's checkpointer; built by
`kv_replica.make_checkpointer` through `PipelineLeader.make_checkpointer`) is a
`LeaderCheckpointer` whose
"channel" is the ring: every call that changes a pool or the caches goes to stage 1 as an
`OP_KV` frame (runtime/pipeline_frames.py) before the step frames that follow it, and every
stage passes it on and runs the same call on its own `KVCheckpointer` over its own layers
(`StageCheckpointer`), so every pool holds the same slots. Every stage's pool has the same
number of slots: `pool_bytes` over the largest stage's bytes per block.

A saved request carries every layer, as with one process: `export_blocks` has each later
stage append its layers' blocks to the frame it passes on, and the last stage sends the
frame back to process 0, which joins the layers in order; `import_blocks` sends every layer
along and each stage keeps its own. Copies stay asynchronous on every stage.

Threading: as `KVCheckpointer`: the engine's step-loop thread on process 0, the stage loop
on the others.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from conserve_jax.kv.checkpointer import KVCheckpointer
from conserve_jax.runtime.kv_replica import LeaderCheckpointer, repeat_plain_call
from conserve_jax.runtime.kv_transfer import KVTransfer
from conserve_jax.runtime.pipeline_frames import OP_KV, decode_frame, encode_frame
from conserve_jax.runtime.plan_channel import Message

LAYER_AXIS = 1  # of exported blocks [n, layers, 2, kv_heads, block_size, head_dim]


def stage_pool_bytes(pool_bytes: int, transfer: KVTransfer, most_layers: int) -> int:
    """This stage's pool size giving every stage the same slot count (module docstring;
    `most_layers`: the largest stage's layer count)."""
    own = math.prod(transfer.block_shape) * np.dtype(transfer.dtype).itemsize
    per_layer = own // transfer.block_shape[0]
    return (pool_bytes // (per_layer * most_layers)) * own


class _RingKV:
    """The `send_kv` of a plan channel, over process 0's ring."""

    def __init__(self, leader) -> None:
        self.leader = leader

    def send_kv(self, method: str, args: list, tail: bytes = b"") -> None:
        self.leader.join()
        self.leader.ring.outbound.send(
            encode_frame(Message(OP_KV, {"method": method, "args": args}), tail))


class PipelineCheckpointer(LeaderCheckpointer):
    """Process 0's checkpointer (module docstring)."""

    def __init__(self, leader, pool_bytes: int, warmup: bool) -> None:
        transfer = KVTransfer(leader.stage.runner)
        self.leader, self.num_layers = leader, leader.cfg.num_layers
        KVCheckpointer.__init__(self, transfer, stage_pool_bytes(
            pool_bytes, transfer, leader.stage.most_layers))
        self.channel, self.split = _RingKV(leader), None
        self._send("open", pool_bytes, warmup)
        if warmup:
            transfer.warmup()

    @property
    def block_shape(self) -> tuple:
        _, two, heads, bs, hd = self.transfer.block_shape
        return (self.num_layers, two, heads, bs, hd)

    def export_blocks(self, request_id: str, num_computed: int,
                      table: list[int] = ()) -> np.ndarray:
        table = [int(b) for b in table]
        self._send("export_blocks", request_id, int(num_computed), table)
        mine = KVCheckpointer.export_blocks(self, request_id, num_computed, table)
        msg, tail = decode_frame(self.leader.ring.inbound.recv())
        if msg.op != OP_KV or msg.ints.get("method") != "export_blocks":
            raise RuntimeError(f"pipeline: expected the exported blocks, got {msg.op}")
        parts, pos = [mine], 0
        for shape in msg.ints["shapes"]:
            if shape[0] != len(mine):
                raise RuntimeError(f"pipeline: a stage exported {shape[0]} blocks of "
                                   f"{request_id}, process 0 {len(mine)}")
            n = math.prod(shape) * mine.dtype.itemsize
            parts.append(np.frombuffer(tail[pos: pos + n], mine.dtype).reshape(shape))
            pos += n
        return np.concatenate(parts, axis=LAYER_AXIS)

    def import_blocks(self, request_id: str, blocks: np.ndarray) -> int:
        if tuple(blocks.shape[1:]) != self.block_shape:
            raise ValueError(f"saved blocks have shape {blocks.shape[1:]}, "
                             f"this run's blocks {self.block_shape}")
        blocks = np.ascontiguousarray(blocks, self.pool.data.dtype)
        self.channel.send_kv("import_blocks", [request_id, list(blocks.shape)],
                             blocks.tobytes())
        hi = self.leader.stage.hi
        return KVCheckpointer.import_blocks(self, request_id,
                                            np.ascontiguousarray(blocks[:, :hi]))


class StageCheckpointer:
    """A later stage's side: runs process 0's checkpointer calls on its own pool and
    returns the frame to pass on (None: nothing; the last stage answers process 0 only for
    `export_blocks`). Its `KVCheckpointer` exists from process 0's "open" on."""

    def __init__(self, stage) -> None:
        self.stage = stage
        self.ckpt: Optional[KVCheckpointer] = None

    def apply(self, msg, tail, data: bytes) -> Optional[bytes]:
        method, args = msg.ints["method"], msg.ints["args"]
        onward = None if self.stage.last else data
        if method == "open":
            pool_bytes, warmup = args
            transfer = KVTransfer(self.stage.runner)
            self.ckpt = KVCheckpointer(transfer, stage_pool_bytes(pool_bytes, transfer,
                                                                  self.stage.most_layers))
            if warmup:
                transfer.warmup()
            return onward
        c = self.ckpt
        if repeat_plain_call(c, method, args):
            return onward
        if method == "import_blocks":
            request_id, shape = args
            blocks = np.frombuffer(tail, c.pool.data.dtype).reshape(shape)
            lo, hi = self.stage.lo, self.stage.hi
            c.import_blocks(request_id, np.ascontiguousarray(blocks[:, lo:hi]))
        elif method == "export_blocks":
            mine = np.ascontiguousarray(c.export_blocks(*args))
            shapes = list(msg.ints.get("shapes", [])) + [list(mine.shape)]
            return encode_frame(Message(OP_KV, {**msg.ints, "shapes": shapes}),
                                bytes(tail) + mine.tobytes())
        else:
            raise RuntimeError(f"unknown checkpointer call {method}")
        return onward

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
