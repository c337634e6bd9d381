"""Process 0 of a pipeline run (`EngineConfig.pp` > 1): the engine's runner, with the
`ModelRunner` interface the engine, the profiler and the step watchdog use (`execute`,
`resume`, `take_suspended`, `detach_decodes`, `ping`, `close`, `warmup`, `compiled_count`,
`first_calls`, the sizes), over the first stage (runtime/pipeline_stage.py) and the ring
to the others (runtime/pipeline_link.py). `make_runner` picks it or a plain `ModelRunner`.

A step: build the batch (the block tables are process 0's, global), embed and run the
first stage's layers, send the batch and the hidden rows to stage 1 and wait for the last
stage's sampled rows (or a stage's error, raised here as `PipelineStageFailed`; a dead stage
shows as the inbound link closing: `PlanChannelClosed`). Either fails the engine's step, and
the engine's multi-process policy stops it on the first failure.

Safepoints (layer-wise preemption): only in the first stage, whose layer groups end at the
stage boundary: the safepoint callback is asked after each group of the first stage's
layers (`ModelRunner.forward`) and once more at the boundary, before anything is sent. An
iteration is therefore abandoned before any other stage saw it, and its suspended state
(the hidden rows after the last finished layer, at most the boundary) lives on process 0
only; `resume` continues it here and forwards it. The later stages' layers run without
safepoints: once forwarded, an iteration completes.

Threads: like `ModelRunner`, constructed once and then used only by the engine's step-loop
thread (the profiler runs on it too, before the loop starts).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import numpy as np

from conserve_jax.config import EngineConfig, ModelConfig
from conserve_jax.runtime.batch_arrays import build_batch
from conserve_jax.runtime.model_runner import (ModelRunner, Safepoint, SuspendedIteration,
                                               step_result)
from conserve_jax.runtime.pipeline_frames import (OP_ERROR, OP_PING, OP_SAMPLED, OP_STOP, Sampled,
                                                  control_frame, decode_frame, step_frame)
from conserve_jax.runtime.pipeline_link import Ring
from conserve_jax.runtime.pipeline_stage import Stage
from conserve_jax.runtime.plan_socket import PlanChannelClosed
from conserve_jax.runtime.step_plan import StepPlan, StepResult

log = logging.getLogger(__name__)


class PipelineStageFailed(RuntimeError):
    """A later stage failed a step (its error, passed on to process 0)."""


def make_runner(model_cfg: ModelConfig, params: dict, config: EngineConfig):
    """The engine's runner: a `PipelineLeader` for `pp` > 1, else a `ModelRunner`."""
    if config.pp > 1:
        return PipelineLeader(model_cfg, params, config)
    return ModelRunner(model_cfg, params, config)


class PipelineLeader:
    """Process 0's runner of a pipeline run (module docstring)."""

    detach_decodes = staticmethod(ModelRunner.detach_decodes)

    def __init__(self, model_cfg: ModelConfig, params: dict, config: EngineConfig) -> None:
        self.cfg, self.engine_cfg = model_cfg, config
        self.ring = Ring.listen(config.process_id, config.num_processes,
                                config.process_timeout_s)
        self.stage = Stage(model_cfg, params, config, 0)
        r = self.stage.runner
        self.dtype, self.weight_dtype, self.block_size = r.dtype, r.weight_dtype, r.block_size
        self.buckets, self.max_blocks_per_seq = r.buckets, r.max_blocks_per_seq
        self.num_blocks, self.layers_per_call = r.num_blocks, r.layers_per_call
        self.fast_groups, self.safepoint_groups = r.fast_groups, r.safepoint_groups
        self.first_calls = r.first_calls  # the step watchdog's view of first calls
        self._iteration = 0
        self._suspended: Optional[SuspendedIteration] = None
        self._closed = False
        log.info("pipeline stage 0 of %d: layers 0-%d, tp %d over this process's devices",
                 config.pp, self.stage.hi - 1, config.tp)

    # ---- the runner interface -----------------------------------------------------------
    def warmup(self, shapes: Optional[list[int]] = None,
               progress: Optional[Callable[[int, int, int], None]] = None) -> float:
        """Compile the first stage's calls (each stage compiles its own), then link."""
        t = self.stage.warmup(shapes, progress)
        self.join()
        return t

    def compiled_count(self) -> int:
        return self.stage.runner.compiled_count()

    def execute(self, plan: StepPlan, safepoint: Optional[Safepoint] = None
                ) -> Optional[StepResult]:
        """One iteration through every stage (module docstring); None if abandoned at a
        safepoint of the first stage (`take_suspended` then has it)."""
        b = build_batch(plan, self.buckets, self.block_size)
        want = any(s.num_logprobs for s in plan.sampled_specs())
        self._iteration += 1
        it = self.stage.runner.embed_batch(b, self.engine_cfg.max_logprobs if want else 0,
                                           self._iteration, plan)
        return self._run(it, safepoint)

    def resume(self, it: SuspendedIteration,
               safepoint: Optional[Safepoint] = None) -> Optional[StepResult]:
        """Continue an abandoned iteration at its layer (at most the stage boundary)."""
        return self._run(it, safepoint)

    def take_suspended(self) -> Optional[SuspendedIteration]:
        it, self._suspended = self._suspended, None
        return it

    def ping(self) -> None:
        """One message around the ring: every stage still answers (the idle probe)."""
        self.join()
        self.ring.outbound.send(control_frame(OP_PING))
        msg = self._reply()
        if msg.op != OP_PING:
            raise RuntimeError(f"pipeline: expected the ping back, got {msg.op}")

    def close(self) -> None:
        """Tell the stages the run is over (best effort: a stage may be gone)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.ring.outbound is not None:
                self.ring.outbound.send(control_frame(OP_STOP))
        except PlanChannelClosed as e:
            log.warning("the stop did not reach stage 1: %s", e)
        finally:
            self.ring.close()

    def make_checkpointer(self, pool_bytes: int, warmup: bool):
        """The engine's offline KV checkpointer for this pipeline (runtime/pipeline_kv.py;
        called through `kv_replica.make_checkpointer`)."""
        from conserve_jax.runtime.pipeline_kv import PipelineCheckpointer

        return PipelineCheckpointer(self, pool_bytes, warmup)

    def join(self) -> None:
        """Link the ring once (waits for the stages' start-up: not a hung step)."""
        if self.ring.inbound is None:
            self.first_calls.call(("pipeline join",), self.ring.join,
                                  10 * self.engine_cfg.process_timeout_s)

    # ---- internals ----------------------------------------------------------------------

    def _run(self, it: SuspendedIteration, safepoint: Optional[Safepoint]):
        self._suspended = None
        hidden = self.stage.runner.forward(it, safepoint)
        if hidden is None:  # abandoned inside the first stage
            self._suspended = self.stage.runner.take_suspended()
            return None
        if safepoint is not None:  # the stage boundary: the last decision, before sending
            hidden.block_until_ready()
            if safepoint(self.stage.hi):
                self._suspended = dataclasses.replace(it, hidden=hidden,
                                                      layers_done=self.stage.hi)
                return None
        self.join()
        self.ring.outbound.send(step_frame(it.batch, it.num_top, it.iteration,
                                           np.asarray(hidden)))
        msg, tail = self._reply(with_tail=True)
        if msg.op != OP_SAMPLED:
            raise RuntimeError(f"pipeline: expected the sampled rows, got {msg.op}")
        sampled, _ = Sampled.decode(tail)
        if it.plan is None or not it.batch.num_sampled:
            return StepResult([], self.cfg.num_layers)
        return step_result(it.plan, sampled.arrays(), self.cfg.num_layers)

    def _reply(self, with_tail: bool = False):
        """The next frame from the last stage; a stage's error raises."""
        msg, tail = decode_frame(self.ring.inbound.recv())
        if msg.op == OP_ERROR:
            raise PipelineStageFailed(f"pipeline stage {msg.ints['stage']} failed the step: "
                                      f"{msg.ints['error']}")
        return (msg, tail) if with_tail else msg
