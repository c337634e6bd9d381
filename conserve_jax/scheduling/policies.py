"""Policy registry: `--policy NAME` -> a `Policy` instance."""
from __future__ import annotations

from conserve_jax.config import EngineConfig
from conserve_jax.scheduling.policy import FcfsPolicy, Policy

POLICIES = {"fcfs": FcfsPolicy}


def make_policy(cfg: EngineConfig) -> Policy:
    try:
        cls = POLICIES[cfg.policy]
    except KeyError:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {cfg.policy!r}") from None
    return cls(cfg.max_num_seqs, cfg.max_prefill_tokens)
