"""`Runner`: replays a workload against a server through a `ClientAdapter`.

Timeline of one run (all times from t0 = start of `run`, `time.perf_counter` based):

- Online: requests are sent at their `RequestSpec.arrival_s` by a dispatcher (the calling
  thread) to a pool of `max_concurrency` worker threads; when all workers are busy the
  dispatcher waits, so a request may be sent later than scheduled (`send_lag_s` in the
  report). Issuing stops at `duration_s`, or when the workload is exhausted (with no
  `duration_s`, at the last arrival + `grace_s` at the latest).
- Offline: `offline.OfflineLoad` submits `offline_requests` requests as `offline_batches`
  batches at t0, concurrently with the online load, and polls them every `poll_s`.
- The measurement window ends when every online request sent has finished and
  `duration_s` (if set) has passed, or at the latest at the hard end: `duration_s +
  grace_s`, or with no `duration_s` the last arrival + `grace_s`.
  Requests still in flight then are recorded with error "INCOMPLETE" and their calls
  cancelled; as a backstop every online call carries a gRPC deadline
  `CALL_DEADLINE_MARGIN_S` past that bound. The run therefore ends by itself, and it only
  ever talks to the adapter it was given.
- After the window, `OfflineLoad.finish` measures the offline side (see its module doc).

Server stats are read (flattened to numbers) before t0 and after the offline side is
measured; `report` turns them into deltas.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

from tqdm import tqdm

from conserve_jax.loadtest.adapter import FAILED_REASONS, ClientAdapter, error_code, error_message
from conserve_jax.loadtest.metrics import RequestRecord
from conserve_jax.loadtest.offline import OfflineLoad
from conserve_jax.loadtest.run_config import RunConfig
from conserve_jax.loadtest.prompts import ONLINE, prompt_token_ids
from conserve_jax.loadtest.trace import RequestSpec

log = logging.getLogger(__name__)

CALL_DEADLINE_MARGIN_S = 1.0  # online RPC deadlines reach this far past the window's end


@dataclass
class RunResult:
    """What `Runner.run` measured. `offline` is the report's offline section."""

    records: list[RequestRecord]
    duration_s: float
    not_issued: int
    offline: dict
    stats_before: Optional[dict]
    stats_after: Optional[dict]
    offline_timeline: list[tuple[float, int]] = field(default_factory=list)


class _Progress:
    """The run's progress bar (tqdm, on stderr): requests finished out of those in the
    workload, with sent/failed/in-flight (and offline) counts. Updated by the online workers
    as requests end (under the runner's lock), so it needs no thread of its own."""

    def __init__(self, runner: "Runner", total: int, enabled: bool):
        self.runner = runner
        self.bar = tqdm(total=total, desc="loadtest", unit="req", file=sys.stderr,
                        disable=not enabled, mininterval=0.5, dynamic_ncols=True)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.refresh()
        self.bar.close()

    def refresh(self) -> None:
        r = self.runner
        self.bar.n = r.n_done + r.n_failed
        post = dict(sent=r.n_sent, failed=r.n_failed, in_flight=r.n_sent - r.n_done - r.n_failed)
        if r.config.offline_requests:
            post["offline"] = f"{r.offline.done}/{r.config.offline_requests}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()


class Runner:
    """Runs one load test. Create, call `run` once; the adapter is not closed here."""

    def __init__(self, adapter: ClientAdapter, workload: Sequence[RequestSpec],
                 config: RunConfig) -> None:
        self.adapter = adapter
        self.workload = sorted(workload, key=lambda s: s.arrival_s)
        self.config = config
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._closed = False
        self._stop = threading.Event()
        self.n_sent = self.n_done = self.n_failed = 0
        self._progress: Optional[_Progress] = None
        self.offline = OfflineLoad(adapter, config, self.now)
        self._calls: dict[int, object] = {}  # in-flight online calls, to cancel at the end

    def now(self) -> float:
        return time.perf_counter() - self._t0

    # ---- online ---------------------------------------------------------------------
    def _deadlines(self) -> tuple[float, float]:
        """(stop issuing at, hard end of the window): (duration, duration + grace), or with
        no duration (last arrival + grace, the same)."""
        c = self.config
        if c.duration_s is not None:
            return c.duration_s, c.duration_s + c.grace_s
        last = self.workload[-1].arrival_s if self.workload else 0.0
        return last + c.grace_s, last + c.grace_s

    def _register(self, index: int, call: object) -> None:
        with self._lock:
            self._calls[index] = call

    def _one(self, rec: RequestRecord, spec: RequestSpec, hard_deadline: float,
             slots: threading.Semaphore) -> None:
        c = self.config
        try:
            ids = prompt_token_ids(spec.input_len, rec.index, seed=c.seed, stream=ONLINE,
                                   token_range=c.token_range)
            times: list[float] = []
            tokens: list[int] = []
            end = reason = err = msg = None
            sent = self.now()
            try:
                for n, finished, why in self.adapter.stream(
                        ids, spec.output_len, ttft=c.slo_ttft if c.send_slo else None,
                        tpot=c.slo_tpot if c.send_slo else None,
                        timeout=max(0.001, hard_deadline + CALL_DEADLINE_MARGIN_S - sent),
                        on_call=lambda call: self._register(rec.index, call)):
                    t = self.now()
                    if n:
                        times.append(t)
                        tokens.append(n)
                    if finished:
                        end, reason = t, why
                        break
                if end is None:  # stream ended without a finished chunk
                    end = self.now()
                if reason in FAILED_REASONS:
                    err, msg = f"finish_reason:{reason}", None
            except Exception as e:  # gRPC errors and anything else: recorded, not raised
                err, msg = error_code(e), error_message(e)
            with self._lock:
                self._calls.pop(rec.index, None)
                if self._closed:
                    return
                rec.sent_s, rec.chunk_times, rec.chunk_tokens = sent, times, tokens
                rec.finish_reason, rec.error, rec.error_message = reason, err, msg
                rec.end_s = end if err is None else None
                if err is None:
                    self.n_done += 1
                else:
                    self.n_failed += 1
                    log.debug("request %d failed: %s %s", rec.index, err, msg)
                if self._progress is not None:
                    self._progress.refresh()
        finally:
            slots.release()

    def _dispatch(self, pool: ThreadPoolExecutor, records: list[RequestRecord]) -> int:
        """Send the workload on schedule; return how many requests were not issued."""
        c = self.config
        issue_deadline, hard_deadline = self._deadlines()
        slots = threading.Semaphore(c.max_concurrency)
        for i, spec in enumerate(self.workload):
            if spec.arrival_s >= issue_deadline:
                return len(self.workload) - i
            wait = spec.arrival_s - self.now()
            if wait > 0 and self._stop.wait(wait):
                return len(self.workload) - i
            remaining = issue_deadline - self.now()
            if remaining <= 0 or not slots.acquire(timeout=remaining):
                return len(self.workload) - i
            rec = RequestRecord(index=i, scheduled_s=spec.arrival_s, input_len=spec.input_len,
                                expected_output_len=spec.output_len, sent_s=self.now())
            with self._lock:
                records.append(rec)
                self.n_sent += 1
            pool.submit(self._one, rec, spec, hard_deadline, slots)
        return 0

    # ---- the run --------------------------------------------------------------------
    def run(self) -> RunResult:
        """Run the load test (blocking; bounded by duration/last arrival + grace)."""
        c = self.config
        stats_before = self.adapter.stats()
        self._t0 = time.perf_counter()
        records: list[RequestRecord] = []
        if c.offline_requests > 0:
            self.offline.start()
        pool = ThreadPoolExecutor(max_workers=max(1, c.max_concurrency),
                                  thread_name_prefix="loadtest-online")
        with _Progress(self, len(self.workload), c.progress) as self._progress:
            not_issued = self._dispatch(pool, records)
            _, hard_end = self._deadlines()
            min_end = c.duration_s or 0.0
            while self.now() < hard_end:
                with self._lock:
                    busy = self.n_done + self.n_failed < self.n_sent
                if not busy and self.now() >= min_end:
                    break
                time.sleep(0.02)
            with self._lock:
                self._closed = True
                for r in records:
                    if r.end_s is None and r.error is None:
                        r.error, r.error_message = "INCOMPLETE", "still running at window end"
                calls = list(self._calls.values())
            for call in calls:  # frees the server's KV at once; the workers then finish
                cancel = getattr(call, "cancel", None)
                if cancel is not None:
                    try:
                        cancel()
                    except Exception as e:
                        log.debug("cancel failed: %s", e)
            duration = self.now()
            self._stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self.offline.stop()
        offline = self.offline.finish(duration) if c.offline_requests > 0 else {}
        stats_after = self.adapter.stats()
        return RunResult(records=records, duration_s=duration, not_issued=not_issued,
                         offline=offline, stats_before=stats_before, stats_after=stats_after,
                         offline_timeline=list(self.offline.timeline))
