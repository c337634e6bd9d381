"""The baselines `conserve` is compared with, all in the same engine so comparisons are fair:

- `online-only`: offline requests are refused.
- `priority-recompute` (= the base `Policy`, "fcfs", under the baseline's name): online
  first; offline fills a fixed token budget; preemption only at iteration boundaries;
  evicted offline requests recompute from scratch (vLLM priority).
- `sarathi`: online first with a fixed, smaller token budget and chunked prefill;
  iteration-level preemption; recompute.
- `non-preemptive`: one arrival-ordered queue; offline work never yields (online requests
  wait for it).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from conserve_jax.engine_api import RequestClass
from conserve_jax.scheduling.policies.base import Policy, StepBudget

if TYPE_CHECKING:
    from conserve_jax.scheduling.scheduled_step import QueueView as Scheduler


class OnlineOnlyPolicy(Policy):
    name = "online-only"

    def accepts(self, request) -> bool:
        return request.request_class is RequestClass.ONLINE


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
