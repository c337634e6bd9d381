"""The leader -> followers channel of a multi-process run: each step's padded batch arrays
(fixed-shape int32/float32/uint32 buffers, `BatchArrays`), the safepoint decisions inside
an iteration, the offline KV checkpointer's calls (runtime/kv_replica.py), and the stop at
shutdown.

Transport: the `jax.distributed` coordinator's key-value store. The leader writes message
n under `conserve/step/n`; every follower reads the messages in order (a blocking get,
re-armed every second so an idle follower waits forever without spinning). The leader
deletes message n - `KEEP` when it writes message n: a follower is never more than a couple
of messages behind, since every iteration's layer calls hold collectives the leader cannot
finish without the followers.

Contract: one `PlanChannel` per process. On the leader only the step-loop thread (the
runner's owner) calls `send_*`; on a follower only the follower loop calls `recv*`.
Messages are tiny (the plan's arrays: a few KB), encoded as a JSON header plus raw bytes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import struct
from typing import Optional

import numpy as np

from conserve_jax.runtime.batch_arrays import BatchArrays
from conserve_jax.runtime.sampler import SamplingRows

log = logging.getLogger(__name__)

KEY = "conserve/step/{}"
KEEP = 16  # messages kept in the store behind the newest
POLL_MS = 1000

OP_EXECUTE, OP_RESUME, OP_SAFEPOINT, OP_STOP = "execute", "resume", "safepoint", "stop"
OP_KV = "kv"  # a checkpointer call: ints {"method": name, "args": JSON list}

_BATCH = ("token_ids", "positions", "slot_blocks", "slot_offsets", "dec_tables", "dec_lens",
          "pre_tables", "pre_start", "pre_seq", "sample_rows")
_ROWS = ("temperature", "top_k", "top_p", "seed", "counter")


@dataclasses.dataclass
class Message:
    """One message: `op`, small integer fields (`ints`) and, for execute/resume, a batch."""

    op: str
    ints: dict
    batch: Optional[BatchArrays] = None


def encode(msg: Message) -> bytes:
    arrays = {}
    if msg.batch is not None:
        b = msg.batch
        arrays = {n: getattr(b, n) for n in _BATCH}
        arrays.update({f"rows.{n}": getattr(b.sampling, n) for n in _ROWS})
    header = {"op": msg.op, "ints": msg.ints,
              "arrays": [[n, str(a.dtype), list(a.shape)] for n, a in arrays.items()]}
    if msg.batch is not None:
        header["ints"] = {**msg.ints, "num_sampled": msg.batch.num_sampled,
                          "shape_key": msg.batch.shape_key}
    head = json.dumps(header).encode()
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    return struct.pack("<I", len(head)) + head + body


def decode(data: bytes) -> Message:
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4: 4 + n])
    pos, arrays = 4 + n, {}
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(data, dt, count, pos).reshape(shape).copy()
        pos += count * dt.itemsize
    ints = header["ints"]
    batch = None
    if arrays:
        rows = SamplingRows(*(arrays[f"rows.{n}"] for n in _ROWS))
        batch = BatchArrays(*(arrays[n] for n in _BATCH), sampling=rows,
                            num_sampled=ints["num_sampled"], shape_key=ints["shape_key"])
    return Message(header["op"], ints, batch)


class PlanChannel:
    """Leader side: `send_execute`, `send_resume`, `send_decision`, `send_kv`, `send_stop`.
    Follower
    side: `recv` (any message) and `recv_decision` (the next message, which must be a
    safepoint decision)."""

    def __init__(self, client, leader: bool, timeout_s: float) -> None:
        self._client = client
        self.leader = leader
        self._timeout_s = timeout_s
        self._n = 0  # next message index
        self.sent_bytes = 0

    @classmethod
    def connect(cls, leader: bool, timeout_s: float) -> "PlanChannel":
        """The channel over the running `jax.distributed` client (after `distributed.start`)."""
        from jax._src import distributed as jd

        if jd.global_state.client is None:
            raise RuntimeError("jax.distributed is not initialized")
        return cls(jd.global_state.client, leader, timeout_s)

    # ---- leader -------------------------------------------------------------------------
    def _send(self, msg: Message) -> None:
        data = encode(msg)
        self._client.key_value_set_bytes(KEY.format(self._n), data)
        if self._n >= KEEP:
            try:
                self._client.key_value_delete(KEY.format(self._n - KEEP))
            except Exception:  # a missing key is harmless
                log.debug("deleting message %d failed", self._n - KEEP, exc_info=True)
        self._n += 1
        self.sent_bytes += len(data)

    def send_execute(self, batch: BatchArrays, num_top: int, safepoints: bool,
                     iteration: int) -> None:
        self._send(Message(OP_EXECUTE, {"num_top": num_top, "safepoints": int(safepoints),
                                        "iteration": iteration}, batch))

    def send_resume(self, batch: BatchArrays, num_top: int, safepoints: bool,
                    iteration: int) -> None:
        self._send(Message(OP_RESUME, {"num_top": num_top, "safepoints": int(safepoints),
                                       "iteration": iteration}, batch))

    def send_decision(self, layers_done: int, abandon: bool) -> None:
        self._send(Message(OP_SAFEPOINT, {"layers_done": layers_done,
                                          "abandon": int(abandon)}))

    def send_kv(self, method: str, args: list) -> None:
        """A checkpointer call the followers repeat on their own pools (JSON arguments)."""
        self._send(Message(OP_KV, {"method": method, "args": args}))

    def send_stop(self) -> None:
        self._send(Message(OP_STOP, {}))

    # ---- follower -----------------------------------------------------------------------
    def recv(self) -> Message:
        """The next message, waiting as long as it takes (the leader may idle for hours);
        raises what the key-value store raises for anything but a timeout (the coordinator
        is gone)."""
        key = KEY.format(self._n)
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(key, POLL_MS)
                break
            except Exception as e:  # XlaRuntimeError; a timeout says DEADLINE_EXCEEDED
                if "DEADLINE_EXCEEDED" not in str(e) and "deadline" not in str(e).lower():
                    raise
        self._n += 1
        return decode(data)

    def recv_decision(self, layers_done: int) -> bool:
        """The leader's decision at the safepoint after `layers_done` layers (True: abandon);
        raises if the next message is anything else (the processes diverged)."""
        msg = self.recv()
        if msg.op != OP_SAFEPOINT or msg.ints["layers_done"] != layers_done:
            raise RuntimeError(f"expected the safepoint decision after layer {layers_done}, "
                               f"got {msg.op} {msg.ints}")
        return bool(msg.ints["abandon"])
