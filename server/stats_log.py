"""The periodic stats line `serve` logs while busy (vLLM's "Avg prompt throughput ..." line):
every `interval_s` seconds, if the engine had work in the interval (anything running or
waiting, or tokens processed), one INFO line on the `conserve_server.stats` logger:

    online: 2 running, 0 waiting; offline: 6 running, 40 waiting; prompt 812.0 tok/s,
    generation 95.3 tok/s; KV 41.2%; preemptions 3; offline harvested 640.1 tok/s
    (1203456 total)

Rates are differences of the engine's cumulative counters (`EngineStats`) over the interval;
KV usage is the share of device KV blocks held by running requests; preemptions count the
interval's; "offline harvested" is offline prompt + generated tokens per second (and since
start). Idle intervals print nothing.

Threading: `start` runs one daemon thread that only calls `stats()` (any-thread safe by the
engine contract) and logs; `stop` ends it. Pure formatting lives in `stats_line`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from conserve_jax.engine_api import EngineStats

log = logging.getLogger("conserve_server.stats")


def _busy(prev: EngineStats, cur: EngineStats) -> bool:
    return bool(cur.online_running or cur.online_waiting or cur.offline_running
                or cur.offline_waiting or _tokens(cur) != _tokens(prev))


def _tokens(s: EngineStats) -> tuple[int, int, int, int]:
    return (s.online_prefill_tokens_total, s.offline_prefill_tokens_total,
            s.online_tokens_total, s.offline_tokens_total)


def stats_line(prev: EngineStats, cur: EngineStats, seconds: float) -> str:
    """The line for the interval of `seconds` between snapshots `prev` and `cur`."""
    dt = max(seconds, 1e-9)
    prompt = (cur.online_prefill_tokens_total + cur.offline_prefill_tokens_total
              - prev.online_prefill_tokens_total - prev.offline_prefill_tokens_total)
    generated = (cur.online_tokens_total + cur.offline_tokens_total
                 - prev.online_tokens_total - prev.offline_tokens_total)
    offline_total = cur.offline_prefill_tokens_total + cur.offline_tokens_total
    offline = offline_total - prev.offline_prefill_tokens_total - prev.offline_tokens_total
    used = cur.kv_blocks_online + cur.kv_blocks_offline
    kv = 100.0 * used / cur.kv_blocks_total if cur.kv_blocks_total else 0.0
    return (f"online: {cur.online_running} running, {cur.online_waiting} waiting; "
            f"offline: {cur.offline_running} running, {cur.offline_waiting} waiting; "
            f"prompt {prompt / dt:.1f} tok/s, generation {generated / dt:.1f} tok/s; "
            f"KV {kv:.1f}%; preemptions {cur.preemptions - prev.preemptions}; "
            f"offline harvested {offline / dt:.1f} tok/s ({offline_total} total)")


@dataclass
class StatsLog:
    """Logs `stats_line` every `interval_s` seconds while the engine is busy."""

    stats: Callable[[], EngineStats]
    interval_s: float

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"stats_interval must be > 0 seconds, got {self.interval_s}")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "StatsLog":
        self._thread = threading.Thread(target=self._run, name="stats-log", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        prev, t_prev = self.stats(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                cur, now = self.stats(), time.monotonic()
            except Exception:  # a dying engine: the server reports that, not this thread
                log.debug("stats unavailable", exc_info=True)
                continue
            if _busy(prev, cur):
                log.info("%s", stats_line(prev, cur, now - t_prev))
            prev, t_prev = cur, now
