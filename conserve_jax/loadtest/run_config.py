"""Options of one load-test run (built by the CLI, read by the runner and the offline load)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from conserve_jax.loadtest.prompts import DEFAULT_TOKEN_RANGE


@dataclass
class RunConfig:
    """Run options (see module doc). SLOs are sent with each online request if
    `send_slo`; the report uses them for goodput either way."""

    duration_s: Optional[float] = None
    grace_s: float = 30.0
    max_concurrency: int = 64
    slo_ttft: Optional[float] = None
    slo_tpot: Optional[float] = None
    send_slo: bool = True
    seed: int = 0
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    offline_requests: int = 0
    offline_input_len: int = 128
    offline_output_len: int = 64
    offline_batches: int = 1
    poll_s: float = 1.0
    cancel_offline_at_end: bool = True
    collect_timeout_s: float = 30.0
    progress: bool = True
