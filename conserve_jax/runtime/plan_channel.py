"""The leader -> followers channel of a multi-process run: each step's padded batch arrays
(fixed-shape int32/float32/uint32 buffers, `BatchArrays`), the safepoint decisions inside
an iteration, the offline KV checkpointer's calls (runtime/kv_replica.py), and the stop at
shutdown.

Transport: one TCP connection from the leader to each follower (runtime/plan_socket.py),
one length-prefixed frame per message, in order. The leader's listening port is published
once through the `jax.distributed` coordinator's key-value store (`PORT_KEY`); a follower
connects to the coordinator's host at that port. A send is one socket write per follower
(no round trip to the coordinator); a follower that closed its socket makes the leader's
next send raise `PlanChannelClosed`, and a closed leader makes a follower's `recv` raise it.

Contract: one `PlanChannel` per process. On the leader only the step-loop thread (the
runner's owner) calls `send_*`; on a follower only the follower loop calls `recv*`.
Messages are tiny (the plan's arrays: a few KB), encoded as a JSON header plus raw bytes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import struct
from typing import Optional, Union

import numpy as np

from conserve_jax.runtime.batch_arrays import BatchArrays
from conserve_jax.runtime.plan_socket import FollowerSocket, LeaderSockets, PlanChannelClosed
from conserve_jax.runtime.sampler import SamplingRows

log = logging.getLogger(__name__)

PORT_KEY = "conserve/plan_channel/port"

OP_EXECUTE, OP_RESUME, OP_SAFEPOINT, OP_STOP = "execute", "resume", "safepoint", "stop"
OP_KV = "kv"  # a checkpointer call: ints {"method": name, "args": JSON list}
OP_PING = "ping"  # an idle leader's check that every process answers (`ModelRunner.ping`)

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
    """Leader side: `send_execute`, `send_resume`, `send_decision`, `send_kv`, `send_ping`,
    `send_stop`.
    Follower side: `recv` (any message) and `recv_decision` (the next message, which must be
    a safepoint decision). `transport` is the leader's `LeaderSockets` or a follower's
    `FollowerSocket` (anything with their `send` or `recv` and `close`)."""

    def __init__(self, transport: Union[LeaderSockets, FollowerSocket], leader: bool,
                 timeout_s: float) -> None:
        self._transport = transport
        self.leader = leader
        self._timeout_s = timeout_s
        self.sent_bytes = 0

    @classmethod
    def connect(cls, leader: bool, timeout_s: float) -> "PlanChannel":
        """The channel of this process of the running `jax.distributed` run (after
        `distributed.start`). The leader listens and publishes its port (it accepts the
        followers at its first send, waiting up to 10 x `timeout_s`); a follower waits as
        long for the port and connects."""
        from jax._src import distributed as jd

        state = jd.global_state
        if state.client is None:
            raise RuntimeError("jax.distributed is not initialized")
        if leader:
            sockets = LeaderSockets.listen(state.num_processes - 1, timeout_s, 10 * timeout_s)
            state.client.key_value_set(PORT_KEY, str(sockets.port), allow_overwrite=True)
            log.info("plan channel: listening on port %d for %d followers", sockets.port,
                     state.num_processes - 1)
            return cls(sockets, True, timeout_s)
        port = int(state.client.blocking_key_value_get(PORT_KEY, int(10 * timeout_s * 1000)))
        host = state.coordinator_address.rsplit(":", 1)[0].strip("[]")
        return cls(FollowerSocket.connect(host, port, state.process_id, 10 * timeout_s),
                   False, timeout_s)

    def close(self) -> None:
        self._transport.close()

    # ---- leader -------------------------------------------------------------------------
    def _send(self, msg: Message, wait_s: Optional[float] = None) -> None:
        data = encode(msg)
        self._transport.send(data, wait_s)
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

    def send_ping(self) -> None:
        """The followers join the leader in `ModelRunner.ping`'s collective."""
        self._send(Message(OP_PING, {}))

    def send_stop(self) -> None:
        """The last message: the followers return; then the channel is closed. Best effort
        (shutdown calls it, perhaps after a follower died): a follower that is gone or does
        not connect within `timeout_s` is logged, not raised."""
        try:
            self._send(Message(OP_STOP, {}), wait_s=self._timeout_s)
        except PlanChannelClosed as e:
            log.warning("the stop did not reach every follower: %s", e)
        finally:
            self.close()

    # ---- follower -----------------------------------------------------------------------
    def recv(self) -> Message:
        """The next message, waiting as long as it takes (the leader may idle for hours);
        raises `PlanChannelClosed` when the leader's end closed (it died or exited)."""
        return decode(self._transport.recv())

    def recv_decision(self, layers_done: int) -> bool:
        """The leader's decision at the safepoint after `layers_done` layers (True: abandon);
        raises if the next message is anything else (the processes diverged)."""
        msg = self.recv()
        if msg.op != OP_SAFEPOINT or msg.ints["layers_done"] != layers_done:
            raise RuntimeError(f"expected the safepoint decision after layer {layers_done}, "
                               f"got {msg.op} {msg.ints}")
        return bool(msg.ints["abandon"])
