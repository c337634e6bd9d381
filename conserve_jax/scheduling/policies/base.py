"""Scheduling policies: how much work one iteration may take, and whether offline work
may join it. Small and pluggable; the `Scheduler` asks, the policy answers.

`Policy` itself ("fcfs") is the plain continuous-batching policy (online first, fixed token budget).
The co-serving policies live beside it (`conserve.py`, `baselines.py`, `ecoserve.py`). A
policy never sees the engine: what it needs from it (e.g. the earliest waiting online
request) is handed to it as a function when it is built (`registry.build`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from conserve_jax.scheduling.scheduled_step import QueueView as Scheduler, ScheduledStep
    from conserve_jax.request import Sequence


@dataclass
class StepBudget:
    """Token budget of one iteration. Subclasses may add a time budget."""

    max_tokens: int
    max_prefill_tokens: int
    max_decodes: int

    def decodes_left(self, step: "ScheduledStep", seq: "Sequence" = None) -> int:
        return min(self.max_decodes - len(step.plan.decodes),
                   self.max_tokens - step.plan.num_tokens)

    def prefill_tokens_for(self, step: "ScheduledStep", seq: "Sequence") -> int:
        used = sum(len(p.tokens) for p in step.plan.prefills)
        room = min(self.max_prefill_tokens - used, self.max_tokens - step.plan.num_tokens)
        return max(0, min(seq.num_pending, room))


@dataclass
class Safepoints:
    """The runner's checks for one iteration: after every `safepoint_interval` layers (the
    runner's, from `ConserveConfig`) it calls `check(layers_done)`, and abandons the
    iteration if that returns True."""

    check: Callable[[int], bool]


class Policy:
    """Base policy: FCFS continuous batching, online before offline, a fixed token budget,
    no preemption inside an iteration. Hooks are called by the engine's step-loop thread
    (except `accepts`, called by `Engine.submit` on the caller's thread: keep it pure)."""

    name = "fcfs"
    priority = True  # online before offline, and online may evict offline
    checkpointing = False  # evicted offline requests keep a host copy of their KV
    # an iteration abandoned at a safepoint is parked and continued from its layer later
    # (at the next iteration without online work) instead of being discarded
    resumes_abandoned = False
    # predicted seconds of online iterations' time given beyond the isolation budget to
    # urgent offline work (deadline_policy "borrow"); EngineStats.deadline_borrowed_s
    borrowed_s = 0.0

    def __init__(self, max_num_seqs: int, max_prefill_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens

    def budget(self, sched: "Scheduler") -> StepBudget:
        return StepBudget(self.max_num_seqs + self.max_prefill_tokens, self.max_prefill_tokens,
                          self.max_num_seqs)

    def accepts(self, request) -> bool:
        return True

    # ---- KV hooks (scheduler, step-loop thread). Defaults keep plain behaviour: arrival
    # order, KV allocated chunk by chunk, nothing reserved. A policy given a `kv_planner`
    # (scheduling/kv_planner.py) delegates them to it; subclasses overriding `on_arrival`
    # or `on_finished` call super() so the planner sees every request.
    kv_planner = None

    def before_schedule(self, sched: "Scheduler") -> None:
        """Called first in every `Scheduler.schedule`; may evict or resize KV."""
        if self.kv_planner is not None:
            self.kv_planner.before_schedule(sched)

    def order_waiting(self, sched: "Scheduler", seqs: list) -> list:
        """Admission order of one waiting queue (given in arrival order)."""
        return seqs if self.kv_planner is None else self.kv_planner.order_waiting(sched, seqs)

    def admit(self, sched: "Scheduler", seq: "Sequence", end: int) -> Optional[bool]:
        """May waiting `seq` start now, running positions up to `end`? False stops
        admission from its queue for this iteration; None skips `seq` only (later requests
        of the queue may still start)."""
        return True if self.kv_planner is None else self.kv_planner.admit(sched, seq, end)

    def kv_tokens_for(self, sched: "Scheduler", seq: "Sequence", end: int) -> int:
        """Tokens of KV `seq` should hold when it runs positions up to `end` (>= end;
        anything beyond `end` is taken only from free blocks), or None to hold `seq` back
        this iteration (no KV may be taken for it)."""
        return end if self.kv_planner is None else self.kv_planner.kv_tokens_for(sched, seq, end)

    def kv_stats(self, sched: "Scheduler") -> dict:
        """EngineStats fields about KV planning (reservations, loans, predictor)."""
        if self.kv_planner is not None:
            return self.kv_planner.stats(sched)
        bs = sched.kv.block_size
        return {"kv_blocks_reserved_unused": sum(
            max(0, sched.kv.num_blocks(s.request_id) - -(-s.num_computed // bs))
            for s in sched.running)}

    def safepoints(self, step: "ScheduledStep", start_layer: int = 0) -> Optional[Safepoints]:
        """The safepoint checks for this iteration (a parked one resumes at `start_layer`),
        or None for none (run it whole)."""
        return None

    def on_arrival(self, seq: "Sequence") -> None:
        if self.kv_planner is not None:
            self.kv_planner.on_arrival(seq)

    def on_step_done(self, step: "ScheduledStep", elapsed_s: float) -> None: ...

    def latency_correction(self) -> float:
        """The latency model's online correction now (`LatencyModel.correction`; 1 for a
        policy without one): `EngineStats.latency_correction`."""
        return 1.0

    def on_abandoned(self, step: "ScheduledStep") -> None: ...

    def on_finished(self, seq: "Sequence") -> None:
        if self.kv_planner is not None:
            self.kv_planner.on_finished(seq)
