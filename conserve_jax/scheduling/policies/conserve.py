"""`conserve`: latency-aware token-level budget, layer-wise preemption at safepoints,
incremental KV checkpointing of offline requests (ConServe).

With isolation F (`ConserveConfig.isolation`, see `time_budget.IsolationBudget`)
iterations with online work carry offline tokens only within F x their online work's
predicted time, and an online arrival during an offline-only iteration stops it at the next
safepoint (every `safepoint_interval` layers) unless the rest of the iteration is within
max((F - 1) x the arrival's predicted online-only TTFT, one layer). With isolation off the
budget fills to the TPOT objective and an arrival preempts only when the iteration would
break its TTFT objective. A preempted iteration is parked and continued from the layer
where it stopped as soon as no online work is left (`resume_abandoned`; off: it is
discarded and recomputed).

Offline deadlines (`ConserveConfig.deadline_policy`): the scheduler serves urgent offline
work (at-risk jobs' items) first; under "borrow" that work may also fill iterations with
online work up to `isolation_max` instead of F (and never past the objective limit); the
predicted seconds beyond F x the online work's time are summed in `borrowed_s`.

Iterations with online work never carry safepoints and are never abandoned: with isolation
F their offline part delays an arrival by at most (F - 1) x the online work's remaining
time, which is within (F - 1) x the arrival's own online-only TTFT (it would have waited
for that online work anyway).

Hooks run on the engine's step-loop thread, except `accepts` (caller's thread, pure) and
the safepoint check (step-loop thread, between layer calls).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from conserve_jax.config import ConserveConfig
from conserve_jax.scheduling.latency_model import LatencyModel, WorkShape
from conserve_jax.scheduling.policies.base import Policy, Safepoints, StepBudget
from conserve_jax.scheduling.policies.time_budget import IsolationBudget, TimeBudget

if TYPE_CHECKING:
    from conserve_jax.request import Sequence
    from conserve_jax.scheduling.scheduled_step import QueueView as Scheduler, ScheduledStep

# () -> the online requests submitted but not running yet (just submitted, or waiting)
ArrivalsFn = Callable[[], list]


@dataclass
class PreemptionLog:
    """One entry per abandoned iteration (step-loop thread appends; readers copy)."""

    latencies_s: list = field(default_factory=list)  # online arrival -> runner stopped
    layer_times_s: list = field(default_factory=list)  # measured time per layer, that iteration
    layers_done: list = field(default_factory=list)  # layers run before the stop


class ConservePolicy(Policy):
    name = "conserve"
    checkpointing = True

    def __init__(self, max_num_seqs: int, max_prefill_tokens: int, model: LatencyModel,
                 default_ttft_s: float, default_tpot_s: float,
                 online_waiting: ArrivalsFn, knobs: ConserveConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_num_seqs, max_prefill_tokens)
        self.model = model
        self.default_ttft_s = default_ttft_s
        self.default_tpot_s = default_tpot_s
        self.online_waiting = online_waiting
        self.isolation = knobs.isolation
        # at-risk offline work may use online iterations' budget up to this factor
        self.borrow_factor = knobs.isolation_max if knobs.deadline_policy == "borrow" else None
        self._budget: Optional[StepBudget] = None  # the last iteration's (borrowed time)
        self.has_safepoints = knobs.safepoint_interval is not None
        self.tpot_margin = knobs.tpot_margin
        self.min_online_chunk = knobs.min_online_chunk
        self.resumes_abandoned = knobs.resume_abandoned
        self.clock = clock  # same clock as Sequence.arrival
        self.preemption_log = PreemptionLog()
        self._not_placed: set = set()  # online requests the last plan left waiting

    def tpot(self, seq: "Sequence") -> float:
        return seq.request.slo.tpot_s or self.default_tpot_s

    def ttft(self, seq) -> float:
        return seq.request.slo.ttft_s or self.default_ttft_s

    def budget(self, sched: "Scheduler") -> StepBudget:
        base = super().budget(sched)
        self._budget = None
        self._not_placed = {id(s) for s in sched.waiting_online}
        online = [s for s in sched.running if s.online] + list(sched.waiting_online)
        if not online:
            return TimeBudget(base.max_tokens, base.max_prefill_tokens, base.max_decodes)
        objective = min(self.tpot(s) for s in online) * self.tpot_margin
        if self.isolation is not None:
            urgent = getattr(sched, "urgent", frozenset())
            self._budget = IsolationBudget(
                base.max_tokens, base.max_prefill_tokens, base.max_decodes, self.model,
                self.isolation, objective, urgent=urgent,
                borrow_factor=self.borrow_factor if urgent else None)
            return self._budget
        decoding = any(s.online and not s.in_prefill for s in sched.running)
        return TimeBudget(base.max_tokens, base.max_prefill_tokens, base.max_decodes,
                          self.model, objective, decoding, self.min_online_chunk)

    def on_step_done(self, step, elapsed_s) -> None:
        self.model.observe(step.work, elapsed_s)
        self.borrowed_s += self.borrowed_in(step)

    def latency_correction(self) -> float:
        return self.model.correction

    def borrowed_in(self, step) -> float:
        """Predicted seconds `step` (just planned with the last budget) takes beyond its
        isolation limit because urgent work borrowed (0 when nothing did)."""
        b = self._budget
        if not (isinstance(b, IsolationBudget) and b.borrow_factor is not None
                and b.online_s is not None and step.has_online):
            return 0.0
        if not any(b.borrows(e.seq) for e in step.entries if not e.seq.online):
            return 0.0
        return max(0.0, self.model.predict(step.work) - min(b.isolation * b.online_s,
                                                            b.objective_s))

    def online_ttft_s(self, seq: "Sequence") -> float:
        """Predicted TTFT of `seq` on an idle engine: its prompt's prefill, chunk by chunk."""
        left, done, total = seq.num_pending, seq.num_computed, 0.0
        while left > 0:
            n = min(left, self.max_prefill_tokens)
            done, left = done + n, left - n
            total += self.model.predict(WorkShape().add_prefill(n, done, left == 0))
        return total

    def safepoints(self, step: "ScheduledStep", start_layer: int = 0) -> Optional[Safepoints]:
        """Offline-only iterations stop for a newly arrived online request (see module doc).
        Online requests this iteration's plan left waiting (no room) do not stop it (a
        resumed iteration was not planned now: every waiting one counts). `check` may also
        be called before the first layer (`layers_done == start_layer`, e.g. after host
        restores), weighing the predicted layer time. `safepoint_interval` None: none at all
        (in-process batch use, where nothing arrives while an iteration runs)."""
        if step.has_online or step.empty or not self.has_safepoints:
            return None
        n_layers = self.model.num_layers
        t_start = self.clock()
        not_placed = self._not_placed if start_layer == 0 else set()
        judged: set = set()

        def check(layers_done: int) -> bool:
            new = [s for s in self.online_waiting()
                   if id(s) not in not_placed and id(s) not in judged]
            if not new:
                return False
            now = self.clock()
            if layers_done > start_layer:
                layer_s = (now - t_start) / (layers_done - start_layer)  # measured in this call
            else:  # before the first layer (arrived while it was planned or restored)
                layer_s = self.model.predict(step.work) / n_layers
            rest = layer_s * (n_layers - layers_done)
            for seq in sorted(new, key=lambda s: s.arrival):
                waited, own = now - seq.arrival, self.online_ttft_s(seq)
                keeps_ttft = waited + rest + own <= self.ttft(seq)
                if self.isolation is None:
                    judged.add(id(seq))  # judged once, at the first safepoint after it
                    if keeps_ttft:
                        continue
                elif keeps_ttft and waited + rest <= max((self.isolation - 1) * own, layer_s):
                    continue
                log = self.preemption_log
                log.latencies_s.append(self.clock() - seq.arrival)
                log.layer_times_s.append(layer_s)
                log.layers_done.append(layers_done)
                return True
            return False

        return Safepoints(check)
