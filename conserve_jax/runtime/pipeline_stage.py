"""One stage of a pipeline run (`EngineConfig.pp` > 1): the engine's `ModelRunner` over a
contiguous range of the model's layers, on this process's own devices, and the loop a stage
other than process 0's runs.

Layers: `stage_layers` splits the model evenly, the earlier stages taking one more layer
when it does not divide. Every stage holds the embedding, final norm and head (small next
to the layers; the first stage embeds, the last samples) and paged KV caches for its own
layers only, in the runner's layout. Block ids are global: process 0's allocator and block
tables decide them, and every stage has the same number of blocks (`stage_blocks`: the
configured count, or `kv_memory_bytes` over the largest stage's bytes per block, so the
memory budget is per process). The runner's mesh is over `jax.local_devices()` at the
configured `tp` (`ModelRunner` reads `pp`), so its collectives stay in the process.
Without safepoints a stage runs `layers_per_call` layers per jitted call, by default the
whole model's default (a third of all layers, rounded up; `default_layers_per_call`), not a
third of the stage: fewer dispatches per step (a stage of random:small's 2 layers is one
call, as in the spike, where a third of the stage would be two).

`StageLoop` (process i > 0, its main thread; `run_stage` builds it, called through
runtime/follower.py's `follow_if_follower`): for each frame from the previous stage
(runtime/pipeline_frames.py) it runs its layers without safepoints (process 0 takes every
safepoint decision before it forwards a step) and sends the hidden rows on, or, on the last
stage, the sampled rows to process 0. A failed step is reported onward (`OP_ERROR`) and the
loop goes on (process 0 then stops the run); a closed link raises `PlanChannelClosed`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Optional

import numpy as np

from conserve_jax.config import EngineConfig, ModelConfig
from conserve_jax.runtime.pipeline_frames import (OP_ERROR, OP_KV, OP_PING, OP_SAMPLED, OP_STEP,
                                                  OP_STOP, Sampled, decode_frame, encode_frame,
                                                  error_frame, hidden_rows, step_frame)
from conserve_jax.runtime.pipeline_link import Ring
from conserve_jax.runtime.plan_channel import Message

log = logging.getLogger(__name__)


def stage_layers(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """Layers [lo, hi) of `stage` of `pp` (earlier stages take the remainder)."""
    if num_layers < pp:
        raise ValueError(f"pp={pp} stages need at least {pp} layers, the model has "
                         f"{num_layers}")
    per, extra = divmod(num_layers, pp)
    lo = stage * per + min(stage, extra)
    return lo, lo + per + (1 if stage < extra else 0)


def stage_blocks(model_cfg: ModelConfig, engine_cfg: EngineConfig, kv_heads: int) -> int:
    """KV blocks every stage allocates (module docstring)."""
    from conserve_jax.runtime.model_runner import kv_bytes_per_block

    if engine_cfg.kv_cache_blocks:
        return engine_cfg.kv_cache_blocks
    most = max(hi - lo for lo, hi in (stage_layers(model_cfg.num_layers, engine_cfg.pp, s)
                                      for s in range(engine_cfg.pp)))
    per_block = kv_bytes_per_block(dataclasses.replace(model_cfg, num_layers=most), kv_heads,
                                   engine_cfg.cache.block_size, engine_cfg.dtype)
    return max(2, engine_cfg.cache.kv_memory_bytes // per_block)


class Stage:
    """Layers [lo, hi) of the model on this process (module docstring). Built once on the
    thread that then runs it."""

    def __init__(self, model_cfg: ModelConfig, params: dict, engine_cfg: EngineConfig,
                 stage: int) -> None:
        from conserve_jax.runtime.model_runner import ModelRunner, default_layers_per_call
        from conserve_jax.runtime.sharding import kv_repeat_for

        self.stage, self.num_stages = stage, engine_cfg.pp
        self.lo, self.hi = stage_layers(model_cfg.num_layers, engine_cfg.pp, stage)
        self.most_layers = max(hi - lo for lo, hi in (
            stage_layers(model_cfg.num_layers, engine_cfg.pp, s) for s in range(engine_cfg.pp)))
        self.model_cfg = model_cfg
        kv_heads = model_cfg.num_kv_heads * kv_repeat_for(engine_cfg.tp, model_cfg.num_kv_heads,
                                                          model_cfg.num_heads)
        blocks = stage_blocks(model_cfg, engine_cfg, kv_heads)
        cfg = dataclasses.replace(engine_cfg, kv_cache_tokens=None,
                                  cache=dataclasses.replace(engine_cfg.cache, num_blocks=blocks))
        per_call = engine_cfg.layers_per_call or default_layers_per_call(model_cfg.num_layers)
        self.runner = ModelRunner(dataclasses.replace(model_cfg, num_layers=self.hi - self.lo),
                                  {**params, "layers": params["layers"][self.lo: self.hi]}, cfg,
                                  layers_per_call=per_call)

    @property
    def first(self) -> bool:
        return self.lo == 0

    @property
    def last(self) -> bool:
        return self.hi == self.model_cfg.num_layers

    def warmup(self, shapes: Optional[list[int]] = None,
               progress: Optional[Callable[[int, int, int], None]] = None) -> float:
        """The runner's warm-up, plus (a later stage) the RoPE tables of every token bucket."""
        t = self.runner.warmup(shapes, progress)
        if not self.first:
            r = self.runner
            for T in shapes if shapes is not None else r.buckets.layer_shapes():
                r.enter(_Positions(np.zeros(T, np.int32)),
                        np.zeros((T, self.model_cfg.hidden_size), r.dtype), 0, 0)
        return t

    def run(self, batch, hidden: np.ndarray, num_top: int, iteration: int):
        """A later stage: this stage's layers from `hidden` (host): the hidden rows after
        them (a device array)."""
        return self.runner.forward(self.runner.enter(batch, hidden, num_top, iteration), None)

    def sample(self, batch, hidden, num_top: int) -> Sampled:
        """The last stage: the sampled rows of `hidden` (numpy, `num_sampled` rows)."""
        s = batch.num_sampled
        if not s:
            hidden.block_until_ready()
            return Sampled(np.zeros(0, np.int32), np.zeros(0, np.float32),
                           np.zeros((0, num_top), np.int32), np.zeros((0, num_top), np.float32))
        out = self.runner.sample_device(batch, hidden, num_top)
        return Sampled(*(np.asarray(a)[:s] for a in out))


@dataclasses.dataclass
class _Positions:  # a stand-in batch for warm-up: `enter` reads positions only
    positions: np.ndarray


class StageLoop:
    """A later stage's loop over the previous stage's frames (module docstring)."""

    def __init__(self, stage: Stage, ring: Ring) -> None:
        from conserve_jax.runtime.pipeline_kv import StageCheckpointer

        self.stage, self.ring = stage, ring
        self.kv = StageCheckpointer(stage)  # offline KV checkpoints of this stage's layers
        self.steps = 0

    def run(self) -> None:
        """Follow until the stop (returns) or a closed link (`PlanChannelClosed`)."""
        st, out = self.stage, self.ring.outbound
        while True:
            data = self.ring.inbound.recv()
            msg, tail = decode_frame(data)
            if msg.op == OP_STOP:
                log.info("pipeline stage %d: stopped after %d steps", st.stage, self.steps)
                if not st.last:
                    out.send(data)
                self.ring.close()
                self.kv.close()
                return
            if msg.op == OP_KV:
                onward = self.kv.apply(msg, tail, data)
                if onward is not None:
                    out.send(onward)
                continue
            if msg.op in (OP_PING, OP_ERROR):
                out.send(data)
                continue
            if msg.op != OP_STEP:
                raise RuntimeError(f"pipeline stage {st.stage}: unexpected message {msg.op}")
            out.send(self.step(msg, tail))
            self.steps += 1

    def step(self, msg, tail) -> bytes:
        """One step's frame onward: the hidden rows, or (last stage) the sampled rows; an
        `OP_ERROR` frame if this stage failed it."""
        st, b = self.stage, msg.batch
        num_top, iteration = msg.ints["num_top"], msg.ints["iteration"]
        try:
            t0 = time.perf_counter()
            hidden = st.run(b, hidden_rows(tail, st.model_cfg.hidden_size, st.runner.dtype),
                            num_top, iteration)
            if st.last:
                return _sampled_frame(st.sample(b, hidden, num_top), time.perf_counter() - t0)
            return step_frame(b, num_top, iteration, np.asarray(hidden))
        except Exception as e:
            log.exception("pipeline stage %d: step %d failed", st.stage, iteration)
            return error_frame(st.stage, f"{type(e).__name__}: {e}")


def _sampled_frame(sampled: Sampled, seconds: float) -> bytes:
    return encode_frame(Message(OP_SAMPLED, {}), sampled.encode(seconds))


def run_stage(config: EngineConfig, loaded=None) -> None:
    """A later stage's process (`follow_if_follower`): start JAX, load the model, build
    its stage, compile it up front when `config.warmup`, link the ring and follow until
    process 0 stops the run."""
    from conserve_jax.runtime import distributed
    from conserve_jax.runtime.compile_cache import enable_compilation_cache

    config = distributed.start(config)
    enable_compilation_cache(config.compilation_cache_dir)
    if loaded is None:
        from conserve_jax.models.loader import load_model

        loaded = load_model(config.model, seed=config.seed)
    ring = Ring.listen(config.process_id, config.num_processes, config.process_timeout_s)
    stage = Stage(loaded.config, loaded.params, config, config.process_id)
    if config.warmup:
        stage.warmup()
    ring.join(10 * config.process_timeout_s)  # process 0 joins at its first step or probe
    log.info("pipeline stage %d of %d: layers %d-%d, following process 0", stage.stage,
             config.pp, stage.lo, stage.hi - 1)
    StageLoop(stage, ring).run()
