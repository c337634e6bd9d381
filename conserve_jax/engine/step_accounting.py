"""`StepAccounting`: the engine's stats bookkeeping. It owns the tokens each committed
iteration counted (prefilled and generated, by class), their cumulative totals, the
iteration count, the recent-rate history, and the `EngineStats` snapshot other threads
read; `final_stats` gives a sequence's numbers for its final output.

Used by `Engine` only. `record` and `publish` run on the step-loop thread (the only
writer of the totals and the iteration count, which therefore need no lock); `stats` may
be called from any thread. The history and the published snapshot are shared by both
sides and guarded by this object's own lock. Nothing outside this object is mutated:
`publish` only reads the scheduler, KV manager, policy and checkpointer it is given.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Optional

from conserve_jax.engine.output_delivery import FinalStats
from conserve_jax.engine_api import EngineStats, IterationStats
from conserve_jax.request import Sequence


class StepAccounting:
    RATE_WINDOW_S = 10.0  # `stats` reports token rates over this many recent seconds

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._history: collections.deque = collections.deque(maxlen=512)  # (t, online, offline)
        self._totals = [0, 0, 0, 0]  # generated online/offline, prefilled online/offline
        self.iterations = 0
        # iterations that generated offline tokens with no offline prompt chunk in them, and
        # their seconds (each from its scheduling to its commit; resumed ones not counted)
        self.offline_free_iterations = 0
        self.offline_free_s = 0.0
        self.offline_busy_s = 0.0  # seconds of iterations with offline work (timed ones)
        self._snapshot = EngineStats()

    def record(self, entries, sampled, seconds: Optional[float] = None) -> IterationStats:
        """Step-loop thread, once per committed iteration: count its prefill `entries`'
        tokens and its `sampled` (sequence, token) pairs by class, add them to the totals
        and the rate history, and return the record for the iteration listeners.
        `seconds`: how long the iteration took from its scheduling to its commit (None:
        not known, e.g. a resumed iteration)."""
        counts = [0, 0, 0, 0]
        for e in entries:
            if not e.decode:
                counts[2 if e.seq.online else 3] += e.num_tokens
        for seq, _ in sampled:
            counts[0 if seq.online else 1] += 1
        self.iterations += 1
        if seconds is not None and (counts[1] or counts[3]):
            self.offline_busy_s += seconds
            if not counts[3]:
                self.offline_free_iterations += 1
                self.offline_free_s += seconds
        self._totals = [a + b for a, b in zip(self._totals, counts)]
        with self._lock:
            self._history.append((time.monotonic(), counts[0], counts[1]))
        return IterationStats(
            online_generation_tokens=counts[0], offline_generation_tokens=counts[1],
            online_prompt_tokens=counts[2], offline_prompt_tokens=counts[3])

    def publish(self, scheduler, kv, policy, checkpointer) -> None:
        """Step-loop thread: snapshot scheduler, KV and pool state for other threads."""
        sch, c = scheduler, scheduler.counters
        running = sch.running
        st = EngineStats(
            online_waiting=len(sch.waiting_online), offline_waiting=len(sch.waiting_offline),
            online_running=sum(s.online for s in running),
            offline_running=sum(not s.online for s in running),
            kv_blocks_total=kv.capacity, kv_blocks_online=kv.used_online,
            kv_blocks_offline=kv.used_offline,
            online_tokens_total=self._totals[0], offline_tokens_total=self._totals[1],
            online_prefill_tokens_total=self._totals[2],
            offline_prefill_tokens_total=self._totals[3],
            preemptions=c.preemptions, preempted_tokens_discarded=c.preempted_tokens_discarded,
            preemptions_resumed=c.preemptions_resumed,
            evictions=c.evictions, recomputed_tokens=c.recomputed_tokens,
            restored_tokens=c.restored_tokens, iterations=self.iterations,
            offline_free_iterations=self.offline_free_iterations,
            offline_free_s=self.offline_free_s, offline_busy_s=self.offline_busy_s,
            prefix_cache_queries_online=c.prefix_query_tokens[True],
            prefix_cache_queries_offline=c.prefix_query_tokens[False],
            prefix_cache_hits_online=c.prefix_hit_tokens[True],
            prefix_cache_hits_offline=c.prefix_hit_tokens[False],
            kv_blocks_cached_free=kv.allocator.num_cached_free,
            prefix_cache_evictions=kv.allocator.evictions)
        for name, value in policy.kv_stats(sch).items():  # reservations, predictor
            setattr(st, name, value)
        st.deadline_borrowed_s = policy.borrowed_s
        st.latency_correction = policy.latency_correction()
        if checkpointer is not None:
            st.host_pool_slots_total = checkpointer.pool.num_slots
            st.host_pool_slots_used = checkpointer.pool.num_used
        with self._lock:
            self._snapshot = st

    def stats(self) -> EngineStats:
        """Any thread: the latest published snapshot, with token rates over the last
        `RATE_WINDOW_S` seconds."""
        with self._lock:
            snap = self._snapshot
            hist = list(self._history)
        now = time.monotonic()
        recent = [h for h in hist if now - h[0] <= self.RATE_WINDOW_S]
        span = max(1e-9, now - recent[0][0]) if len(recent) > 1 else 1.0
        return dataclasses.replace(
            snap, online_tokens_per_s=sum(h[1] for h in recent) / span if recent else 0.0,
            offline_tokens_per_s=sum(h[2] for h in recent) / span if recent else 0.0)


def final_stats(seq: Sequence) -> FinalStats:
    """TTFT, mean TPOT, prompt tokens found in the prefix cache and queue time of a
    sequence so far, for its final output (pure; step-loop thread in practice)."""
    queue = None
    if seq.first_scheduled_time is not None:
        queue = seq.first_scheduled_time - seq.arrival
    if seq.first_token_time is None:
        return FinalStats(None, None, seq.num_cached_tokens, queue)
    tpot = None
    if seq.num_generated > 1 and seq.last_token_time is not None:
        tpot = (seq.last_token_time - seq.first_token_time) / (seq.num_generated - 1)
    return FinalStats(seq.first_token_time - seq.arrival, tpot, seq.num_cached_tokens,
                      queue)
