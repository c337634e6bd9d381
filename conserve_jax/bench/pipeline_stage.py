"""One stage of a two-process pipeline (the pipeline probe, bench/pipeline_probe.py): the
engine's `ModelRunner` over a range of the model's layers, on this process's own devices,
and the TCP link that carries a step from stage to stage.

A measurement, not an engine feature (the engine's pipeline, `--pp`, grew out of it:
runtime/pipeline_*.py; its frames and `Sampled` are used here). A `Stage` is a `ModelRunner` built for a model cut
down to layers [lo, hi) (same embedding, final norm and head; its own paged KV caches for
those layers, in the runner's layout) and run through the runner's own jitted calls
(`_embed`, `forward`, `_select`, `_head`: some private to the runner, read here so that a stage
runs exactly the executables the engine runs). The first stage embeds and runs its layers;
the last stage runs its layers from the hidden rows it is given, then the final norm, the
head and the sampler. Its tensor-parallel mesh is over `jax.local_devices()` only, so its
collectives stay inside the process.

`StageLink` is a duplex channel of length-prefixed frames over one TCP connection (the
framing of runtime/plan_socket.py, both ways): stage 0 listens, stage 1 connects. A step's
frame from stage 0 holds the batch arrays (runtime/plan_channel.py's encoding: what a
follower gets today) and the hidden rows [T, hidden] as raw bytes; the reply holds the
sampled rows and the seconds stage 1 spent on the step (receipt to reply).

Threads: one thread per process owns its stage and its link.
"""
from __future__ import annotations

import dataclasses
import socket
import time
from typing import Optional

import jax
import numpy as np

from conserve_jax.config import EngineConfig, ModelConfig
from conserve_jax.models.llama import rope_tables
from conserve_jax.runtime import sharding as shd
from conserve_jax.runtime.batch_arrays import BatchArrays
from conserve_jax.runtime.model_runner import ModelRunner, SuspendedIteration
from conserve_jax.runtime.pipeline_frames import (Sampled, decode_frame, hidden_rows,  # noqa: F401
                                                  step_frame)
from conserve_jax.runtime.plan_socket import FRAME, _read_exact, _tune
from conserve_jax.runtime.sampler import sampler_mode

def encode_step(batch: BatchArrays, num_top: int, hidden: np.ndarray) -> bytes:
    """Stage 0 -> stage 1: the batch arrays, then the hidden rows' bytes (the engine's
    step frame, runtime/pipeline_frames.py)."""
    return step_frame(batch, num_top, 0, hidden)


def decode_step(data: bytes, hidden_size: int, dtype) -> tuple[BatchArrays, int, np.ndarray]:
    """The inverse of `encode_step`: (batch, num_top, hidden [T, hidden_size])."""
    msg, tail = decode_frame(data)
    return msg.batch, msg.ints["num_top"], hidden_rows(tail, hidden_size, dtype)


@dataclasses.dataclass
class StageLink:
    """A duplex frame channel between the two stages (one TCP connection, TCP_NODELAY)."""

    sock: socket.socket
    sent_bytes: int = 0

    @classmethod
    def listen_and_accept(cls, port: int, timeout_s: float) -> "StageLink":
        """Stage 0: listen on 127.0.0.1:`port` and accept stage 1 (waiting `timeout_s`)."""
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(timeout_s)
            sock, _ = server.accept()
        _tune(sock, timeout_s)
        sock.settimeout(None)
        return cls(sock)

    @classmethod
    def connect(cls, port: int, timeout_s: float) -> "StageLink":
        """Stage 1: connect to stage 0, retrying for `timeout_s` (it may not listen yet)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        _tune(sock, timeout_s)
        sock.settimeout(None)
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(FRAME.pack(len(data)) + data)
        self.sent_bytes += FRAME.size + len(data)

    def recv(self) -> bytes:
        (n,) = FRAME.unpack(_read_exact(self.sock, FRAME.size, "the other stage"))
        return _read_exact(self.sock, n, "the other stage")

    def close(self) -> None:
        self.sock.close()


local_mesh = shd.local_mesh  # (the spike's; moved to runtime/sharding.py)


def stage_params(params: dict, lo: int, hi: int) -> dict:
    """The loader's params with only layers [lo, hi) (embedding, norm, head kept)."""
    return {**params, "layers": params["layers"][lo:hi]}


class Stage:
    """Layers [lo, hi) of a `num_layers`-layer model on this process's devices (module doc).
    `first`: it embeds the tokens; `last`: it samples. Built once; `run_first` and
    `run_last` are called from one thread."""

    def __init__(self, model_cfg: ModelConfig, params: dict, engine_cfg: EngineConfig,
                 lo: int, hi: int) -> None:
        self.lo, self.hi, self.num_layers = lo, hi, model_cfg.num_layers
        cfg = dataclasses.replace(model_cfg, num_layers=hi - lo)
        make_mesh = shd.make_mesh
        shd.make_mesh = local_mesh  # the runner reads it once, in its constructor
        try:
            self.runner = ModelRunner(cfg, stage_params(params, lo, hi), engine_cfg,
                                      layers_per_call=hi - lo)
        finally:
            shd.make_mesh = make_mesh
        self.hidden_size, self.dtype = cfg.hidden_size, self.runner.dtype
        self._rope = jax.jit(rope_tables)

    @property
    def first(self) -> bool:
        return self.lo == 0

    @property
    def last(self) -> bool:
        return self.hi == self.num_layers

    def run_first(self, b: BatchArrays) -> np.ndarray:
        """Embed the batch's tokens and run this stage's layers: the hidden rows [T, H] on
        the host (the KV of these layers is written to this stage's caches)."""
        r = self.runner
        x, cos, sin = r._embed(r.embed, b.token_ids, b.positions, r.inv_freq)
        return np.asarray(self._layers(b, x, cos, sin))

    def run_last(self, b: BatchArrays, hidden: np.ndarray, num_top: int) -> Sampled:
        """Run this stage's layers from `hidden` [T, H] (host), then norm, head and
        sampler on the batch's sampled rows."""
        r = self.runner
        cos, sin = self._rope(b.positions, r.inv_freq)
        x = r._put(hidden)
        return self.sample(b, self._layers(b, x, cos, sin), num_top)

    def _layers(self, b: BatchArrays, x, cos, sin):
        it = SuspendedIteration(None, b, x, (cos, sin), 0, 0, 0)
        return self.runner.forward(it, None)

    def sample(self, b: BatchArrays, hidden, num_top: int) -> Sampled:
        r, rows, s = self.runner, b.sampling, b.num_sampled
        out = r._head(r.final_norm, r.head, r._select(hidden, b.sample_rows), rows.temperature,
                      rows.top_k, rows.top_p, rows.seed, rows.counter,
                      mode=sampler_mode(rows, s), num_top=num_top)
        tokens, chosen, top_ids, top_lp = (np.asarray(a)[:s] for a in out)
        return Sampled(tokens, chosen, top_ids, top_lp)


def serve_last_stage(stage: Stage, link: StageLink) -> int:
    """Stage 1's loop: answer every step frame with its sampled rows until an empty frame
    (the stop) arrives; returns the steps served."""
    steps = 0
    while True:
        data = link.recv()
        if not data:
            return steps
        t0 = time.perf_counter()
        b, num_top, hidden = decode_step(data, stage.hidden_size, stage.dtype)
        sampled = stage.run_last(b, hidden, num_top)
        link.send(sampled.encode(time.perf_counter() - t0))
        steps += 1


@dataclasses.dataclass
class StepTimes:
    """Where one pipelined step's time went, seen from stage 0 (seconds)."""

    first: float  # batch built, embed, stage 0's layers, hidden to host
    send: float  # the frame written to the socket
    wait: float  # from the send to stage 1's reply (stage 1 + both transfers)
    last: float  # stage 1's own time, receipt to reply (it reports it)

    @property
    def transfer(self) -> float:
        """The wait minus stage 1's own time: both frames' trips and wake-ups."""
        return max(0.0, self.wait - self.last)


def pipelined_step(stage: Stage, link: StageLink, b: BatchArrays, num_top: int,
                   t0: Optional[float] = None) -> tuple[Sampled, StepTimes]:
    """Stage 0's side of one step (`b` built at `t0`, default now): its layers, the frame
    to stage 1, stage 1's reply."""
    t0 = time.perf_counter() if t0 is None else t0
    hidden = stage.run_first(b)
    t1 = time.perf_counter()
    link.send(encode_step(b, num_top, hidden))
    t2 = time.perf_counter()
    sampled, last = Sampled.decode(link.recv())
    t3 = time.perf_counter()
    return sampled, StepTimes(t1 - t0, t2 - t1, t3 - t2, last)
