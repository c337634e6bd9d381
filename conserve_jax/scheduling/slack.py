"""Deadline arithmetic for offline jobs: estimated finish, slack, at-risk, admission.

Inputs are plain numbers: each job's remaining work in work units (`harvest.WorkCost`:
prefill tokens left plus expected output tokens, weighted) and its deadline (unix
seconds, None for none), the harvest rate (`harvest.HarvestMeter.rate()`: work units per
wall second that the online load leaves to offline work) and the time now. Nothing here
reads a clock or a store, so tests drive it with made-up numbers.

Model: the order the engine actually serves offline work, at the harvest rate.
1. Urgent jobs (at risk, flagged by the caller: their items go first among offline work,
   running or waiting) are served earliest deadline first (EDF).
2. Then the other jobs' items already inside the engine (`JobWork.in_engine`: claimed and
   submitted; the engine runs work it holds before work it has not been given), together.
3. Then the rest of the other jobs' items, as they will be claimed: EDF (jobs without a
   deadline last, ties in the order given).
A job's estimated finish is now plus the work served before its last piece, divided by the
rate; its slack is its deadline minus that finish (negative: predicted to miss). With no
work inside the engine and nothing urgent, this is plain EDF: the work "already promised to
earlier deadlines" the issue speaks of.

At risk: a job that would miss, or nearly, *without* priority: its finish computed as if it
were not urgent (the other urgent jobs keep theirs) leaves a slack below `at_risk_margin`
times the time it would still need (`(finish - now) * margin`; margin 0.2: less than 20 %
headroom), or negative. Scale-free, so a 60 s window and a 24 h window are judged alike.
Judging without the job's own priority keeps the flag from flapping: priority makes the job
look safe, and dropping the flag because of that would take the priority away again. So a
job behind a long queue of other jobs' items in the engine (a loose job submitted first) is
at risk as soon as that queue would make it miss, though plain EDF says it fits.

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
    in_engine: float = 0.0  # of `remaining`, work units of items inside the engine
    urgent: bool = False  # served first among offline work now (at risk at the last look)

    @property
    def unclaimed(self) -> float:
        return max(0.0, self.remaining - max(0.0, self.in_engine))


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


def _served_before(job: JobWork, jobs: list[JobWork], urgent: set) -> float:
    """Work units served before `job`'s last piece, in the served order (module doc) with
    the jobs in `urgent` (ids) first."""
    pri = edf_order([j for j in jobs if j.job_id in urgent])
    if job.job_id in urgent:
        ahead = 0.0
        for j in pri:
            ahead += max(0.0, j.remaining)
            if j.job_id == job.job_id:
                return ahead
    calm = [j for j in jobs if j.job_id not in urgent]
    ahead = sum(max(0.0, j.remaining) for j in pri)
    ahead += sum(min(max(0.0, j.in_engine), max(0.0, j.remaining)) for j in calm)
    if job.unclaimed <= 0:
        return ahead
    for j in edf_order(calm):
        ahead += j.unclaimed
        if j.job_id == job.job_id:
            break
    return ahead


def estimate(jobs: Iterable[JobWork], rate: Optional[float], now: float,
             at_risk_margin: float = 0.2) -> dict[str, Estimate]:
    """Per job: estimated finish and slack in the served order, and the at-risk flag
    (judged without the job's own priority; module docstring)."""
    jobs = list(jobs)
    urgent = {j.job_id for j in jobs if j.urgent}
    out: dict[str, Estimate] = {}
    for j in jobs:
        if rate is None:
            out[j.job_id] = Estimate(j.job_id, None, None, False)
            continue
        fin = _finish(now, _served_before(j, jobs, urgent), rate)
        if j.deadline is None:
            out[j.job_id] = Estimate(j.job_id, None if math.isinf(fin) else fin, None, False)
            continue
        slack = j.deadline - fin
        alone = fin if not j.urgent else _finish(
            now, _served_before(j, jobs, urgent - {j.job_id}), rate)
        slack_alone, need = j.deadline - alone, alone - now
        at_risk = j.remaining > 0 and (slack_alone < 0 or slack_alone < at_risk_margin * need)
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
