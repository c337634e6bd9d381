"""Deadline arithmetic for offline jobs: estimated finish, slack, at-risk, admission.

Inputs are plain numbers: each job's remaining work in work units (`harvest.WorkCost`:
prefill tokens left plus expected output tokens, weighted) and its deadline (unix
seconds, None for none), the harvest rate (`harvest.HarvestMeter.rate()`: work units per
wall second that the online load leaves to offline work) and the time now. Nothing here
reads a clock or a store, so tests drive it with made-up numbers.

Model: offline work is served earliest deadline first (jobs without a deadline last, ties
in the order given), at the harvest rate. A job's estimated finish is therefore now plus
the work of every job ordered before it, plus its own, divided by the rate; its slack is
its deadline minus that finish (negative: predicted to miss). This is the work "already
promised to earlier deadlines" the issue speaks of.

At risk: a job whose slack is below `at_risk_margin` times the time it still needs
(`(finish - now) * margin`; margin 0.2: less than 20 % headroom), or negative. Scale-free,
so a 60 s window and a 24 h window are judged alike.

No harvest history (rate None): nothing can be estimated. The contract callers rely on:
every estimate is None, nothing is at risk, and `admit` accepts (reason "no harvest
history"): a fresh server takes work and learns its rate from it rather than refusing on
a guess. A rate of 0 (backlogged but nothing harvested: the online load takes every
iteration) makes every deadline job at risk and infeasible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class JobWork:
    """One offline job as the estimator sees it."""

    job_id: str
    deadline: Optional[float]  # unix seconds; None: no deadline
    remaining: float  # work units left (>= 0)


@dataclass(frozen=True)
class Estimate:
    job_id: str
    finish_at: Optional[float]  # None: unknown (no rate) or never (rate 0)
    slack_s: Optional[float]  # deadline - finish_at; None without deadline or estimate
    at_risk: bool


@dataclass(frozen=True)
class Verdict:
    feasible: bool
    finish_at: Optional[float]  # the new job's estimated finish (None: unknown)
    reason: str  # why: "fits", "no harvest history", "no deadline", "misses by N s"


def edf_order(jobs: Iterable[JobWork]) -> list[JobWork]:
    """Earliest deadline first; no deadline last; stable."""
    return sorted(jobs, key=lambda j: (j.deadline is None, j.deadline or 0.0))


def _finish(now: float, work: float, rate: float) -> float:
    if work <= 0:
        return now
    return now + work / rate if rate > 0 else math.inf


def estimate(jobs: Iterable[JobWork], rate: Optional[float], now: float,
             at_risk_margin: float = 0.2) -> dict[str, Estimate]:
    """Per job: estimated finish, slack and at-risk flag (module docstring)."""
    out: dict[str, Estimate] = {}
    ahead = 0.0
    for j in edf_order(jobs):
        ahead += max(0.0, j.remaining)
        if rate is None:
            out[j.job_id] = Estimate(j.job_id, None, None, False)
            continue
        fin = _finish(now, ahead, rate)
        if j.deadline is None:
            out[j.job_id] = Estimate(j.job_id, None if math.isinf(fin) else fin, None, False)
            continue
        slack = j.deadline - fin
        need = fin - now
        at_risk = j.remaining > 0 and (slack < 0 or slack < at_risk_margin * need)
        out[j.job_id] = Estimate(j.job_id, None if math.isinf(fin) else fin,
                                 None if math.isinf(slack) else slack, at_risk)
    return out


def admit(jobs: Iterable[JobWork], new: JobWork, rate: Optional[float],
          now: float) -> Verdict:
    """Can `new` finish by its deadline behind the work promised to deadlines at or before
    its own, at `rate`? (Jobs with later deadlines go after it and do not count.)"""
    if rate is None:
        return Verdict(True, None, "no harvest history")
    ahead = [j for j in jobs if j.deadline is not None and new.deadline is not None
             and j.deadline <= new.deadline]
    work = sum(max(0.0, j.remaining) for j in ahead) + max(0.0, new.remaining)
    if new.deadline is None:
        later = sum(max(0.0, j.remaining) for j in jobs)  # everything else goes first
        fin = _finish(now, later + max(0.0, new.remaining), rate)
        return Verdict(True, None if math.isinf(fin) else fin, "no deadline")
    fin = _finish(now, work, rate)
    if fin <= new.deadline:
        return Verdict(True, fin, "fits")
    miss = "forever (nothing harvested)" if math.isinf(fin) else f"by {fin - new.deadline:.0f} s"
    return Verdict(False, None if math.isinf(fin) else fin, f"misses {miss}")
