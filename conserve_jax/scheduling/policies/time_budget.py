"""Time budgets of the `conserve` policy: how many tokens an iteration may take when its
predicted time (the latency model) is limited. Built by `ConservePolicy.budget` once per
iteration and asked by the scheduler (step-loop thread) entry by entry; pure host code.

- `TimeBudget` (isolation off, "fill to the objective"): offline work, and online prefill
  next to running online decodes, fill the iteration up to a fixed predicted-time limit
  (a fraction of the tightest online TPOT objective).
- `IsolationBudget` (isolation F): online work is planned exactly as with no offline work
  at all (the token budget only); offline work joins an iteration with online work only
  while the iteration's predicted time stays within F x the predicted time of its online
  work alone, and within the objective limit, whichever is tighter. With `borrow_factor`
  (deadline_policy "borrow"), `urgent` offline sequences (at-risk jobs' items) may fill it
  up to that larger factor instead (still within the objective limit).
With no online work at all the policy hands out a plain token budget (offline batches grow
to the throughput limit).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Collection, Optional

from conserve_jax.request import SeqStatus
from conserve_jax.scheduling.latency_model import LatencyModel, WorkShape
from conserve_jax.scheduling.policies.base import StepBudget

def largest_fitting(room: int, fits) -> int:
    """The largest n in [0, room] with fits(n) (fits is monotone: true, then false)."""
    lo, hi = 0, room
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def chunk_work(step, seq, n: int) -> WorkShape:
    end = seq.num_computed + n
    return step.work.add_prefill(n, end, end == len(seq.token_ids))


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
        return max(largest_fitting(room, lambda n: self._fits(chunk_work(step, seq, n))), floor)


@dataclass
class IsolationBudget(StepBudget):
    """Isolation F: offline tokens ride along online work only inside F x its predicted time.

    The scheduler plans all online work of an iteration before any offline work (priority
    policies), so the work shape seen at the first offline question is the online work
    alone; its predicted time fixes the limit for the rest of the iteration. An offline
    request that would have to be restored from its host checkpoint is not started next to
    online work (the restore's copy time is not in the prediction)."""

    model: Optional[LatencyModel] = None
    isolation: Optional[float] = None  # F, always given (ConserveConfig.isolation)
    objective_s: float = float("inf")
    online_s: Optional[float] = None  # predicted time of the online work alone, once known
    urgent: Collection[str] = frozenset()  # request ids that may borrow (at-risk jobs' items)
    borrow_factor: Optional[float] = None  # their factor (isolation_max); None: no borrowing
    # (work so far, tokens already computed) where not even one more prefill token fits:
    # the many waiting offline requests then cost one prediction, not a search each
    _full: set = field(default_factory=set)

    def limit_s(self, step, seq=None) -> float:
        """The predicted-time limit for offline `seq` joining `step` (None: the usual one)."""
        if self.online_s is None:
            assert all(e.seq.online for e in step.entries), "online work is planned first"
            self.online_s = self.model.predict(step.work) if step.entries else 0.0
        f = self.isolation
        if self.borrows(seq):
            f = max(f, self.borrow_factor)
        return min(f * self.online_s, self.objective_s)

    def borrows(self, seq) -> bool:
        return (self.borrow_factor is not None and seq is not None
                and seq.request_id in self.urgent)

    def _fits(self, step, w: WorkShape, seq=None) -> bool:
        return self.model.predict(w) <= self.limit_s(step, seq)

    def decodes_left(self, step, seq=None) -> int:
        left = super().decodes_left(step)
        if left <= 0 or seq is None or seq.online:
            return left
        return left if self._fits(step, step.work.add_decode(seq.num_computed + 1), seq) else 0

    def prefill_tokens_for(self, step, seq) -> int:
        room = super().prefill_tokens_for(step, seq)
        if room <= 0 or seq.online:
            return room
        if seq.status is SeqStatus.WAITING and seq.num_computed > seq.prefix_hit_tokens:
            return 0  # would be restored from its host checkpoint: only without online work
        key = (dataclasses.astuple(step.work), seq.num_computed, self.borrows(seq))
        if key in self._full:
            return 0
        fits = lambda n: self._fits(step, chunk_work(step, seq, n), seq)  # noqa: E731
        if not fits(1):
            self._full.add(key)
            return 0
        return largest_fitting(room, fits)
