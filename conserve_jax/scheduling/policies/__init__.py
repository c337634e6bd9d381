"""Scheduling policies: `base` (the `Policy` contract and plain FCFS continuous batching),
`conserve` (with its `time_budget`), `baselines` (online-only, priority-recompute, sarathi,
non-preemptive), `ecoserve` (with its `kv_planner`), and `registry` (`--policy NAME` ->
a policy)."""
from conserve_jax.scheduling.policies.registry import (POLICY_NAMES, build as make_policy,
                                                      uses_checkpointing)

__all__ = ["POLICY_NAMES", "make_policy", "uses_checkpointing"]
