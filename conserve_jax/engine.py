"""Engine: the step loop that ties scheduler, runner and output streams together.

Threading contract: `submit`, `cancel`, `stats` and `shutdown` may be called from any
thread; they only touch the intake queue and the published stats snapshot (under `_lock`)
and wake the loop. Everything else — scheduler, KV bookkeeping, runner, caches — belongs
to the single step-loop thread started by the constructor, which publishes an immutable
`EngineStats` snapshot after every pass. Detokenization, stop strings and delivery to
request streams run on the output thread (`OutputDelivery`), off the step loop. An
exception inside an iteration fails the requests of that iteration (finish_reason
"error") and the loop goes on; it never kills the process.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Optional

import numpy as np

from conserve_jax.config import EngineConfig
from conserve_jax.engine_api import (EngineAPI, EngineStats, GenerationRequest, RequestStream,
                                     validate_prompt)
from conserve_jax.kv.checkpointer import KVCheckpointer
from conserve_jax.kv.kv_manager import KVManager
from conserve_jax.runtime.kv_transfer import KVTransfer
from conserve_jax.output_delivery import OutputDelivery
from conserve_jax.output_processor import OutputProcessor
from conserve_jax.runtime.compile_cache import enable_compilation_cache
from conserve_jax.scheduling.latency_cache import load_or_profile
from conserve_jax.scheduling.policies import make_policy
from conserve_jax.scheduling.scheduler import Scheduler
from conserve_jax.request import Sequence

log = logging.getLogger(__name__)


class Engine(EngineAPI):
    def __init__(self, config: EngineConfig, loaded=None, warmup: Optional[bool] = None) -> None:
        warmup = config.warmup if warmup is None else warmup
        enable_compilation_cache(config.compilation_cache_dir)
        if loaded is None:
            from conserve_jax.models.loader import load_model
            loaded = load_model(config.model, seed=config.seed)
        from conserve_jax.runtime.model_runner import ModelRunner

        self.config = config
        self.model_config = loaded.config
        self._tokenizer = loaded.tokenizer
        self._max_model_len = min(config.max_model_len, loaded.config.max_position_embeddings)
        self.runner = ModelRunner(loaded.config, loaded.params, config)
        if warmup:
            self.runner.warmup()
        self.kv = KVManager(self.runner.num_blocks, config.cache.block_size)
        cache_tokens = self.kv.capacity * config.cache.block_size
        if cache_tokens < self._max_model_len:  # one request must always fit on its own
            log.warning("KV cache holds %d tokens: max_model_len lowered from %d",
                        cache_tokens, self._max_model_len)
            self._max_model_len = cache_tokens
        self.policy = make_policy(config, lambda: load_or_profile(self.runner, config))
        self.scheduler = Scheduler(config, self.kv, self.policy)
        self.checkpointer = None
        if self.policy.checkpointing:
            transfer = KVTransfer(self.runner)
            self.checkpointer = KVCheckpointer(transfer, config.cache.host_pool_bytes)
            self.scheduler.on_evict = self._kept_on_host
            self.scheduler.on_remove = self.checkpointer.release
            if warmup:
                transfer.warmup()
        self.outputs = OutputProcessor(self._tokenizer, self._max_model_len)
        self.delivery = OutputDelivery(self.outputs, self._stop_string_found)
        self._rng = np.random.default_rng(config.seed)
        self._lock = threading.Condition()
        self._intake: list[Sequence] = []
        self._ids_in_use: set[str] = set()  # request ids submitted and not finished (_lock)
        self._cancels: list[str] = []
        self._stopped: list[str] = []  # ended by a stop string on the output thread
        self._seqs: dict[str, Sequence] = {}  # step-loop thread only
        self._snapshot = EngineStats()  # published by the step loop, read under _lock
        self._in_engine = 0  # requests submitted and not yet finished (under _lock)
        self._accepting = True
        self._stop = False
        self._history: collections.deque = collections.deque(maxlen=512)  # (t, online, offline)
        self._totals = [0, 0, 0, 0]  # generated online/offline, prefilled online/offline
        self._iterations = 0
        self._thread = threading.Thread(target=self._loop, name="engine-step-loop", daemon=True)
        self._thread.start()

    # ---- EngineAPI ----------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def submit(self, request: GenerationRequest) -> RequestStream:
        validate_prompt(request.prompt_token_ids, self.vocab_size, self._max_model_len)
        request.sampling.validate(self.config.max_logprobs, self.vocab_size)
        if not self.policy.accepts(request):
            raise ValueError(f"policy {self.policy.name} does not accept "
                             f"{request.request_class.value} requests")
        stream = RequestStream(request.request_id)
        seed = request.sampling.seed
        if seed is None:
            seed = int(self._rng.integers(0, 2**31 - 1))
        ids = [int(t) for t in request.prompt_token_ids]
        seq = Sequence(request, stream, seed, token_ids=list(ids), prompt_len=len(ids))
        with self._lock:
            if not self._accepting:
                raise RuntimeError("the engine is shutting down")
            if request.request_id in self._ids_in_use:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self._ids_in_use.add(request.request_id)
            self._in_engine += 1
            self._intake.append(seq)
            self._lock.notify_all()
        return stream

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.append(request_id)
            self._lock.notify_all()

    def stats(self) -> EngineStats:
        """The step loop's latest snapshot, with token rates over the last 10 s."""
        with self._lock:
            snap = self._snapshot
            hist = list(self._history)
        now = time.monotonic()
        recent = [h for h in hist if now - h[0] <= 10.0]
        span = max(1e-9, now - recent[0][0]) if len(recent) > 1 else 1.0
        return dataclasses.replace(
            snap, online_tokens_per_s=sum(h[1] for h in recent) / span if recent else 0.0,
            offline_tokens_per_s=sum(h[2] for h in recent) / span if recent else 0.0)

    def _publish_stats(self) -> None:
        """Step-loop thread: snapshot scheduler, KV and pool state for other threads."""
        sch, kv, c = self.scheduler, self.kv, self.scheduler.counters
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
            evictions=c.evictions, recomputed_tokens=c.recomputed_tokens,
            restored_tokens=c.restored_tokens, iterations=self._iterations)
        if self.checkpointer is not None:
            st.host_pool_slots_total = self.checkpointer.pool.num_slots
            st.host_pool_slots_used = self.checkpointer.pool.num_used
        with self._lock:
            self._snapshot = st

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._in_engine:
                    break
            time.sleep(0.02)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=30)
        self.delivery.close()
        if self.checkpointer is not None:
            self.checkpointer.close()

    # ---- step loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._intake and not self._cancels \
                        and not self._stopped and not self.scheduler.has_work:
                    self._lock.wait(timeout=0.5)
                if self._stop:
                    break
                new, self._intake = self._intake, []
                cancels, self._cancels = self._cancels, []
                stopped, self._stopped = self._stopped, []
            for seq in new:
                self._seqs[seq.request_id] = seq
                self.delivery.register(seq.request, seq.stream, seq.prompt_len)
                self.scheduler.add(seq)
                self.policy.on_arrival(seq)
            for rid in stopped:  # the output thread already ended the stream
                if rid in self._seqs:
                    self._finish(self._seqs[rid], "stop")
            for rid in cancels:
                if rid in self._seqs:
                    self._finish(self._seqs[rid], "cancelled")
            if self.scheduler.has_work:
                self._iterate()
            self._publish_stats()
        for seq in list(self._seqs.values()):
            self._finish(seq, "cancelled")
        self._publish_stats()

    def _iterate(self) -> None:
        step = self.scheduler.schedule()
        if step.empty:
            time.sleep(0.001)  # nothing fits now (e.g. memory); new intake may change that
            return
        try:
            for rid, blocks in step.restores:
                self.checkpointer.restore(rid, blocks)
            t0 = time.perf_counter()
            result = self.runner.execute(step.plan, self.policy.safepoint(step, self))
            elapsed = time.perf_counter() - t0
        except Exception as e:  # report, fail the iteration's requests, keep serving
            log.exception("iteration failed")
            for e_ in step.entries:
                self._finish(e_.seq, "error", error=f"{type(e).__name__}: {e}")
            return
        if result is None:
            self.scheduler.abandon(step)
            self.policy.on_abandoned(step, self)
            return
        self.policy.on_step_done(step, elapsed, self)
        sampled = self.scheduler.commit(step, result)
        if self.checkpointer is not None:
            self.checkpointer.checkpoint_new_blocks(
                [(e.seq.request_id, self.kv.blocks(e.seq.request_id), e.seq.num_computed)
                 for e in step.entries if not e.seq.online])
        counts = [0, 0, 0, 0]
        for e in step.entries:
            if not e.decode:
                counts[2 if e.seq.online else 3] += e.num_tokens
        for seq, tok in sampled:
            counts[0 if seq.online else 1] += 1
            reason = self.outputs.token_finish_reason(seq.request, tok.token, seq.num_generated,
                                                      len(seq.token_ids))
            self.delivery.token(seq.request_id, tok, reason, *self._timings(seq))
            if reason is not None:
                self._finish(seq, reason, notify=False)
        self._iterations += 1
        self._totals = [a + b for a, b in zip(self._totals, counts)]
        with self._lock:
            self._history.append((time.monotonic(), counts[0], counts[1]))

    def compiled_count(self) -> int:
        """Executables compiled so far by the runner and the checkpointer."""
        n = self.runner.compiled_count()
        if self.checkpointer is not None:
            n += self.checkpointer.transfer.compiled_count()
        return n

    def _kept_on_host(self, seq: Sequence) -> int:
        """Eviction hook: tokens of `seq` whose KV is safely on host (the rest recompute)."""
        return self.checkpointer.kept_tokens(seq.request_id, seq.num_computed,
                                             len(seq.token_ids))

    def earliest_online_arrival(self):
        """(sequence, arrival time) of the oldest online request not yet scheduled, or None.
        Called by safepoints on the step-loop thread."""
        with self._lock:
            cands = [s for s in self._intake if s.online]
        cands += list(self.scheduler.waiting_online)
        if not cands:
            return None
        s = min(cands, key=lambda s: s.arrival)
        return s, s.arrival

    def _stop_string_found(self, request_id: str) -> None:
        """Output thread: a stop string ended the request's stream; stop the sequence."""
        with self._lock:
            self._stopped.append(request_id)
            self._lock.notify_all()

    @staticmethod
    def _timings(seq: Sequence) -> tuple[Optional[float], Optional[float]]:
        """(TTFT, mean TPOT) of a sequence so far, for its final output."""
        if seq.first_token_time is None:
            return None, None
        tpot = None
        if seq.num_generated > 1 and seq.last_token_time is not None:
            tpot = (seq.last_token_time - seq.first_token_time) / (seq.num_generated - 1)
        return seq.first_token_time - seq.arrival, tpot

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None,
                notify: bool = True) -> None:
        """Step-loop thread: drop the sequence and free its KV; unless `notify` is False
        (its last token already carried the finish), tell the output thread to end the
        stream."""
        known = self._seqs.pop(seq.request_id, None) is not None
        self.scheduler.remove(seq)
        self.policy.on_finished(seq)
        if not known:
            return
        if notify:
            self.delivery.finish(seq.request_id, reason, error, *self._timings(seq))
        with self._lock:
            self._ids_in_use.discard(seq.request_id)
            self._in_engine -= 1
