"""Synthetic workloads: a gamma arrival process and random lengths, as vLLM's
`benchmark_serving.py` makes them.

Inter-arrival gaps are Gamma(shape=burstiness, scale=1 / (rate * burstiness)): the mean gap
is 1 / rate whatever the burstiness, and the coefficient of variation is
1 / sqrt(burstiness). Burstiness 1 is a Poisson process; below 1 arrivals are burstier,
above 1 more regular. An infinite rate sends every request at time 0.

Lengths follow vLLM's random dataset: with range ratio r in [0, 1), a length L is drawn
uniformly from the integers in [L * (1 - r), L * (1 + r)] (at least 1); r = 0 gives L.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from conserve_jax.loadtest.trace import RequestSpec, clamp_to_context


def gamma_intervals(rate: float, burstiness: float, n: int,
                    rng: np.random.Generator) -> np.ndarray:
    """`n` inter-arrival gaps in seconds for `rate` requests/s (> 0, may be inf)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def gamma_arrivals(rate: float, burstiness: float, *, num_requests: Optional[int] = None,
                   duration_s: Optional[float] = None,
                   rng: np.random.Generator) -> np.ndarray:
    """Arrival times (seconds, increasing, first one at its first gap after 0).

    Stops at `num_requests` arrivals, or at the last arrival before `duration_s`, whichever
    comes first; at least one of the two must be given (and `num_requests` with an
    infinite rate). The first arrival is at time 0 as in vLLM (no initial wait).
    """
    if num_requests is None and (duration_s is None or math.isinf(rate)):
        raise ValueError("a synthetic workload needs a number of requests, "
                         "or a duration with a finite rate")
    times: list[float] = []
    t = 0.0
    while num_requests is None or len(times) < num_requests:
        chunk = gamma_intervals(rate, burstiness, 1024, rng)
        for gap in chunk:
            if duration_s is not None and t >= duration_s:
                return np.asarray(times)
            times.append(t)
            if num_requests is not None and len(times) >= num_requests:
                break
            t += float(gap)
    return np.asarray(times)


def sample_lengths(mean_len: int, range_ratio: float, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """`n` integer lengths uniform in [mean_len*(1-r), mean_len*(1+r)], each >= 1."""
    if mean_len < 1:
        raise ValueError(f"length must be >= 1, got {mean_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    lo = max(1, int(math.floor(mean_len * (1.0 - range_ratio))))
    hi = max(lo, int(math.ceil(mean_len * (1.0 + range_ratio))))
    return rng.integers(lo, hi + 1, size=n)


def synthetic_workload(*, rate: float, burstiness: float = 1.0, input_len: int,
                       output_len: int, range_ratio: float = 0.0,
                       num_requests: Optional[int] = None,
                       duration_s: Optional[float] = None,
                       max_context: Optional[int] = None, seed: int = 0) -> list[RequestSpec]:
    """A list of `RequestSpec` from the gamma process and sampled lengths, deterministic in
    `seed`, each request clamped to `max_context` (see `trace.clamp_to_context`)."""
    rng = np.random.default_rng(seed)
    times = gamma_arrivals(rate, burstiness, num_requests=num_requests,
                           duration_s=duration_s, rng=rng)
    ins = sample_lengths(input_len, range_ratio, len(times), rng)
    outs = sample_lengths(output_len, range_ratio, len(times), rng)
    specs = []
    for t, n_in, n_out in zip(times, ins, outs):
        n_in, n_out = int(n_in), int(n_out)
        if max_context is not None:
            n_in, n_out = clamp_to_context(n_in, n_out, max_context)
        specs.append(RequestSpec(float(t), n_in, n_out))
    return specs
