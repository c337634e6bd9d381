"""Engine: the step loop that ties scheduler, runner and output streams together.

Threading contract: `submit`, `cancel`, `stats` and `shutdown` may be called from any
thread; they only touch the intake queue (under `_lock`) and the published stats snapshot
(`StepAccounting`, under its own lock) and wake the loop. Everything else — scheduler, KV
bookkeeping, runner, caches — belongs to the single step-loop thread started by the
constructor, which publishes an immutable `EngineStats` snapshot after every pass, and
hands each committed iteration's record to the iteration listeners
(`EngineAPI.add_iteration_listener`). The token counts, totals and the snapshot are kept
by `StepAccounting` (step_accounting.py). Detokenization, stop strings and delivery to
request streams run on the output thread (`OutputDelivery`), off the step loop.
Failures follow `StepGuard`: an exception anywhere in an iteration fails (or, if nothing
was committed, retries once) only the requests of that iteration; a loop that keeps
failing dies, ending every stream with "engine stopped" and setting `failure`; so does, on
a multi-process leader, a step stuck on a hung peer (runtime/step_watchdog.py).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import numpy as np

from conserve_jax.config import EngineConfig
from conserve_jax.engine_api import (EngineAPI, EngineStats, GenerationRequest,
                                     RequestStream, urgent_ranks,
                                     validate_expected_output_tokens, validate_prompt)
from conserve_jax.kv.kv_manager import KVManager
from conserve_jax.kv.persist import SavedRequest
from conserve_jax.kv.prefix_hash import root_key
from conserve_jax.runtime.kv_replica import make_checkpointer
from conserve_jax.engine.output_delivery import OutputDelivery
from conserve_jax.engine.offline_suspension import OfflineSuspension
from conserve_jax.engine.output_processor import OutputProcessor
from conserve_jax.engine.startup import StartupProgress, load_checked
from conserve_jax.engine.step_accounting import StepAccounting, final_stats
from conserve_jax.runtime import distributed
from conserve_jax.runtime.compile_cache import enable_compilation_cache
from conserve_jax.runtime.step_watchdog import NO_WATCHDOG, IdleProbe, StepWatchdog
from conserve_jax.scheduling.latency_cache import load_or_profile
from conserve_jax.scheduling.policies import make_policy, uses_checkpointing
from conserve_jax.scheduling.scheduler import Scheduler
from conserve_jax.request import Sequence
from conserve_jax.engine.step_guard import ENGINE_STOPPED, ITERATION_FAILED, StepGuard, end_stream

log = logging.getLogger(__name__)


class Engine(EngineAPI):
    def __init__(self, config: EngineConfig, loaded=None, warmup: Optional[bool] = None,
                 startup: Optional[StartupProgress] = None) -> None:
        """`startup` reports the start-up stages (default: INFO log lines, no bars)."""
        config = distributed.start(config)  # before any JAX work; resolves a multi-process tp
        warmup = config.warmup if warmup is None else warmup
        startup = startup if startup is not None else StartupProgress()
        enable_compilation_cache(config.compilation_cache_dir)
        from conserve_jax.runtime.pipeline_leader import make_runner
        checkpointing = uses_checkpointing(config.policy)
        loaded = load_checked(config, loaded, checkpointing, startup)

        self.config = config
        self.model_config = loaded.config
        self._tokenizer = loaded.tokenizer
        self._max_model_len = min(config.max_model_len, loaded.config.max_position_embeddings)
        self.runner = make_runner(loaded.config, loaded.params, config)  # pp: a stage
        if warmup:
            what = (f"{len(self.runner.buckets.tokens)} token buckets x "
                    f"{len(set(self.runner.fast_groups + self.runner.safepoint_groups))} "
                    "layer-group sizes, then the sampler")
            with startup.compiling(what, len(self.runner.buckets.layer_shapes())) as progress:
                self.runner.warmup(progress=progress)
        self.kv = KVManager(self.runner.num_blocks, config.cache.block_size,
                            prefix_caching=config.enable_prefix_caching)
        cache_tokens = self.kv.capacity * config.cache.block_size
        if cache_tokens < self._max_model_len:  # one request must always fit on its own
            log.warning("KV cache holds %d tokens: max_model_len lowered from %d",
                        cache_tokens, self._max_model_len)
            self._max_model_len = cache_tokens
        latency_models = []

        def latency_model():
            latency_models.append(load_or_profile(self.runner, config, startup.profiled))
            return latency_models[-1]
        self.policy = make_policy(config, latency_model, self.online_waiting)
        if latency_models:
            startup.latency_model_ready()
        self.scheduler = Scheduler(config, self.kv, self.policy)
        self.checkpointer = None
        if self.policy.checkpointing and checkpointing:
            # multi-process: each process checkpoints its own heads (runtime/kv_replica.py)
            self.checkpointer = make_checkpointer(self.runner, config.cache.host_pool_bytes,
                                                  warmup)
            self.scheduler.on_evict = self._kept_on_host
            self.scheduler.on_remove = self.checkpointer.release
            self.scheduler.host_blocks = self.checkpointer.saved_run
        self.suspension = OfflineSuspension(config, self.checkpointer, self.vocab_size,
                                             self._max_model_len)
        self.outputs = OutputProcessor(self._tokenizer, self._max_model_len)
        self.delivery = OutputDelivery(self.outputs, self._stop_string_found)
        self._rng = np.random.default_rng(config.seed)
        self._roots: dict = {}  # cache salt -> prefix-cache key root
        self._lock = threading.Condition()
        self._intake: list[Sequence] = []
        self._ids_in_use: set[str] = set()  # request ids submitted and not finished (_lock)
        self._cancels: list[str] = []
        self._urgent: dict = {}  # set_urgent's latest ranks (replaced whole)
        self._resumes: dict[str, SavedRequest] = {}  # submitted with saved state (_lock)
        self._suspends: list[tuple[list[str], dict, threading.Event]] = []  # (_lock)
        self._stopped: list[str] = []  # ended by a stop string on the output thread
        self._seqs: dict[str, Sequence] = {}  # step-loop thread only
        self._in_engine = 0  # requests submitted and not yet finished (under _lock)
        self._accepting = True
        self._stop = False
        self.accounting = StepAccounting()  # token counts, totals, the stats snapshot
        # multi-process: a failed step may have left followers inside a collective (or one
        # died): the run cannot go on, so the first failure stops the loop
        self._guard = StepGuard(max_consecutive=1) if config.num_processes > 1 else StepGuard()
        self._failure: Optional[str] = None
        self._cur_step, self._committing = None, False  # what a failure can be blamed on
        self._cur_entries: list = []  # its entries whose results count
        self._watchdog = self._idle = NO_WATCHDOG  # multi-process: a hung peer stops us
        if config.num_processes > 1:
            self._start_watchdog(config.step_bound_s)
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

    def submit(self, request: GenerationRequest,
               resume: Optional[SavedRequest] = None) -> RequestStream:
        """Queue a request. With `resume` (an offline request's state saved by
        `suspend_offline`, possibly by an earlier process) it continues from there: its
        stream starts with everything generated before, as if never interrupted."""
        validate_prompt(request.prompt_token_ids, self.vocab_size, self._max_model_len)
        request.sampling.validate(self.config.max_logprobs, self.vocab_size)
        validate_expected_output_tokens(request.expected_output_tokens)
        if request.cache_salt is not None and not isinstance(request.cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(request.cache_salt).__name__}")
        if not self.policy.accepts(request):
            raise ValueError(f"policy {self.policy.name} does not accept "
                             f"{request.request_class.value} requests")
        stream = RequestStream(request.request_id)
        seed = request.sampling.seed
        if seed is None:
            seed = int(self._rng.integers(0, 2**31 - 1))
        ids = [int(t) for t in request.prompt_token_ids]
        if resume is not None:
            seed = self.suspension.check(request, resume)
        prior = list(resume.generated_ids) if resume is not None else []
        seq = Sequence(request, stream, seed, token_ids=ids + prior, prompt_len=len(ids),
                       cache_root=self._cache_root(request.cache_salt))
        with self._lock:
            if self._failure is not None:
                raise RuntimeError(ENGINE_STOPPED)
            if not self._accepting:
                raise RuntimeError("the engine is shutting down")
            if request.request_id in self._ids_in_use:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self._ids_in_use.add(request.request_id)
            if resume is not None:
                self._resumes[request.request_id] = resume
            self._in_engine += 1
            self._intake.append(seq)
            self._lock.notify_all()
        return stream

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.append(request_id)
            self._lock.notify_all()

    def set_urgent(self, request_ids) -> None:
        self._urgent = urgent_ranks(request_ids)  # one reference swap: read by the step loop

    def stats(self) -> EngineStats:
        """The step loop's latest snapshot, with token rates over the last 10 s."""
        return self.accounting.stats()

    def _publish_stats(self) -> None:
        """Step-loop thread: snapshot scheduler, KV and pool state for other threads."""
        self.accounting.publish(self.scheduler, self.kv, self.policy, self.checkpointer)

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
        self._watchdog.close()
        self.runner.close()  # a multi-process run's followers stop
        self.delivery.close()
        if self.checkpointer is not None:
            self.checkpointer.close()

    @property
    def failure(self) -> Optional[str]:
        return self._failure

    def checkpoint_layout(self) -> dict:
        """What a request saved by `suspend_offline` depends on (`OfflineSuspension.layout`)."""
        return self.suspension.layout()

    def suspend_offline(self, request_ids: list[str],
                        timeout_s: float = 60.0) -> dict[str, SavedRequest]:
        """Any thread. Stop the given unfinished offline requests at the next iteration
        boundary and return their saved state (token state + KV blocks already on host),
        keyed by request id; their streams end "cancelled". Requests that are unknown,
        online or have nothing worth saving are left alone. {} once the engine stops."""
        job = (list(request_ids), {}, threading.Event())
        with self._lock:
            if self._stop or self._failure is not None:
                return {}
            self._suspends.append(job)
            self._lock.notify_all()
        if not job[2].wait(timeout_s):
            log.warning("suspend_offline timed out after %.0f s", timeout_s)
            return {}
        return job[1]

    # ---- step loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._intake and not self._cancels \
                            and not self._stopped and not self._suspends \
                            and not self.scheduler.has_work and self._idle.wait_s() > 0:
                        self._lock.wait(timeout=min(0.5, self._idle.wait_s()))
                    if self._stop or self._failure is not None:  # (watchdog: `_die`)
                        break
                    new, self._intake = self._intake, []
                    cancels, self._cancels = self._cancels, []
                    stopped, self._stopped = self._stopped, []
                    suspends, self._suspends = self._suspends, []
                    resumes = {s.request_id: self._resumes.pop(s.request_id)
                               for s in new if s.request_id in self._resumes}
                self._guarded(False, self._take_intake, new, stopped, cancels, resumes)
                for job in suspends:
                    self._guarded(False, self._suspend, *job)
                if self.scheduler.has_work:
                    self._cur_step, self._committing = None, False
                    with self._watchdog.step():
                        self._guarded(True, self._iterate)
                    self._idle.worked()
                else:  # multi-process, idle: does every process still answer?
                    self._guarded(False, self._idle.run_if_due)
                self._publish_stats()
        except BaseException as e:  # the loop is broken: fail everything, say so
            log.critical("engine step loop stopped after %d failed iterations in a row",
                         self._guard.consecutive, exc_info=e)
            self._die(f"step loop stopped: {type(e).__name__}")
            return
        for seq in list(self._seqs.values()):
            self._finish(seq, "cancelled")
        with self._lock:
            suspends, self._suspends = self._suspends, []
        for _, _, done in suspends:  # asked too late: nothing left to save
            done.set()
        self._publish_stats()

    def _suspend(self, request_ids: list[str], out: dict, done: threading.Event) -> None:
        """Step-loop thread: export and end the requests `suspend_offline` asked for."""
        try:
            for rid in request_ids:
                seq = self._seqs.get(rid)
                if self.suspension.worth_saving(seq):
                    out[rid] = self.suspension.export(seq, self.kv.blocks(rid))
                    self._finish(seq, "cancelled")
        except Exception:
            log.exception("suspending offline requests failed")
        finally:
            done.set()

    def _take_intake(self, new: list[Sequence], stopped: list[str], cancels: list[str],
                     resumes: dict) -> None:
        for seq in new:
            self._seqs[seq.request_id] = seq
            self.delivery.register(seq.request, seq.stream, seq.prompt_len,
                                   seq.token_ids[seq.prompt_len:])
            try:
                if seq.request_id in resumes:
                    self.suspension.take(seq, resumes[seq.request_id])
                self.scheduler.add(seq)
                self.policy.on_arrival(seq)
            except Exception:
                log.exception("admitting %s failed", seq.request_id)
                self._fail(seq, ITERATION_FAILED)
        for rid in stopped:  # the output thread already ended the stream
            if rid in self._seqs:
                self._finish(self._seqs[rid], "stop")
        for rid in cancels:
            if rid in self._seqs:
                self._finish(self._seqs[rid], "cancelled")

    def _guarded(self, whole_iteration: bool, fn, *args) -> None:
        """Run one part of an iteration under the failure policy (module docstring); only
        a whole iteration's success resets the count of failures in a row."""
        try:
            fn(*args)
        except Exception:
            log.exception("engine iteration failed")
            step, rollback = self._cur_step, not self._committing
            self._cur_step = None
            if step is not None and rollback:
                try:
                    self.scheduler.abandon(step)
                except Exception:
                    log.exception("rolling back the failed step failed")
                    rollback = False
            for e in (self._cur_entries if step is not None else ()):
                if e.seq.request_id not in self._seqs:
                    continue  # already finished in this iteration
                if not rollback or self._guard.strike(e.seq.request_id):
                    self._fail(e.seq, ITERATION_FAILED)
            if self._guard.failed():
                raise
        else:
            if whole_iteration:
                self._guard.succeeded()
            self._cur_step = None

    def _fail(self, seq: Sequence, error: str) -> None:
        """End `seq` with an error; if the engine's own bookkeeping fails, still end its stream."""
        try:
            self._finish(seq, "error", error=error)
        except Exception:
            log.exception("finishing %s failed", seq.request_id)
            if self._seqs.pop(seq.request_id, None) is not None:
                self.delivery.finish(seq.request_id, "error", error)
                with self._lock:
                    self._ids_in_use.discard(seq.request_id)
                    self._in_engine -= 1

    def _start_watchdog(self, timeout_s: float) -> None:
        """Bound every step, probe when idle (runtime/step_watchdog.py; multi-process)."""
        self._watchdog = StepWatchdog(timeout_s, self._die).start()
        self.runner.first_calls.watch = self._watchdog
        self._idle = IdleProbe(timeout_s / 2, self.runner.ping, self._watchdog)

    def _die(self, reason: str) -> None:
        """The engine is dead: refuse work, end every stream with ENGINE_STOPPED, set
        `failure`. Called on the step-loop thread, or on the step watchdog's while the step
        thread is stuck in a collective (the loop stops if it returns). First call acts."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = reason
            self._accepting = False
            pending, self._intake = self._intake, []
            suspends, self._suspends = self._suspends, []
            self._ids_in_use.clear()
            self._in_engine = 0
        for seq in pending:  # never registered with the output thread
            end_stream(seq.stream, seq.request_id, ENGINE_STOPPED, seq.prompt_len)
        for rid in list(self._seqs):
            self.delivery.finish(rid, "error", ENGINE_STOPPED)
        self._seqs.clear()
        for _, _, done in suspends:  # nothing can be saved from a dead loop
            done.set()

    def _iterate(self) -> None:
        t_start = time.perf_counter()
        parked = self._resumable()
        if parked is not None:  # continue the preempted offline iteration at its layer
            step = self._cur_step = parked.step
            entries = self._cur_entries = parked.kept_entries
            sp = self.policy.safepoints(step, parked.handle.layers_done)
            result = self.runner.resume(parked.handle, sp and sp.check)
        else:
            self.scheduler.urgent = self._urgent
            step = self._cur_step = self.scheduler.schedule()
            entries = self._cur_entries = step.entries
            if step.empty:
                time.sleep(0.001)  # nothing fits now (e.g. memory); new intake may change that
                return
            for rid, blocks, first in step.restores:  # failures up to the commit: retried
                self.checkpointer.restore(rid, blocks, first)  # by `_guarded`
            sp = self.policy.safepoints(step)
            if sp is not None and step.restores and sp.check(0):
                # an online request arrived during the restores: it goes first, before any
                # layer runs (the restored KV stays; nothing is discarded)
                self.scheduler.abandon(step, ran=False)
                self.policy.on_abandoned(step)
                return
            t0 = time.perf_counter()
            result = self.runner.execute(step.plan, sp and sp.check)
            if result is not None:  # (a resumed iteration's time is partial: not observed)
                self.policy.on_step_done(step, time.perf_counter() - t0)
        if result is None:
            handle = self.runner.take_suspended()
            if self.policy.resumes_abandoned and handle is not None \
                    and any(not e.decode for e in step.entries):
                # keep the prefill chunks' work; decodes (a token each) are cut loose
                handle = self.runner.detach_decodes(handle, range(len(step.plan.decodes)))
                self.scheduler.park(step, handle)
            else:
                self.scheduler.abandon(step)
            self.policy.on_abandoned(step)
            return
        self._committing = True  # from here a failure cannot be rolled back
        sampled = self.scheduler.commit(step, result)
        if self.checkpointer is not None:
            self.checkpointer.checkpoint_new_blocks(
                [(e.seq.request_id, self.kv.blocks(e.seq.request_id), e.seq.num_computed,
                  e.seq.prefix_hit_tokens // self.kv.block_size)
                 for e in entries if not e.seq.online])
        for seq, tok in sampled:
            reason = self.outputs.token_finish_reason(seq.request, tok.token, seq.num_generated,
                                                      len(seq.token_ids))
            self.delivery.token(seq.request_id, tok, reason, final_stats(seq))
            if reason is not None:
                self._finish(seq, reason, notify=False)
        self._iteration_done(self.accounting.record(
            entries, sampled, None if parked is not None else time.perf_counter() - t_start))

    def _resumable(self):
        """The parked (preempted) iteration if it may continue now: no online work is
        running or waiting (online work always goes first; the parked sequences wait)."""
        sch = self.scheduler
        if sch.parked is None or sch.waiting_online or any(s.online for s in sch.running):
            return None
        return sch.take_parked()

    def _cache_root(self, salt: Optional[str]) -> bytes:
        """The prefix-cache key root of requests with `salt` (any thread; pure, memoized)."""
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = root_key(self.config.kv_content(), salt)
        return root

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

    def online_waiting(self) -> list:
        """Online requests submitted but not running yet (intake, then the scheduler's
        waiting queue). Called by the policy's safepoint checks on the step-loop thread."""
        with self._lock:
            cands = [s for s in self._intake if s.online]
        return cands + list(self.scheduler.waiting_online)

    def _stop_string_found(self, request_id: str) -> None:
        """Output thread: a stop string ended the request's stream; stop the sequence."""
        with self._lock:
            self._stopped.append(request_id)
            self._lock.notify_all()

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None,
                notify: bool = True) -> None:
        """Step-loop thread: drop the sequence and free its KV; unless `notify` is False
        (its last token already carried the finish), tell the output thread to end the
        stream."""
        self._guard.forget(seq.request_id)
        known = self._seqs.pop(seq.request_id, None) is not None
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        self.policy.on_finished(seq)
        if not known:
            return
        if notify:
            self.delivery.finish(seq.request_id, reason, error, final_stats(seq))
        with self._lock:
            self._ids_in_use.discard(seq.request_id)
            self._in_engine -= 1
