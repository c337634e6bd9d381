"""The policy registry: `--policy NAME` -> a `Policy` instance.

`build` is called once by the engine's constructor. A policy never sees the engine: `build`
hands it the functions it needs (the latency model's factory, the online arrivals).
"""
from __future__ import annotations

from typing import Callable, Optional

from conserve_jax.scheduling.latency_model import LatencyModel
from conserve_jax.scheduling.policies.base import Policy
from conserve_jax.scheduling.policies.baselines import (NonPreemptivePolicy, OnlineOnlyPolicy,
                                                        SarathiPolicy)
from conserve_jax.scheduling.policies.conserve import ArrivalsFn, ConservePolicy
from conserve_jax.scheduling.policies.ecoserve import EcoservePolicy, offline_planner


def build(cfg, model_factory: Callable[[], LatencyModel],
          online_waiting: Optional[ArrivalsFn] = None) -> Policy:
    """The policy `cfg.policy` names. `model_factory()` returns the LatencyModel (called only
    for policies that need it); `online_waiting()` lists the online requests submitted but
    not running yet (the engine's; needed by `conserve`'s safepoints)."""
    name = cfg.policy
    if name in ("fcfs", "priority-recompute"):  # one policy; the baselines' name for it
        p = Policy(cfg.max_num_seqs, cfg.max_prefill_tokens)
        p.name = name
        return p
    if name == "online-only":
        return OnlineOnlyPolicy(cfg.max_num_seqs, cfg.max_prefill_tokens)
    if name == "sarathi":
        return SarathiPolicy(cfg.max_num_seqs, cfg.max_prefill_tokens, cfg.sarathi_token_budget)
    if name == "non-preemptive":
        return NonPreemptivePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens)
    if name == "conserve":
        if online_waiting is None:
            raise ValueError("policy conserve needs online_waiting")
        model = model_factory()
        model.alpha, model.clamp = cfg.conserve.correction_alpha, cfg.conserve.correction_clamp
        p = ConservePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens, model,
                           cfg.default_ttft_s, cfg.default_tpot_s, online_waiting, cfg.conserve)
        if cfg.conserve.offline_kv_reservation:
            p.kv_planner = offline_planner(cfg)
        return p
    if name == "ecoserve":
        return EcoservePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens, cfg.max_model_len,
                              cfg.default_ttft_s)
    raise ValueError(f"policy must be one of {POLICY_NAMES}, got {name!r}")


POLICY_NAMES = ["conserve", "online-only", "priority-recompute", "sarathi", "non-preemptive", "fcfs",
                "ecoserve"]

_CLASSES = {"conserve": ConservePolicy, "online-only": OnlineOnlyPolicy,
            "priority-recompute": Policy, "fcfs": Policy, "sarathi": SarathiPolicy,
            "non-preemptive": NonPreemptivePolicy, "ecoserve": EcoservePolicy}


def uses_checkpointing(name: str) -> bool:
    """Whether the policy `name` keeps offline KV on host (so the engine compiles the KV
    transfer executables); False for an unknown name (`build` reports it)."""
    cls = _CLASSES.get(name)
    return bool(cls and cls.checkpointing)
