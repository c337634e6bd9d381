"""Co-serving policies: `conserve` and the baselines it is compared with.

All run in the same engine so comparisons are fair:
- `online-only`: offline requests are refused.
- `priority-recompute`: online first; offline fills a fixed token budget; preemption only at
  iteration boundaries; evicted offline requests recompute from scratch (vLLM priority).
- `sarathi`: online first with a fixed, smaller token budget and chunked prefill;
  iteration-level preemption; recompute.
- `non-preemptive`: one arrival-ordered queue; offline work never yields (online requests
  wait for it): the upper bound of offline throughput.
- `conserve`: latency-aware token-level budget (the latency model keeps each iteration
  inside the tightest online TPOT), layer-wise preemption at safepoints, incremental KV
  checkpointing of offline requests.

Hooks run on the engine's step-loop thread, except `accepts` (caller's thread, pure) and
the safepoint callable (step-loop thread, between layer calls).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from conserve_jax.config import ConserveConfig
from conserve_jax.engine_api import RequestClass
from conserve_jax.scheduling.latency_model import LatencyModel, WorkShape
from conserve_jax.scheduling.policy import Policy, StepBudget

if TYPE_CHECKING:
    from conserve_jax.scheduling.scheduled_step import QueueView as Scheduler, ScheduledStep
    from conserve_jax.request import Sequence



class OnlineOnlyPolicy(Policy):
    name = "online-only"

    def accepts(self, request) -> bool:
        return request.request_class is RequestClass.ONLINE


class PriorityRecomputePolicy(Policy):
    name = "priority-recompute"


class SarathiPolicy(Policy):
    name = "sarathi"

    def __init__(self, max_num_seqs: int, max_prefill_tokens: int, token_budget: int) -> None:
        super().__init__(max_num_seqs, max_prefill_tokens)
        self.token_budget = token_budget

    def budget(self, sched: "Scheduler") -> StepBudget:
        return StepBudget(self.token_budget, min(self.max_prefill_tokens, self.token_budget),
                          self.max_num_seqs)


class NonPreemptivePolicy(Policy):
    name = "non-preemptive"
    priority = False  # one queue in arrival order; online never evicts offline


@dataclass
class TimeBudget(StepBudget):
    """A token budget plus, when online work is active, a predicted-time limit that
    offline work (and online prefill next to running online decodes) must fit in."""

    model: Optional[LatencyModel] = None
    limit_s: Optional[float] = None
    online_decoding: bool = False
    min_online_chunk: int = 32  # an online prompt always makes at least this much progress

    def _fits(self, w: WorkShape) -> bool:
        return self.limit_s is None or self.model.predict(w) <= self.limit_s

    def decodes_left(self, step, seq=None) -> int:
        left = super().decodes_left(step)
        if left <= 0 or seq is None or seq.online or self.limit_s is None:
            return left
        return left if self._fits(step.work.add_decode(seq.num_computed + 1)) else 0

    def prefill_tokens_for(self, step, seq) -> int:
        room = super().prefill_tokens_for(step, seq)
        if room <= 0 or self.limit_s is None or (seq.online and not self.online_decoding):
            return room
        floor = min(room, self.min_online_chunk) if seq.online else 0

        def ok(n: int) -> bool:
            end = seq.num_computed + n
            return self._fits(step.work.add_prefill(n, end, end == len(seq.token_ids)))

        lo, hi = 0, room  # largest n in [0, room] whose predicted step time fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return max(lo, floor)


@dataclass
class PreemptionLog:
    latencies_s: list = field(default_factory=list)  # online arrival -> runner stopped
    # the safepoint interval of each preempted iteration: its predicted time * k / layers
    intervals_s: list = field(default_factory=list)


class ConservePolicy(Policy):
    name = "conserve"
    checkpointing = True

    def __init__(self, max_num_seqs: int, max_prefill_tokens: int, model: LatencyModel,
                 default_ttft_s: float, default_tpot_s: float, knobs: ConserveConfig) -> None:
        super().__init__(max_num_seqs, max_prefill_tokens)
        self.model = model
        self.default_ttft_s = default_ttft_s
        self.default_tpot_s = default_tpot_s
        self.tpot_margin = knobs.tpot_margin
        self.min_online_chunk = knobs.min_online_chunk
        self.preemption_log = PreemptionLog()
        self.safepoint_every = 4  # set by the engine from EngineConfig.safepoint_interval

    def tpot(self, seq: "Sequence") -> float:
        return seq.request.slo.tpot_s or self.default_tpot_s

    def ttft(self, seq) -> float:
        return seq.request.slo.ttft_s or self.default_ttft_s

    def budget(self, sched: "Scheduler") -> StepBudget:
        base = super().budget(sched)
        online = [s for s in sched.running if s.online] + list(sched.waiting_online)
        if not online:
            return TimeBudget(base.max_tokens, base.max_prefill_tokens, base.max_decodes)
        limit = min(self.tpot(s) for s in online) * self.tpot_margin
        decoding = any(s.online and not s.in_prefill for s in sched.running)
        return TimeBudget(base.max_tokens, base.max_prefill_tokens, base.max_decodes,
                          self.model, limit, decoding, self.min_online_chunk)

    def on_step_done(self, step, elapsed_s, engine) -> None:
        self.model.observe(step.work, elapsed_s)

    def safepoint(self, step: "ScheduledStep", engine):
        """Offline-only iterations may be abandoned when an online request has arrived
        whose TTFT the rest of the iteration would break."""
        if step.has_online:
            return None
        total = self.model.predict(step.work)
        n_layers = self.model.num_layers

        decided: set[int] = set()

        def check(layers_done: int) -> bool:
            # An arrival is judged once, at the first safepoint after it: if finishing the
            # iteration keeps its TTFT then, it still does later (so preemption, when it
            # happens, comes within one safepoint interval of the arrival).
            arrival = engine.earliest_online_arrival()
            if arrival is None or id(arrival[0]) in decided:
                return False
            seq, t_arr = arrival
            decided.add(id(seq))
            now = time.monotonic()
            rest = total * (1 - layers_done / n_layers)
            own = self.model.predict(WorkShape().add_prefill(
                min(seq.num_pending, self.max_prefill_tokens), seq.num_pending, True))
            if (now - t_arr) + rest + own <= self.ttft(seq):
                return False
            self.preemption_log.latencies_s.append(time.monotonic() - t_arr)
            self.preemption_log.intervals_s.append(total * self.safepoint_every / n_layers)
            return True

        return check


def build(cfg, model_factory) -> Policy:
    """`model_factory()` returns the LatencyModel; called only for policies that need it."""
    name = cfg.policy
    if name == "fcfs":
        return Policy(cfg.max_num_seqs, cfg.max_prefill_tokens)
    if name == "online-only":
        return OnlineOnlyPolicy(cfg.max_num_seqs, cfg.max_prefill_tokens)
    if name == "priority-recompute":
        return PriorityRecomputePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens)
    if name == "sarathi":
        return SarathiPolicy(cfg.max_num_seqs, cfg.max_prefill_tokens, cfg.sarathi_token_budget)
    if name == "non-preemptive":
        return NonPreemptivePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens)
    if name == "conserve":
        model = model_factory()
        model.alpha, model.clamp = cfg.conserve.correction_alpha, cfg.conserve.correction_clamp
        p = ConservePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens, model,
                           cfg.default_ttft_s, cfg.default_tpot_s, cfg.conserve)
        p.safepoint_every = cfg.safepoint_interval
        return p
    raise ValueError(f"policy must be one of {POLICY_NAMES}, got {name!r}")


POLICY_NAMES = ["conserve", "online-only", "priority-recompute", "sarathi", "non-preemptive", "fcfs"]
