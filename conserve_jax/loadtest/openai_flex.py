"""`FlexBatch`: offline load as `service_tier: "flex"` requests, shaped like a batch.

For OpenAI-compatible servers without (or instead of) the Batch API, the load tester's
offline side sends its requests as flex-tier completions from `concurrency` worker threads
and tracks them like a batch: `status()` gives (state, total, done, failed), `results()` the
finished items, `cancel()` stops sending and closes the open streams (those items end as
"cancelled"). State goes running -> completed, or cancelled.

Threads: `start` launches the workers; `status`/`results`/`cancel` may be called from any
thread (state under `self._lock`).
"""
from __future__ import annotations

import logging
import threading
import uuid
from typing import Callable

from conserve_jax.loadtest.openai_types import BatchResult

log = logging.getLogger(__name__)


class FlexBatch:
    def __init__(self, generate: Callable, requests: list[dict], concurrency: int) -> None:
        """`generate(token_ids, max_tokens, ignore_eos, tier=...)` opens one streamed
        request (`OpenAIClient.generate`)."""
        self.generate = generate
        self.requests = requests
        self.batch_id = "flex_" + uuid.uuid4().hex
        self.concurrency = max(1, min(concurrency, len(requests)))
        self._lock = threading.Lock()
        self._next = 0
        self._results: dict[int, BatchResult] = {}
        self._open: dict[int, object] = {}
        self._cancelled = False

    def start(self) -> None:
        for _ in range(self.concurrency):
            threading.Thread(target=self._work, name="loadtest-flex", daemon=True).start()

    def _take(self) -> int:
        with self._lock:
            if self._cancelled or self._next >= len(self.requests):
                return -1
            self._next += 1
            return self._next - 1

    def _work(self) -> None:
        while (i := self._take()) >= 0:
            r = self.requests[i]
            tokens, reason = 0, None
            try:
                stream = self.generate(r["token_ids"], r["max_tokens"],
                                              r.get("ignore_eos", True), tier="flex")
                with self._lock:
                    self._open[i] = stream
                for chunk in stream:
                    tokens += len(chunk.token_ids)
                    if chunk.finished:
                        reason = chunk.finish_reason
                        break
            except Exception as e:
                log.debug("flex request %d failed: %s", i, e)
                reason = "cancelled" if self._cancelled else "error"
            with self._lock:
                self._open.pop(i, None)
                self._results[i] = BatchResult(i, [0] * tokens if reason not in ("error", "cancelled")
                                               else [], reason or "error")

    def status(self) -> tuple[str, int, int, int]:
        with self._lock:
            done = len(self._results)
            failed = sum(1 for r in self._results.values() if r.finish_reason in ("error", "cancelled"))
            total = len(self.requests)
            if self._cancelled:
                state = "cancelled"
            else:
                state = "completed" if done >= total else "running"
        return state, total, done, failed

    def results(self) -> list[BatchResult]:
        with self._lock:
            return [self._results[i] for i in sorted(self._results)]

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            streams = list(self._open.values())
        for s in streams:
            s.cancel()
