"""Policy registry: `--policy NAME` -> a `Policy` instance (see coserve_policies.py)."""
from conserve_jax.scheduling.coserve_policies import POLICY_NAMES, build as make_policy

__all__ = ["POLICY_NAMES", "make_policy"]
