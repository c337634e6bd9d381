"""`DeadlineTracker`: completion windows of stored batches, seen from this replica: the
harvest rate (`conserve_jax.scheduling.harvest`), each active batch's estimated finish and
slack (`conserve_jax.scheduling.slack`), admission of a new batch against the work
already promised, and the deadline statistics.

Who calls what:
- the batch runner's thread: `tick(now)` every deadline check (reads the engine's offline
  counters into the meter, re-estimates every active batch from the store, notices batches
  that ended and records their outcome), `observe_length` when an item finishes;
- gRPC / HTTP worker threads: `work_of` and `admit` while creating a batch, `estimate_of`
  when rendering one, `at_risk` and `snapshot` (metrics).
Shared state is replaced whole under `self._lock` (estimates, statistics); the length
predictor has its own lock (it is not thread-safe by itself), the pace samples theirs
(`deadline_pace.OfflinePace`).

A batch's work is fixed at creation: its prompt tokens plus the expected output tokens
of every item (the length predictor's point estimate: the client's
`expected_output_tokens` as a prior, what finished items of the same shape generated,
else min(128, max_tokens) before anything was seen), weighted by `WorkCost` into work
units, and the expected output of its longest item, stored with the batch (`BatchWork`),
so every replica sees the same numbers. Its remaining work: the items without a result
(items alike), less the progress of those inside this replica's engine (prompts in,
tokens generated; `ItemProgress`, each tick; `deadline_jobs.EngineView`).

Its tail: how long its slowest remaining item still generates, added to its work at the
harvest rate (a job of few items is bound by it): the longest item's expected output
while an item is still to start (any may be the longest), then the longest less what the
item furthest behind generated. Three paces (`paces`, `deadline_pace`):
- the median seconds per token of the offline items that finished lately and of those
  generating now (`LIVE_MIN_TOKENS` past their second token): the pace of items
  generating while other items' prompts go in beside them (a prompt chunk makes an
  iteration several decodes long);
- the fast end (`tpot_lead`), once no prompt goes in beside them: the faster of those
  paces' lower quartile and the engine's time per iteration that generated offline tokens
  with no offline prompt in it (`HarvestMeter.free_period`; before there was one, the
  latency model's decode-only iteration at its online correction now);
- served first: the same, with that period stretched to wall time over the share of it
  the engine spends in iterations with offline work (`HarvestMeter.duty`).
For a job whose own items have samples, the faster of a pace and their fastest (they may
have generated beside other jobs' prompts until then). A calm job's tail is at the median
while the prompts of the calm jobs due after it go in (at the harvest rate; `_behind`),
then at the served-first pace. An urgent job's is at that pace throughout: the scheduler
holds back every prompt but its own (and those of urgent jobs due earlier) while its items
generate, so urgent jobs are done one after another, each its prompts at the prompt rate
then its tail (`slack.urgent_bursts`); one at risk as it comes
is estimated so from admission (`_burst_on_arrival`). At risk is judged at the median pace
throughout (`JobWork.tail_alone_s`), as if the job had no priority. Hopeless (`slack` module
doc) weighs its work at the rate against its tail at its own items' fastest pace only
(before they show one, against no tail: a job keeps its priority until its own items show
it cannot make it), or its burst at the fast end if sooner. An estimate cannot see jobs
that come later, nor the online load to come. docs/benchmarks.md (bench_deadlines,
sessions 33-38) has the runs behind each rule.

No harvest history (fewer than `harvest_min_history_s` backlogged seconds measured, e.g.
a fresh server): no estimate is made (None everywhere) and every batch is admitted; the
meter learns the rate from the work it accepted. With a shared store each replica
publishes its own rate every `FLEET_EVERY_S` and estimates with the sum of the rates the
replicas published within the last three such periods (the fleet's harvest rate; a replica
without history publishes none, so the sum errs low).

Outcomes: a batch that ends `completed` with `finished_at <= deadline` met its window;
one that ends failed by its deadline (`DEADLINE_ERROR`), or completes after it, missed
(class "batch"); an HTTP flex request met its bound if it started (first token) within
`flex_max_wait_s`, else it missed (class "flex", refused with 429). Estimate error:
(estimated duration at submit - actual) / actual, for completed batches with one. Slack at
finish: deadline - finished_at (negative for a miss), in a histogram. Counted by the replica
that sees the batch end (in a fleet, every replica that saw it active: sum with care).
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.scheduling.harvest import HarvestMeter, WorkCost
from conserve_jax.scheduling.length_predictor import LengthPredictor
from conserve_jax.scheduling.slack import (Estimate, JobWork, Verdict, admit, estimate,
                                           urgent_bursts)
from conserve_server.batch.base import STORE_ERRORS, BatchRow, BatchWork, StoreBase
from conserve_server.batch.deadline_inputs import length_inputs
from conserve_server.batch.deadline_jobs import EngineView
from conserve_server.batch.deadline_pace import ItemProgress, OfflinePace, Paces, fast_end
from conserve_server.config import DeadlineOptions

log = logging.getLogger(__name__)

DEADLINE_ERROR = "batch deadline exceeded"
FLEET_EVERY_S = 2.0  # shared store: how often a replica publishes and reads harvest rates
# upper bounds (s) of the slack-at-finish histogram's buckets; +Inf is implied
SLACK_BUCKETS_S = (-3600.0, -600.0, -60.0, -10.0, 0.0, 10.0, 60.0, 600.0, 3600.0, 86400.0)


@dataclass
class DeadlineStats:
    """Cumulative since start (this replica's view)."""

    met: dict = field(default_factory=dict)  # class -> batches that finished in their window
    missed: dict = field(default_factory=dict)  # class -> expired, or completed late
    refused: int = 0  # batches refused as infeasible at submission
    accepted_infeasible: int = 0  # accepted although predicted to miss (--accept-infeasible)
    estimate_errors: list = field(default_factory=list)  # relative, completed batches
    slack_hist: list = field(default_factory=lambda: [0] * (len(SLACK_BUCKETS_S) + 1))
    slack_sum_s: float = 0.0
    at_risk_batches: int = 0  # now
    at_risk_items: int = 0  # now: unfinished items of at-risk batches
    harvest_rate: Optional[float] = None  # work units per backlogged second, now


class DeadlineTracker:
    def __init__(self, store: StoreBase, engine, options: DeadlineOptions = DeadlineOptions(),
                 cost: WorkCost = WorkCost(), clock: Callable[[], float] = time.time,
                 borrow_gain: float = 1.0) -> None:
        """`cost`: work units of tokens (`engine_work_cost`); `clock`: unix seconds (tests
        pass a fake one); `borrow_gain`: how much faster at most an at-risk job is served
        than the harvest rate (`borrow_gain_of`; 1 under deadline_policy isolate), used by
        admission only: a batch is refused when it cannot fit even with borrowing."""
        self.store = store
        self.engine = engine
        self.options = options
        self.cost = cost
        self.clock = clock
        self.borrow_gain = max(1.0, float(borrow_gain))
        self._view = EngineView(cost)  # the runner's counts at the last tick
        self._rows = 1  # sequences running or waiting in the engine at the last look
        self._correction: Optional[float] = None  # the latency model's, at the last look
        self.pace = OfflinePace()
        self.meter = HarvestMeter(cost, options.harvest_window_s, options.harvest_min_history_s)
        self._predictor = LengthPredictor()
        self._predictor_lock = threading.Lock()
        self._lock = threading.Lock()
        self._estimates: dict[str, Estimate] = {}
        self._active: dict[str, BatchRow] = {}
        self._recorded: dict[str, None] = {}  # ended batches counted (the last 10,000)
        self._fleet_rate: Optional[float] = None  # shared store: the replicas' sum
        self._next_publish = 0.0
        self._stats = DeadlineStats()

    # ---- work of a new batch (worker threads) -------------------------------------------
    def work_of(self, items: list[tuple[pb.GenerateRequest, list[int]]],
                tenant: str) -> BatchWork:
        """The work of a batch's items (as stored: request, prompt token ids): prompt
        tokens, expected output tokens, and those of the item expected to generate most
        (the job is done when it is: its tail)."""
        prompt = out = longest = 0
        with self._predictor_lock:
            for req, ids in items:
                prompt += len(ids)
                max_tokens, hint = length_inputs(req)
                f = self._predictor.features(ids, max_tokens, tenant, hint)
                n = self._predictor.predict(f).point
                out += n
                longest = max(longest, n)
        return BatchWork(prompt, out, longest_output_tokens=longest)

    def observe_length(self, req: pb.GenerateRequest, prompt_ids: list[int], tenant: str,
                       generated: int, tpot_s: Optional[float] = None) -> None:
        """A batch item finished (stop or length) after `generated` tokens, `tpot_s` seconds
        per output token after its first (runner thread)."""
        self.pace.finished(tpot_s)
        max_tokens, hint = length_inputs(req)
        with self._predictor_lock:
            # registered at submit (`work_of`): not counted a second time
            f = self._predictor.features(prompt_ids, max_tokens, tenant, hint, register=False)
            self._predictor.observe(f, generated)

    def _job(self, row: BatchRow, paces: Paces, urgent: frozenset = frozenset(),
             behind_s: float = 0.0) -> JobWork:
        """`row` as the estimator sees it now (`EngineView.job`)."""
        return self._view.job(row, paces, self.pace.own(row.id, None), urgent, behind_s)

    def tpot(self) -> float:
        """The median pace now (`paces().median`; 0 before any offline item generated)."""
        return self.pace.median()

    def paces(self) -> Paces:
        """The paces of this look (module doc; `deadline_pace.fast_end`): the median; the
        fast end, the faster of the lower quartile and `HarvestMeter.free_period` (before
        that is measured, the latency model's decode-only iteration of the rows running or
        waiting now: an item served first runs beside them all while work waits); and the
        served-first pace, the same with that period over the engine's offline duty
        (`HarvestMeter.duty`). 0 before any."""
        f = self.meter.free_period()
        if f is None:  # no such iteration yet (prompts went in beside every one)
            f = self.cost.decode_iteration_s(self._rows, self._correction)
        lead, served = fast_end(self.pace.lead(), f, self.meter.duty())
        return Paces(self.pace.median(), lead, served)

    def tpot_lead(self) -> float:
        """The fast end now (`paces().lead`)."""
        return self.paces().lead

    def admit(self, work: BatchWork, deadline: Optional[float],
              items: int = 1) -> tuple[Verdict, BatchWork]:
        """Judge a new batch of `work` (tokens, over `items` items) with `deadline` against
        the active batches (read from the store now) at the current harvest rate and paces.
        Returns the verdict and the `BatchWork` to store (with the estimate); `judge`
        refuses an infeasible batch unless `accept_infeasible`."""
        now = self.clock()
        paces, rate = self.paces(), self.rate()
        rows = self.store.active()
        urgent = frozenset(self.urgent_batches())
        view = self._view  # one tick's counts throughout (the runner replaces it whole)
        jobs = [view.job(r, paces, self.pace.own(r.id, None), urgent) for r in rows]
        # calm when it comes: the prompts of the calm batches due after it go in beside it
        later = sum(view.prompt_units(r) for r in rows if r.id not in urgent
                    and (deadline is not None and (r.deadline is None or r.deadline > deadline)))
        new = view.new_job(deadline, work, items, paces, later / rate if rate else 0.0)
        # served first, no other prompt goes in beside its items: its tail at the
        # served-first pace throughout
        first = replace(view.new_job(deadline, work, items, paces), urgent=True)
        burst = self._burst_on_arrival(jobs, new, first, rate, now)
        v = admit(jobs, new, rate, now, burst_s=burst)
        if not v.feasible and self.borrow_gain > 1.0 and rate is not None:
            # deadline_policy borrow: refused only if it misses even at the most borrowing
            # can give. Its estimate stays the one without (past its deadline), as every
            # tick's: the gain is an upper bound (bench_deadlines borrowed 2-5 s in 240 s)
            b = admit(jobs, new, rate, now, gain=self.borrow_gain, burst_s=burst)
            if b.feasible:
                v = Verdict(True, v.finish_at, f"fits only by borrowing ({v.reason} without)")
        return v, replace(work, estimate_at=v.finish_at)

    def _burst_on_arrival(self, jobs: list[JobWork], new: JobWork, first: JobWork,
                          rate: Optional[float], now: float) -> Optional[float]:
        """If a new batch (`new`, calm; `first`, the same served first) is at risk as it
        comes and can make it (as the first tick will judge it: `estimate` over the active
        jobs and it, calm, in the served order), it is urgent
        from the first tick: seconds from now it is done in its burst (`urgent_bursts`: the
        urgent batches due before it, then its prompts and its tail at the served-first
        pace). Else, or with `deadline_order` off (nothing is served first), None."""
        prompt_rate = self.prompt_rate()
        if (rate is None or not prompt_rate or new.deadline is None
                or not self.options.deadline_order):
            return None
        e = estimate(jobs + [new], rate, now, self.options.at_risk_margin,
                     gain=self.borrow_gain, prompt_rate=prompt_rate)["new"]
        if not e.at_risk or e.hopeless:
            return None
        ahead = [j for j in jobs if j.urgent and j.deadline is not None
                 and j.deadline <= new.deadline]
        return urgent_bursts(ahead + [first], prompt_rate)["new"]

    def judge(self, items: list[tuple[pb.GenerateRequest, list[int]]], tenant: str,
              deadline: Optional[float], field_name: str) -> tuple[BatchWork, Optional[str]]:
        """Admission of a new batch (worker thread): the `BatchWork` to store with it, and
        None to accept or the refusal message (naming `field_name` and the estimate) when
        it is predicted to miss its window and `accept_infeasible` is off. Counted in the
        statistics either way."""
        verdict, work = self.admit(self.work_of(items, tenant), deadline, len(items))
        if verdict.feasible:
            return work, None
        with self._lock:
            if self.options.accept_infeasible:
                self._stats.accepted_infeasible += 1
                return work, None
            self._stats.refused += 1
        now = self.clock()
        when = ("never at the current harvest rate (the online load leaves offline work "
                "nothing)" if verdict.finish_at is None
                else f"in about {verdict.finish_at - now:.0f} s")
        return work, (f"{field_name}: this batch cannot finish inside its completion window "
                      f"(ends in {deadline - now:.0f} s): estimated completion {when}, "
                      f"counting the work already promised to earlier deadlines "
                      f"({verdict.reason}); give a longer {field_name}, fewer requests, or "
                      f"retry later")

    # ---- reads (any thread) --------------------------------------------------------------
    def estimate_of(self, batch_id: str) -> Optional[Estimate]:
        """The latest estimate of an active batch (None: unknown, or not active)."""
        with self._lock:
            return self._estimates.get(batch_id)

    def at_risk(self) -> list[str]:
        """Ids of the active batches at risk, least slack first."""
        with self._lock:
            risky = [e for e in self._estimates.values() if e.at_risk]
        inf = float("inf")
        return [e.job_id for e in sorted(risky, key=lambda e: (e.slack_s if e.slack_s is not None
                                                                else -inf))]

    def urgent_batches(self) -> list[str]:
        """The batches whose items go first: the at-risk ones that can still make it (not
        `hopeless`), earliest deadline first (the order the estimates assume among them),
        or none with `deadline_order` off."""
        if not self.options.deadline_order:
            return []
        with self._lock:  # a hopeless job gets none: it would only drag others down with it
            risky = [e.job_id for e in self._estimates.values() if e.at_risk and not e.hopeless]
            due = {b: r.deadline for b, r in self._active.items()}
        inf = float("inf")
        return sorted(risky, key=lambda b: due.get(b) if due.get(b) is not None else inf)

    def snapshot(self) -> DeadlineStats:
        with self._lock:
            s = self._stats
            return DeadlineStats(dict(s.met), dict(s.missed), s.refused, s.accepted_infeasible,
                                 list(s.estimate_errors), list(s.slack_hist), s.slack_sum_s,
                                 s.at_risk_batches, s.at_risk_items, s.harvest_rate)

    # ---- runner thread -------------------------------------------------------------------
    def prompt_rate(self) -> Optional[float]:
        """Prompt work units a second while offline prompts go in (`HarvestMeter.
        prompt_rate`), scaled like the harvest rate with a shared store (this replica's
        share of the fleet's rate)."""
        own, fleet = self.meter.rate(), self._fleet_rate
        pr = self.meter.prompt_rate()
        if pr is None or fleet is None or not own:
            return pr
        return pr * fleet / own

    def rate(self) -> Optional[float]:
        """The harvest rate estimates use: with a shared store the fleet's (the rates the
        replicas published lately, this one's included), else (or before any replica
        published) this replica's own."""
        fleet = self._fleet_rate
        return fleet if fleet is not None else self.meter.rate()

    def _share_rate(self, now: float) -> None:
        """Shared store: publish this replica's rate and read the fleet's, every
        `FLEET_EVERY_S` (runner thread)."""
        if not self.store.shared or now < self._next_publish:
            return
        self._next_publish = now + FLEET_EVERY_S
        try:
            self.store.publish_rate(self.meter.rate())
            self._fleet_rate = self.store.fleet_rate(3 * FLEET_EVERY_S)
        except STORE_ERRORS as e:
            log.warning("could not share the harvest rate (%s)", e)

    def observe_engine(self, now: float) -> None:
        """Read the engine's cumulative offline counters into the harvest meter."""
        st = self.engine.stats()
        backlogged = st.offline_waiting + st.offline_running > 0
        self._rows = st.online_running + st.offline_running + st.offline_waiting
        if st.offline_running != self._view.slots and st.offline_running > 0:
            self._view = replace(self._view, slots=st.offline_running)
        self._correction = st.latency_correction
        self.meter.observe(now, st.offline_prefill_tokens_total, st.offline_tokens_total,
                           backlogged, (st.offline_free_iterations, st.offline_free_s),
                           st.offline_busy_s or None)  # 0: no offline iteration timed yet

    def tick(self, now: Optional[float] = None,
             in_engine: Optional[dict[str, int]] = None,
             progress: Optional[dict[str, list[ItemProgress]]] = None) -> None:
        """Observe the engine, re-estimate the active batches, record ended ones.
        `in_engine`: batch id -> how many of its items are inside this replica's engine
        now (the runner's in-flight items), which the engine serves before unclaimed ones
        (`slack` module doc); `progress`: batch id -> those items' progress (module doc).
        None keeps the last of each."""
        now = self.clock() if now is None else now
        if in_engine is not None:
            self._view = replace(self._view, in_engine=dict(in_engine))
        if progress is not None:
            self._view = replace(self._view, progress={b: tuple(ps) for b, ps in progress.items()})
            self.pace.live(self._view.progress)
        try:
            self.observe_engine(now)
        except Exception:
            log.exception("reading engine stats for the harvest rate failed")
        try:
            rows = self.store.active()
        except STORE_ERRORS as e:
            log.warning("batch store unreachable for deadline estimates (%s)", e)
            return
        self._share_rate(now)
        rate = self.rate()
        active = {r.id: r for r in rows}
        urgent = frozenset(self.urgent_batches())  # what the engine serves first now
        paces = self.paces()
        behind = self._view.behind(rows, urgent, rate)
        est = estimate([self._job(r, paces, urgent, behind.get(r.id, 0.0)) for r in rows],
                       rate, now, self.options.at_risk_margin, gain=self.borrow_gain,
                       prompt_rate=self.prompt_rate())
        ended = [b for b in self._active if b not in active]
        finished: list[BatchRow] = []
        for b in ended:
            try:
                row = self.store.get(b)
            except STORE_ERRORS:
                active[b] = self._active[b]  # look again next tick
                continue
            if row is not None:
                finished.append(row)
        with self._lock:
            self._estimates = est
            self._active = active
            s = self._stats
            s.harvest_rate = rate
            risky = [r for r in rows if est[r.id].at_risk]
            s.at_risk_batches = len(risky)
            s.at_risk_items = sum(r.total - r.done for r in risky)
            for row in finished:
                self._record_end(row)

    def note_flex(self, started: bool) -> None:
        """An HTTP flex request started within its wait bound (met) or was refused with
        429 after it (missed; class "flex"). Any thread."""
        with self._lock:
            bucket = self._stats.met if started else self._stats.missed
            bucket["flex"] = bucket.get("flex", 0) + 1

    def note_expired(self, batch_id: str) -> None:
        """The runner expired `batch_id` (runner thread): count it now, also when this
        process never saw it active (its deadline passed while the server was down)."""
        try:
            row = self.store.get(batch_id)
        except STORE_ERRORS:
            return  # the next tick sees it ended, if it saw it active
        if row is not None:
            with self._lock:
                self._record_end(row)

    def _record_end(self, row: BatchRow) -> None:
        """Count one ended batch, once (caller holds the lock)."""
        if row.deadline is None or row.state == "cancelled" or row.id in self._recorded:
            return
        s = self._stats
        expired = row.state == "failed" and row.error == DEADLINE_ERROR
        if row.state != "completed" and not expired:
            return
        end = row.finished_at if row.finished_at is not None else self.clock()
        slack = row.deadline - end
        met = row.state == "completed" and slack >= 0
        self._recorded[row.id] = None
        if len(self._recorded) > 10_000:
            del self._recorded[next(iter(self._recorded))]
        bucket = s.met if met else s.missed
        bucket["batch"] = bucket.get("batch", 0) + 1
        s.slack_hist[bisect.bisect_left(SLACK_BUCKETS_S, slack)] += 1
        s.slack_sum_s += slack
        if row.state == "completed" and row.estimate_at is not None:
            actual = end - row.created_at
            if actual > 0:
                s.estimate_errors.append((row.estimate_at - row.created_at - actual) / actual)
                del s.estimate_errors[:-1000]  # the last 1000
