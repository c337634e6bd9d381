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
rate, plus its tail (`JobWork.tail_s`: how long its slowest remaining item still generates,
at the pace offline items generate at; the caller measures it), where the output its own
items generate beside the slowest one during the tail (`JobWork.tail_overlap`) is not
counted before it as well (but all its work at the rate bounds it); its slack is its deadline
minus that finish (negative: predicted to miss). With no work inside the engine and nothing
urgent, this is plain EDF: the work "already promised to earlier deadlines" the issue
speaks of.

An urgent job is served in a burst: the engine holds every other prompt back while its
items generate, so the urgent jobs go one after another, each its prompts (at the prompt
rate, `harvest.HarvestMeter.prompt_rate`: units a second while prompts go in) then its
tail (`urgent_bursts`). Its finish is the later of that and the work served before it at
the harvest rate. The harvest rate is the mean over prompts going in (fast) and items only
generating (slow: KV memory holds only so many items), the throughput of a long stream of
items, which bounds a big urgent job; a few items are done sooner than their work at that
rate plus their tail says (bench_deadlines, together: the medium job, 14.2 units behind
and its own at 0.6 a second, 23.7 s plus a 5 s tail, took 23.9 s).

At risk: a job that would miss, or nearly, *without* priority: its finish computed as if it
were not urgent (the other urgent jobs keep theirs; its tail the one it would have then,
`JobWork.tail_alone_s`, as an urgent job generates faster) leaves a slack below `at_risk_margin`
times the time it would still need (`(finish - now) * margin`; margin 0.2: less than 20 %
headroom), or negative. Scale-free, so a 60 s window and a 24 h window are judged alike.
Judging without the job's own priority keeps the flag from flapping: priority makes the job
look safe, and dropping the flag because of that would take the priority away again. So a
job behind a long queue of other jobs' items in the engine (a loose job submitted first) is
at risk as soon as that queue would make it miss, though plain EDF says it fits.

Hopeless: a job that misses its deadline even when served before everything else (at the
most borrowing can give, under deadline_policy borrow): its own remaining work at `gain` x
the rate, or its tail at `gain` x the pace its own items have shown (`JobWork.tail_seen_s`),
whichever ends later, or its burst (its prompts at the prompt rate, then its tail at the
pace the job gets with priority, `JobWork.tail_min_s`) if that ends sooner: the optimistic side throughout, since work and tail
overlap in time, the harvest rate is a mean over phases in which only items generate, and
a pace measured in a busy moment must not drop a job that can still make it
(bench_deadlines: a noisy median pace made a feasible job look lost; staggered, the
medium job with 3 of its 4 items left, 34 s before its deadline, was judged hopeless on
its work at a harvest rate of 0.47 and expired, its burst some 21 s). The caller's
remaining work and tail count the progress of items under way (tokens already generated,
prompts already in), so a job well under way does not look lost. Giving a hopeless job priority would only make the jobs behind it miss too
(EDF's domino effect under overload), so the caller does not (`isolate`: a job that cannot
make it expires).

No harvest history (rate None): nothing can be estimated. The contract callers rely on:
every estimate is None, nothing is at risk, and `admit` accepts (reason "no harvest
history"): a fresh server takes work and learns its rate from it rather than refusing on
a guess. A rate of 0 (backlogged but nothing harvested: the online load takes every
iteration) makes every deadline job at risk and infeasible.
"""
from __future__ import annotations

import bisect
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
    # seconds its slowest remaining item still generates for once the work is served
    # (expected output tokens it has left x the time per output token)
    tail_s: float = 0.0
    # the same at the pace the job gets with priority (the caller's measure, on the
    # optimistic side): its burst's tail when `hopeless` is judged; None: tail_s
    tail_min_s: Optional[float] = None
    # the same at the pace the job's own items have shown (0: none shown yet): the tail
    # `hopeless` weighs against its work at the harvest rate; None: tail_min_s
    tail_seen_s: Optional[float] = None
    # the tail it would have without priority, where `tail_s` is with it (an urgent job
    # generates faster: no other job's prompts go in beside it): what `at_risk` is judged
    # with, as it is judged without the job's own priority; None: tail_s
    tail_alone_s: Optional[float] = None
    # of `remaining`, the work units of prompts still to go in (an urgent job's burst)
    prompt_left: float = 0.0
    # of `remaining`, the work units of its own output generated during its tail, beside
    # its slowest item (its items the engine runs at once): its estimated finish counts
    # them once (`_job_finish`); at risk and hopeless leave them in (the cautious side)
    tail_overlap: float = 0.0

    @property
    def unclaimed(self) -> float:
        return max(0.0, self.remaining - max(0.0, self.in_engine))


@dataclass(frozen=True)
class Estimate:
    job_id: str
    finish_at: Optional[float]  # None: unknown (no rate) or never (rate 0)
    slack_s: Optional[float]  # deadline - finish_at; None without deadline or estimate
    at_risk: bool
    hopeless: bool = False  # misses even when served before everything else (at `gain`)


@dataclass(frozen=True)
class Verdict:
    feasible: bool
    finish_at: Optional[float]  # the new job's estimated finish (None: unknown)
    reason: str  # why: "fits", "no harvest history", "no deadline", "misses by N s"


def _edf_key(j: JobWork) -> tuple[bool, float]:
    return (j.deadline is None, j.deadline or 0.0)


def edf_order(jobs: Iterable[JobWork]) -> list[JobWork]:
    """Earliest deadline first; no deadline last; stable."""
    return sorted(jobs, key=_edf_key)


def _finish(now: float, work: float, rate: float) -> float:
    if work <= 0:
        return now
    return now + work / rate if rate > 0 else math.inf


def _inside(j: JobWork) -> float:
    return min(max(0.0, j.in_engine), max(0.0, j.remaining))


class _ServedOrder:
    """Work served before each job's last piece (module doc), in O(n log n) for n jobs:
    prefix sums over the urgent jobs' EDF order and over the other jobs' unclaimed work in
    EDF order (the deadline estimates run on the runner's thread every deadline check,
    with every active batch)."""

    def __init__(self, jobs: list[JobWork]) -> None:
        pri = edf_order([j for j in jobs if j.urgent])
        calm = edf_order([j for j in jobs if not j.urgent])
        self.urgent_total = sum(max(0.0, j.remaining) for j in pri)
        self.inside_total = sum(_inside(j) for j in calm)  # calm jobs' work in the engine
        self.urgent_upto: dict[str, float] = {}
        acc = 0.0
        for j in pri:
            acc += max(0.0, j.remaining)
            self.urgent_upto[j.job_id] = acc
        self.calm_keys = [_edf_key(j) for j in calm]
        self.calm_cum = [0.0]  # unclaimed work of calm[:k]
        self.calm_upto: dict[str, float] = {}
        for j in calm:
            self.calm_cum.append(self.calm_cum[-1] + j.unclaimed)
            self.calm_upto[j.job_id] = self.calm_cum[-1]

    def before(self, j: JobWork) -> float:
        """With the priorities as they are (a job with nothing left: 0)."""
        if j.remaining <= 0:
            return 0.0
        if j.urgent:
            return self.urgent_upto[j.job_id]
        ahead = self.urgent_total + self.inside_total
        return ahead + self.calm_upto[j.job_id] if j.unclaimed > 0 else ahead

    def before_without_priority(self, j: JobWork) -> float:
        """As if `j` were not urgent (the other urgent jobs keep their priority): it goes
        behind every other job's work in the engine, and its unclaimed work joins the EDF
        queue after the calm jobs due no later than it."""
        if not j.urgent or j.remaining <= 0:
            return self.before(j)
        ahead = self.urgent_total - max(0.0, j.remaining) + self.inside_total + _inside(j)
        if j.unclaimed <= 0:
            return ahead
        k = bisect.bisect_right(self.calm_keys, _edf_key(j))
        return ahead + self.calm_cum[k] + j.unclaimed


def _job_finish(now: float, j: JobWork, work: float, rate: float, gain: float = 1.0,
                tail_s: Optional[float] = None, overlap: float = 0.0) -> float:
    """When `j` is done if `work` units (its own included) are served before its last
    piece: the work at `rate`, then its last item's generation tail (`tail_s`, default
    `j.tail_s`; both `gain` x faster). `overlap`: of that work, units generated during the
    tail (`JobWork.tail_overlap`): the later of all the work at the rate and the rest of it
    then the tail (bench_deadlines, full runs: a job of 6 items submitted alone read
    +12 to +34 % in eight runs with its items' output counted before its tail as well)."""
    if j.remaining <= 0:
        return now
    t = (j.tail_s if tail_s is None else tail_s) / gain
    if overlap <= 0:
        return _finish(now, work, rate * gain) + t
    return max(_finish(now, work, rate * gain),
               _finish(now, work - min(overlap, work), rate * gain) + t)


def _burst_finish(now: float, work: float, rate: float, burst_s: float,
                  gain: float = 1.0) -> float:
    """An urgent job's finish: the later of the work served before its last piece at
    `rate` and its burst, `burst_s` seconds from now (`urgent_bursts`), both `gain` x
    faster (module doc)."""
    return max(_finish(now, work, rate * gain), now + burst_s / gain)


def _served_first(now: float, j: JobWork, rate: float, prompt_rate: Optional[float],
                  gain: float) -> float:
    """When `j` is done at the soonest if served before everything else, at `gain` x the
    rates, on the optimistic side (`hopeless`, module doc): the later of its work at the
    harvest rate and its tail at the pace its own items have shown (`tail_seen_s`; they
    overlap in time), or, sooner if it is, its burst: its prompts at the prompt rate, then
    its tail at the pace priority gives (`tail_min_s`; the harvest rate averages over
    phases in which only items generate, so it understates how fast a few items served
    first go)."""
    tail = j.tail_s if j.tail_min_s is None else j.tail_min_s
    seen = tail if j.tail_seen_s is None else j.tail_seen_s
    fin = max(_finish(now, j.remaining, rate * gain), now + seen / gain)
    if prompt_rate and tail > 0:  # no pace at all: nothing says how long it generates
        fin = min(fin, now + (max(0.0, j.prompt_left) / prompt_rate + tail) / gain)
    return fin


def is_at_risk(deadline: float, finish: float, now: float, margin: float) -> bool:
    """The at-risk rule (module doc): finishing at `finish` leaves a slack below `margin`
    times the time still needed, or a negative one."""
    slack, need = deadline - finish, finish - now
    return slack < 0 or slack < margin * need


def urgent_bursts(jobs: Iterable[JobWork], prompt_rate: float) -> dict[str, float]:
    """Seconds from now until each urgent job is done when the urgent jobs are served one
    after another, earliest deadline first: each one's prompts still to go in at
    `prompt_rate`, then its tail (module doc)."""
    out: dict[str, float] = {}
    acc = 0.0
    for j in edf_order([j for j in jobs if j.urgent]):
        if j.remaining > 0:
            acc += max(0.0, j.prompt_left) / prompt_rate + j.tail_s
        out[j.job_id] = acc
    return out


def estimate(jobs: Iterable[JobWork], rate: Optional[float], now: float,
             at_risk_margin: float = 0.2, gain: float = 1.0,
             prompt_rate: Optional[float] = None) -> dict[str, Estimate]:
    """Per job: estimated finish and slack in the served order (an urgent job's: the later
    of the work served before it at `rate` and its burst at `prompt_rate`; module doc), the
    at-risk flag (judged without the job's own priority) and whether it is hopeless: past
    its deadline even if served before everything else at `gain` x the rate (borrowing's
    most; 1 under isolate; the later of its work and its tail), so priority would only make
    other jobs miss too."""
    jobs = list(jobs)
    if rate is None:
        return {j.job_id: Estimate(j.job_id, None, None, False) for j in jobs}
    order = _ServedOrder(jobs)
    bursts = urgent_bursts(jobs, prompt_rate) if prompt_rate else {}
    out: dict[str, Estimate] = {}
    for j in jobs:
        if j.job_id in bursts and j.remaining > 0:
            fin = _burst_finish(now, order.before(j), rate, bursts[j.job_id])
        else:
            fin = _job_finish(now, j, order.before(j), rate, overlap=j.tail_overlap)
        if j.deadline is None:
            out[j.job_id] = Estimate(j.job_id, None if math.isinf(fin) else fin, None, False)
            continue
        slack = j.deadline - fin
        alone = _job_finish(now, j, order.before_without_priority(j), rate,
                            tail_s=j.tail_alone_s)
        at_risk = j.remaining > 0 and is_at_risk(j.deadline, alone, now, at_risk_margin)
        hopeless = j.remaining > 0 and _served_first(now, j, rate, prompt_rate, gain) > j.deadline
        out[j.job_id] = Estimate(j.job_id, None if math.isinf(fin) else fin,
                                 None if math.isinf(slack) else slack, at_risk, hopeless)
    return out


def admit(jobs: Iterable[JobWork], new: JobWork, rate: Optional[float],
          now: float, gain: float = 1.0, burst_s: Optional[float] = None) -> Verdict:
    """Can `new` finish by its deadline behind the work promised to deadlines at or before
    its own, at `rate` (and its generation tail), both `gain` x faster (borrowing's most)?
    (Jobs with later deadlines go after it and do not count.) `burst_s`: `new` is urgent
    on arrival and done this many seconds from now when served in its burst (the urgent
    jobs due before it, then its prompts and tail, `urgent_bursts`): its finish is the
    later of that and the work ahead at `rate`, as for an urgent job in `estimate`."""
    if rate is None:
        return Verdict(True, None, "no harvest history")
    ahead = [j for j in jobs if j.deadline is not None and new.deadline is not None
             and j.deadline <= new.deadline]
    work = sum(max(0.0, j.remaining) for j in ahead) + max(0.0, new.remaining)
    if new.deadline is None:
        later = sum(max(0.0, j.remaining) for j in jobs)  # everything else goes first
        fin = _job_finish(now, new, later + max(0.0, new.remaining), rate,
                          overlap=new.tail_overlap)
        return Verdict(True, None if math.isinf(fin) else fin, "no deadline")
    if burst_s is None:
        fin = _job_finish(now, new, work, rate, gain, overlap=new.tail_overlap)
    else:
        fin = _burst_finish(now, work, rate, burst_s, gain)
    if fin <= new.deadline:
        return Verdict(True, fin, "fits")
    miss = "forever (nothing harvested)" if math.isinf(fin) else f"by {fin - new.deadline:.0f} s"
    return Verdict(False, None if math.isinf(fin) else fin, f"misses {miss}")
