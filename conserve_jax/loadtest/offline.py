"""`OfflineLoad`: the offline side of a load test (batches submitted next to online load).

- `start()`: one thread submits `offline_requests` requests (prompts of
  `offline_input_len` synthetic tokens, `max_tokens=offline_output_len`, ignore_eos) split
  into `offline_batches` batches, each from its own thread, then polls every batch with
  get_batch every `poll_s` seconds (the poll history is `timeline`: (time, items done)).
- `stop()`: ends the polling thread.
- `finish(duration_s)`: a last poll (its done counts and states are the report's); unless
  `cancel_offline_at_end` is False, unfinished batches are cancelled; the stored results of
  finished batches are collected (an RPC deadline of `collect_timeout_s`) and their output
  tokens summed, skipping cancelled/error results. A batch still running (with
  `cancel_offline_at_end` False) or whose results cannot be collected is counted as
  done * offline_output_len instead (`tokens_source` "estimate"). Offline tokens/s is
  output tokens / `duration_s` (the measurement window).

Threads: `start` owns the submit/poll threads; `finish` runs on the caller's thread after
`stop`. Shared state is guarded by one lock.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable, Optional

from conserve_jax.loadtest.adapter import (FAILED_REASONS, TERMINAL_STATES, ClientAdapter,
                                           error_code, error_message)
from conserve_jax.loadtest.prompts import OFFLINE, prompt_token_ids

if TYPE_CHECKING:
    from conserve_jax.loadtest.run_config import RunConfig

log = logging.getLogger(__name__)


class OfflineLoad:
    """See module doc. `clock()` returns seconds since the start of the run."""

    def __init__(self, adapter: ClientAdapter, config: "RunConfig",
                 clock: Callable[[], float]) -> None:
        self.adapter, self.config, self.clock = adapter, config, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._batch_ids: list[str] = []
        self._submit_errors: dict[str, int] = {}
        self._finished_s: Optional[float] = None
        self.done = 0
        self.timeline: list[tuple[float, int]] = []

    @property
    def n_batches(self) -> int:
        c = self.config
        return max(1, min(c.offline_batches, c.offline_requests))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loadtest-offline", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, self.config.poll_s * 2))

    def _loop(self) -> None:
        self._submit()
        while not self._stop.wait(self.config.poll_s):
            self.poll()

    def _submit(self) -> None:
        c = self.config
        n, k = c.offline_requests, self.n_batches
        bounds = [round(j * n / k) for j in range(k + 1)]

        def submit(lo: int, hi: int) -> None:
            reqs = [{"token_ids": prompt_token_ids(c.offline_input_len, i, seed=c.seed,
                                                   stream=OFFLINE, token_range=c.token_range),
                     "max_tokens": c.offline_output_len, "ignore_eos": True}
                    for i in range(lo, hi)]
            try:
                batch_id = self.adapter.submit_batch(reqs)
            except Exception as e:
                code = error_code(e)
                log.warning("offline batch submission failed: %s %s", code, error_message(e))
                with self._lock:
                    self._submit_errors[code] = self._submit_errors.get(code, 0) + 1
                return
            with self._lock:
                self._batch_ids.append(batch_id)

        threads = [threading.Thread(target=submit, args=(bounds[j], bounds[j + 1]),
                                    name="loadtest-submit", daemon=True) for j in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def poll(self, record: bool = True) -> list[dict]:
        """get_batch for every submitted batch: [{"batch_id", "state", "done", "total",
        "failed"}]; if `record`, notes a timeline point and when every batch first looked
        finished."""
        with self._lock:
            ids = list(self._batch_ids)
        out = []
        for b in ids:
            try:
                out.append({"batch_id": b, **self.adapter.batch_status(b)})
            except Exception as e:
                log.warning("get_batch(%s) failed: %s", b, error_message(e))
        t, done = self.clock(), sum(s["done"] for s in out)
        if not record:
            return out
        with self._lock:
            self.done = done
            self.timeline.append((t, done))
            if (out and len(ids) == self.n_batches and self._finished_s is None
                    and all(s["state"] in TERMINAL_STATES for s in out)):
                self._finished_s = t
        return out

    def _collect(self, batch_id: str) -> Optional[tuple[int, int]]:
        """(usable results, their output tokens), or None if collection failed."""
        box: dict = {}
        timeout = self.config.collect_timeout_s

        def work() -> None:
            count = tokens = 0
            try:
                for _, n, reason in self.adapter.batch_results(batch_id, timeout=timeout):
                    if reason not in FAILED_REASONS:
                        count += 1
                        tokens += n
                box["result"] = (count, tokens)
            except Exception as e:
                log.warning("batch_results(%s) failed: %s", batch_id, error_message(e))

        t = threading.Thread(target=work, name="loadtest-collect", daemon=True)
        t.start()
        t.join(timeout + 1.0)
        return box.get("result")

    def finish(self, duration_s: float) -> dict:
        """The report's offline section (see `report` module doc)."""
        c = self.config
        final = self.poll()
        finished_s = self._finished_s
        cancelled = []
        if c.cancel_offline_at_end:
            for s in final:
                if s["state"] not in TERMINAL_STATES:
                    try:
                        if self.adapter.cancel_batch(s["batch_id"]):
                            cancelled.append(s["batch_id"])
                    except Exception as e:
                        log.warning("cancel_batch(%s) failed: %s", s["batch_id"], error_message(e))
        states = {s["batch_id"]: s["state"] for s in (self.poll(record=False) if cancelled else final)}
        tokens, source, results = 0, "results", 0
        for s in final:
            # a running batch's result stream waits for its unfinished items: estimate instead
            got = (self._collect(s["batch_id"])
                   if states.get(s["batch_id"]) in TERMINAL_STATES else None)
            if got is None:
                source = "estimate"
                results += s["done"]
                tokens += s["done"] * c.offline_output_len
            else:
                results += got[0]
                tokens += got[1]
        return {
            "requests": c.offline_requests,
            "batches": final,
            "submit_errors": dict(self._submit_errors),
            "completed_at_window_end": sum(s["done"] for s in final),
            "failed_at_window_end": sum(s["failed"] for s in final),
            "results_collected": results,
            "output_tokens": int(tokens),
            "tokens_source": source,
            "tokens_per_s": tokens / max(duration_s, 1e-9),
            "all_finished_at_s": finished_s,
            "cancelled_batches": cancelled,
        }
