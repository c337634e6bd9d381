"""What the stages of a pipeline run send each other (runtime/pipeline_link.py carries it):
one frame = a `plan_channel.Message` (its encoding: a JSON header plus the batch arrays)
followed by raw bytes (`tail`).

Messages, by `op`:
- `OP_STEP` (process 0 -> stage 1 -> ... -> the last stage): ints {num_top, iteration},
  the step's padded batch arrays, tail = the hidden rows [T, hidden] after the sender's
  last layer (its dtype's raw bytes).
- `OP_SAMPLED` (the last stage -> process 0): tail = `Sampled` (the sampled rows).
- `OP_ERROR` (any stage -> onward -> process 0): ints {stage, error}: a stage failed the
  step; the stages after it pass it on.
- `OP_PING` (around the ring, back to process 0): every stage still answers.
- `OP_STOP` (process 0 -> ... -> the last stage): the run is over.
- `OP_KV` (process 0 -> ... -> the last stage; for `export_blocks` back to process 0): an
  offline KV checkpointer call, ints {method, args} (runtime/pipeline_kv.py), tail: the
  blocks of `import_blocks`, or those the stages exported so far (ints["shapes"]).

Pure functions and a dataclass; no state, no threads.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Optional

import numpy as np

from conserve_jax.runtime.batch_arrays import BatchArrays
from conserve_jax.runtime.plan_channel import Message, decode, encode

OP_STEP, OP_SAMPLED, OP_ERROR, OP_PING, OP_STOP = "step", "sampled", "error", "ping", "stop"
OP_KV = "kv"  # a checkpointer call (runtime/pipeline_kv.py)

LEN = struct.Struct("<I")
REPLY = struct.Struct("<IId")  # sampled rows, top logprobs per row, the last stage's seconds


@dataclasses.dataclass
class Sampled:
    """The sampler's output for the sampled rows of one step (numpy, `num_sampled` rows)."""

    tokens: np.ndarray  # [S] int32
    chosen: np.ndarray  # [S] float32: the chosen token's logprob
    top_ids: np.ndarray  # [S, k] int32
    top_lp: np.ndarray  # [S, k] float32

    def arrays(self) -> tuple:
        return self.tokens, self.chosen, self.top_ids, self.top_lp

    def encode(self, seconds: float = 0.0) -> bytes:
        s, k = self.top_ids.shape
        return REPLY.pack(s, k, seconds) + b"".join(
            np.ascontiguousarray(a).tobytes() for a in
            (self.tokens.astype(np.int32), self.chosen.astype(np.float32),
             self.top_ids.astype(np.int32), self.top_lp.astype(np.float32)))

    @classmethod
    def decode(cls, data: bytes) -> tuple["Sampled", float]:
        """-> (the rows, the seconds the sender spent on the step)."""
        s, k, seconds = REPLY.unpack_from(data)
        pos, out = REPLY.size, []
        for dt, shape in ((np.int32, (s,)), (np.float32, (s,)), (np.int32, (s, k)),
                          (np.float32, (s, k))):
            n = int(np.prod(shape))
            out.append(np.frombuffer(data, dt, n, pos).reshape(shape).copy())
            pos += n * 4
        return cls(*out), seconds


def encode_frame(msg: Message, tail: bytes = b"") -> bytes:
    """A message, then raw bytes."""
    head = encode(msg)
    return LEN.pack(len(head)) + head + tail


def decode_frame(data: bytes) -> tuple[Message, memoryview]:
    """The inverse of `encode_frame`: (message, tail)."""
    (n,) = LEN.unpack_from(data)
    return decode(data[LEN.size: LEN.size + n]), memoryview(data)[LEN.size + n:]


def step_frame(batch: BatchArrays, num_top: int, iteration: int, hidden: np.ndarray) -> bytes:
    """`OP_STEP`: the batch and the hidden rows after the sender's layers."""
    return encode_frame(Message(OP_STEP, {"num_top": num_top, "iteration": iteration}, batch),
                        np.ascontiguousarray(hidden).tobytes())


def hidden_rows(tail, hidden_size: int, dtype) -> np.ndarray:
    """An `OP_STEP` frame's hidden rows [T, hidden_size]."""
    return np.frombuffer(tail, np.dtype(dtype)).reshape(-1, hidden_size)


def error_frame(stage: int, error: str) -> bytes:
    return encode_frame(Message(OP_ERROR, {"stage": stage, "error": error}))


def control_frame(op: str, ints: Optional[dict] = None) -> bytes:
    """`OP_PING` or `OP_STOP`."""
    return encode_frame(Message(op, ints or {}))
