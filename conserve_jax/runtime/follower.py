"""A follower process of a multi-process run: it holds its shards of the weights and the
paged KV cache and runs, in order, exactly the jitted calls the leader's runner runs, on
the batch arrays the leader sends (runtime/plan_channel.py), and repeats the leader's offline
KV checkpointer calls on its own host pool (runtime/kv_replica.py). It never schedules: no
scheduler, no policy, no faces, no clock.

`run_follower(config)` is called by the entry points (`generate`, `serve`, `LLM`) on every
process but 0, on the main thread, and returns when the leader stops the run (its engine
shut down). It raises when the leader's messages cannot be followed (an unknown iteration
to resume: the processes diverged) and `PlanChannelClosed` when the leader's end of the plan
channel closed without a stop (it died); a leader that hangs takes the coordinator with it,
and JAX ends this process (heartbeat, `process_timeout_s`).
"""
from __future__ import annotations

import collections
import logging
from typing import Optional

from conserve_jax.config import EngineConfig
from conserve_jax.runtime import distributed
from conserve_jax.runtime.kv_replica import FollowerCheckpointer
from conserve_jax.runtime.plan_channel import (OP_EXECUTE, OP_KV, OP_PING, OP_RESUME, OP_STOP,
                                               Message, PlanChannel)

log = logging.getLogger(__name__)

KEEP_SUSPENDED = 4  # abandoned iterations kept for a resume (the leader parks at most one)


class Follower:
    """The loop over the leader's messages; owns the runner (single thread)."""

    def __init__(self, runner, channel: PlanChannel) -> None:
        self.runner = runner
        self.channel = channel
        self.kv = FollowerCheckpointer(runner)  # offline KV checkpoints of this process's heads
        self.steps = 0
        self._suspended: collections.OrderedDict = collections.OrderedDict()

    def run(self) -> None:
        """Follow until the leader's stop message."""
        while True:
            msg = self.channel.recv()
            if msg.op == OP_STOP:
                log.info("the leader stopped the run after %d steps", self.steps)
                self.channel.close()
                self.kv.close()
                return
            if msg.op == OP_KV:
                self.kv.apply(msg.ints["method"], msg.ints["args"])
                continue
            if msg.op == OP_PING:
                self.runner.ping()
                continue
            self.step(msg)

    def step(self, msg: Message) -> None:
        """Run one execute or resume message exactly as the leader's runner does."""
        ints = msg.ints
        safepoint = self.channel.recv_decision if ints["safepoints"] else None
        if msg.op == OP_EXECUTE:
            self.runner.execute_batch(msg.batch, ints["num_top"], safepoint, ints["iteration"])
        elif msg.op == OP_RESUME:
            it = self._suspended.pop(ints["iteration"], None)
            if it is None:
                raise RuntimeError(f"the leader resumed iteration {ints['iteration']}, which "
                                   f"this process did not abandon")
            # the leader may have cut decode rows loose (`detach_decodes`): its batch wins
            it.batch = msg.batch
            self.runner.resume(it, safepoint)
        else:
            raise RuntimeError(f"unexpected message {msg.op} {ints}")
        self.steps += 1
        it = self.runner.take_suspended()
        if it is not None:
            self._suspended[it.iteration] = it
            while len(self._suspended) > KEEP_SUSPENDED:
                self._suspended.popitem(last=False)


def run_follower(config: EngineConfig, loaded=None) -> None:
    """Start JAX, load the model, build the runner (compiling up front when
    `config.warmup`, as the leader does) and follow the leader until it stops."""
    config = distributed.start(config)
    from conserve_jax.runtime.compile_cache import enable_compilation_cache
    from conserve_jax.runtime.model_runner import ModelRunner

    enable_compilation_cache(config.compilation_cache_dir)
    if loaded is None:
        from conserve_jax.models.loader import load_model

        loaded = load_model(config.model, seed=config.seed)
    runner = ModelRunner(loaded.config, loaded.params, config)
    if config.warmup:
        runner.warmup()
    log.info("process %d of %d: following the leader", config.process_id,
             config.num_processes)
    Follower(runner, PlanChannel.connect(leader=False,
                                         timeout_s=config.process_timeout_s)).run()


def follow_if_follower(config: EngineConfig) -> Optional[int]:
    """For entry points: on a follower process, follow the leader and return the exit code
    (0 once the leader stopped the run); None on the leader or a single process."""
    if not distributed.is_follower(config):
        return None
    if config.pp > 1:  # a pipeline stage of its own layers (runtime/pipeline_stage.py)
        from conserve_jax.runtime.pipeline_stage import run_stage

        run_stage(config)
        return 0
    run_follower(config)
    return 0
