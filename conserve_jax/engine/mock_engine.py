"""`MockEngine`: a deterministic, CPU-instant `EngineAPI` for tests of the serving layer.

It echoes the prompt: output token k is `prompt[k % len(prompt)]`, one token per request
per step, so results are known in advance. `token_delay_s` (mutable at any time) sleeps
between steps so cancellation, deadlines and crashes can be tested mid-generation.
Waiting requests are admitted online first, then the offline ones `set_urgent` names, then
the rest in arrival order. It keeps a pool of "KV blocks": a request reserves
`ceil(min(prompt + max_tokens, max_model_len) / block_size)` blocks when admitted and frees
them when it finishes or is cancelled, so tests can assert through `stats()` that
cancellation frees KV.

Prefix caching, a deterministic stand-in for the engine's (`enable_prefix_caching`, on by
default): when a request is admitted, its prompt's full blocks are remembered under a key
chained from the request's `cache_salt` and the block's tokens (an LRU of at most
`num_blocks` keys; the least recent is dropped, counted as an eviction). A later request
of the same salt whose prompt starts with remembered blocks reports them as cached:
`num_cached_tokens` on its final delta = the leading remembered full blocks covering at
most all but its last prompt token, times `block_size` (0 with the cache off). `stats()`
counts queries and hits by class, the remembered blocks as `kv_blocks_cached_free`, and the
evictions. Nothing about generation changes.

Accounting as the engine's: a request's first step also "prefills" its prompt (the tokens
not found cached), counted in the prefill totals; after each step, iteration listeners get
that step's prompt and generated tokens by class (`IterationStats`, called after the lock
is released); the final delta carries `queue_time_s`, submit to admission.

Threading: one step-loop thread (started by the constructor) owns generation; `submit`,
`cancel`, `stats` and `shutdown` may be called from any thread. All request state is
guarded by `self._lock`; outputs go through each request's thread-safe `RequestStream`.

Failures follow `StepGuard` as in the real engine: an exception while producing one
request's token fails that request only; an exception elsewhere in a step (admission,
bookkeeping) is retried, and `max_consecutive` in a row kill the loop, which ends every
stream with "engine stopped" and sets `failure`. `fail_after_steps` (tests, `serve
--mock-fail-after-steps`) makes every step after the first N raise, to exercise that.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from conserve_jax.engine_api import (EngineAPI, EngineStats, GenerationRequest,
                                     IterationStats, RequestClass, RequestOutput, RequestStream,
                                     TokenLogprob, urgent_ranks, validate_prompt)
from conserve_jax.engine.step_guard import ENGINE_STOPPED, ITERATION_FAILED, StepGuard, end_stream

log = logging.getLogger(__name__)

PAD, BOS, EOS = 0, 1, 2
_BYTE0 = 3  # token id of byte 0


class MockTokenizer:
    """Byte-level tokenizer: byte b is token b + 3; 0 pad, 1 bos, 2 eos. No BOS is added."""

    has_chat_template = True

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size < _BYTE0 + 256:
            raise ValueError("vocab_size must be >= 259")
        self.vocab_size = vocab_size
        self.eos_token_ids = (EOS,)
        self.bos_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + _BYTE0 for b in text.encode("utf-8")]

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        data = bytes(t - _BYTE0 for t in token_ids if _BYTE0 <= t < _BYTE0 + 256)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text)


@dataclass
class _Req:
    request: GenerationRequest
    stream: RequestStream
    arrival: float
    generated: list[int] = field(default_factory=list)
    text_emitted: str = ""
    blocks: int = 0
    first_token_at: Optional[float] = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    admitted_at: Optional[float] = None  # its queue time ends here


class MockEngine(EngineAPI):
    """Deterministic echo engine; see the module docstring."""

    def __init__(self, token_delay_s: float = 0.0, max_num_seqs: int = 32,
                 max_model_len: int = 2048, vocab_size: int = 512, num_blocks: int = 4096,
                 block_size: int = 16, max_logprobs: int = 20,
                 fail_after_steps: Optional[int] = None,
                 enable_prefix_caching: bool = True) -> None:
        self.token_delay_s = token_delay_s
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_logprobs = max_logprobs
        self._max_model_len = max_model_len
        self._tokenizer = MockTokenizer(vocab_size)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: collections.deque[_Req] = collections.deque()
        self._running: dict[str, _Req] = {}
        self._urgent: dict = {}  # set_urgent: offline ids admitted first, by rank
        self._free_blocks = num_blocks
        self._accepting = True
        self._stop = False
        self._paused = False  # pause(): the loop neither admits nor steps
        self._tokens = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        self._prefilled = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        self._recent: collections.deque = collections.deque()  # (time, online, offline)
        self._iterations = 0
        self.submitted = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        self.peak_offline = 0  # most offline requests ever inside the engine at once
        self.fail_after_steps = fail_after_steps
        self.enable_prefix_caching = enable_prefix_caching
        self._cached: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # LRU
        self._cache_queries = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        self._cache_hits = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        self._cache_evictions = 0
        self._guard = StepGuard()
        self._failure: Optional[str] = None
        self._thread = threading.Thread(target=self._loop, name="mock-engine", daemon=True)
        self._thread.start()

    # ---- EngineAPI -------------------------------------------------------------------
    @property
    def tokenizer(self) -> MockTokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    def submit(self, request: GenerationRequest) -> RequestStream:
        validate_prompt(request.prompt_token_ids, self.vocab_size, self.max_model_len)
        request.sampling.validate(self.max_logprobs, self.vocab_size)
        stream = RequestStream(request.request_id)
        with self._lock:
            if self._failure is not None:
                raise RuntimeError(ENGINE_STOPPED)
            if not self._accepting:
                raise RuntimeError("engine is shutting down")
            if request.request_id in self._running or any(
                    r.request.request_id == request.request_id for r in self._waiting):
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            req = _Req(request, stream, time.monotonic())
            if request.request_class is RequestClass.ONLINE:
                # online first: ahead of every waiting offline request
                pos = sum(1 for r in self._waiting if r.request.request_class is RequestClass.ONLINE)
                self._waiting.insert(pos, req)
            else:
                self._waiting.append(req)
            self.submitted[request.request_class] += 1
            self._note_peak()
        self._wake.set()
        return stream

    def cancel(self, request_id: str) -> None:
        with self._lock:
            req = self._running.pop(request_id, None)
            if req is None:
                for r in self._waiting:
                    if r.request.request_id == request_id:
                        req = r
                        self._waiting.remove(r)
                        break
            if req is None:
                return
            self._finish(req, "cancelled")

    def stats(self) -> EngineStats:
        now = time.monotonic()
        with self._lock:
            s = EngineStats(kv_blocks_total=self.num_blocks, iterations=self._iterations,
                            online_tokens_total=self._tokens[RequestClass.ONLINE],
                            offline_tokens_total=self._tokens[RequestClass.OFFLINE],
                            online_prefill_tokens_total=self._prefilled[RequestClass.ONLINE],
                            offline_prefill_tokens_total=self._prefilled[RequestClass.OFFLINE],
                            prefix_cache_queries_online=self._cache_queries[RequestClass.ONLINE],
                            prefix_cache_queries_offline=self._cache_queries[RequestClass.OFFLINE],
                            prefix_cache_hits_online=self._cache_hits[RequestClass.ONLINE],
                            prefix_cache_hits_offline=self._cache_hits[RequestClass.OFFLINE],
                            kv_blocks_cached_free=len(self._cached),
                            prefix_cache_evictions=self._cache_evictions)
            for r in self._waiting:
                if r.request.request_class is RequestClass.ONLINE:
                    s.online_waiting += 1
                else:
                    s.offline_waiting += 1
            for r in self._running.values():
                if r.request.request_class is RequestClass.ONLINE:
                    s.online_running += 1
                    s.kv_blocks_online += r.blocks
                else:
                    s.offline_running += 1
                    s.kv_blocks_offline += r.blocks
            recent = [x for x in self._recent if now - x[0] <= 5.0]
        if recent:
            span = max(now - recent[0][0], 1e-3)
            s.online_tokens_per_s = sum(x[1] for x in recent) / span
            s.offline_tokens_per_s = sum(x[2] for x in recent) / span
        return s

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        with self._lock:
            self._accepting = False
        end = time.monotonic() + drain_timeout_s
        while time.monotonic() < end:
            with self._lock:
                if not self._running and not self._waiting:
                    break
            time.sleep(0.01)
        with self._lock:
            for req in list(self._waiting) + list(self._running.values()):
                self._finish(req, "cancelled")
            self._waiting.clear()
            self._running.clear()
            self._stop = True
        self._wake.set()
        self._thread.join(timeout=5.0)

    @property
    def failure(self) -> Optional[str]:
        return self._failure

    def pause(self) -> None:
        """Stop stepping until `resume`: submitted requests wait, nothing is generated;
        every other call (submit, stats, cancel) goes on (a step under way finishes). For
        tests that need work held inside the engine without holding its lock (the batch
        runner reads `stats` at its deadline checks). Any thread."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        self._wake.set()

    # ---- step loop (engine thread) -----------------------------------------------------
    def _loop(self) -> None:
        while True:
            it = None
            if self._paused and not self._stop:  # (a bool: read without the lock)
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            with self._lock:
                if self._stop:
                    return
                try:
                    self._admit()
                    busy = bool(self._running)
                    if busy:
                        if self.fail_after_steps is not None and self._iterations >= self.fail_after_steps:
                            raise RuntimeError("injected step failure")
                        it = self._step()
                    self._guard.succeeded()
                except Exception as e:
                    log.exception("mock engine step failed")
                    if self._guard.failed():
                        self._die(e)
                        return
                    busy = True
            if it is not None:
                self._iteration_done(it)
            if busy:
                if self.token_delay_s > 0:
                    time.sleep(self.token_delay_s)
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def set_urgent(self, request_ids) -> None:
        """Urgent offline requests are admitted before other offline ones (after online),
        the lowest rank first."""
        with self._lock:
            self._urgent = urgent_ranks(request_ids)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_num_seqs:
            first = next((i for i, q in enumerate(self._waiting)
                          if q.request.request_class is RequestClass.ONLINE), None)
            if first is None:
                ranked = [(self._urgent[q.request.request_id], i)
                          for i, q in enumerate(self._waiting)
                          if q.request.request_id in self._urgent]
                first = min(ranked)[1] if ranked else 0
            req = self._waiting[first]
            r = req.request
            need = math.ceil(min(len(r.prompt_token_ids) + r.sampling.max_tokens,
                                 self.max_model_len) / self.block_size)
            if need > self._free_blocks:
                break
            del self._waiting[first]
            self._free_blocks -= need
            req.blocks = need
            req.admitted_at = time.monotonic()
            if self.enable_prefix_caching:
                self._prefix_lookup(req)
            self._running[r.request_id] = req

    def _prefix_lookup(self, req: _Req) -> None:
        """At admission: count the request's cached prompt prefix, remember its full
        blocks (caller holds the lock). See the module docstring."""
        r, bs = req.request, self.block_size
        prompt = r.prompt_token_ids
        key = hashlib.blake2b(repr(r.cache_salt).encode(), digest_size=16).digest()
        hit, counting = 0, True
        for b in range(len(prompt) // bs):
            key = hashlib.blake2b(key + repr(prompt[b * bs:(b + 1) * bs]).encode(),
                                  digest_size=16).digest()
            if counting and (b + 1) * bs <= len(prompt) - 1 and key in self._cached:
                hit += 1
            else:
                counting = False
            self._cached[key] = None
            self._cached.move_to_end(key)
        while len(self._cached) > self.num_blocks:
            self._cached.popitem(last=False)
            self._cache_evictions += 1
        req.cached_tokens = hit * bs
        self._cache_queries[r.request_class] += len(prompt)
        self._cache_hits[r.request_class] += req.cached_tokens

    def _die(self, exc: BaseException) -> None:
        """The loop is broken (caller holds the lock): end every stream, refuse work."""
        log.critical("mock engine step loop stopped", exc_info=exc)
        self._failure = f"step loop stopped: {type(exc).__name__}"
        self._accepting = False
        for req in list(self._waiting) + list(self._running.values()):
            end_stream(req.stream, req.request.request_id, ENGINE_STOPPED,
                       len(req.request.prompt_token_ids), len(req.generated))
        self._waiting.clear()
        self._running.clear()

    def _step(self) -> IterationStats:
        """One token for every running request (caller holds the lock); returns the step's
        record for the iteration listeners."""
        self._iterations += 1
        counts = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        prefill = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        for rid, req in list(self._running.items()):
            if not req.generated:  # its first step: the prompt's uncached tokens
                prefill[req.request.request_class] += \
                    len(req.request.prompt_token_ids) - req.cached_tokens
            try:
                self._step_one(rid, req, counts)
            except Exception:  # this request's own failure: fail it alone
                log.exception("mock engine: request %s failed", rid)
                if self._running.pop(rid, None) is not None:
                    self._finish(req, "error", RequestOutput(rid, error=ITERATION_FAILED))
        for cls, n in counts.items():
            self._tokens[cls] += n
            self._prefilled[cls] += prefill[cls]
        now = time.monotonic()
        self._recent.append((now, counts[RequestClass.ONLINE], counts[RequestClass.OFFLINE]))
        while self._recent and now - self._recent[0][0] > 5.0:
            self._recent.popleft()
        on, off = RequestClass.ONLINE, RequestClass.OFFLINE
        return IterationStats(online_prompt_tokens=prefill[on],
                              online_generation_tokens=counts[on],
                              offline_prompt_tokens=prefill[off],
                              offline_generation_tokens=counts[off])

    def _step_one(self, rid: str, req: _Req, counts: dict) -> None:
        """Produce one token for one running request (caller holds the lock)."""
        r, sp = req.request, req.request.sampling
        prompt = r.prompt_token_ids
        tok = prompt[len(req.generated) % len(prompt)]
        req.generated.append(tok)
        counts[r.request_class] += 1
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        full = self._tokenizer.decode(req.generated)
        if full.endswith("\ufffd"):
            full = req.text_emitted  # hold back an incomplete UTF-8 sequence
        delta, req.text_emitted = full[len(req.text_emitted):], full
        reason = None
        if tok in sp.stop_token_ids or (not sp.ignore_eos and tok in self._tokenizer.eos_token_ids):
            reason = "stop"
        elif any(s in full for s in sp.stop):
            reason = "stop"
        elif len(req.generated) >= sp.max_tokens or len(prompt) + len(req.generated) >= self.max_model_len:
            reason = "length"
        logprobs = []
        if sp.logprobs is not None:
            top = [((tok + i) % self.vocab_size, -0.1 - i) for i in range(sp.logprobs)]
            logprobs = [TokenLogprob(tok, -0.1, top)]
        out = RequestOutput(rid, [tok], delta, logprobs)
        if reason is None:
            req.stream.put(out)
        else:
            del self._running[rid]
            self._finish(req, reason, out)

    def _finish(self, req: _Req, reason: str, out: Optional[RequestOutput] = None) -> None:
        """Free the request's blocks and deliver its final delta (caller holds the lock and
        has removed it from the waiting/running sets)."""
        self._free_blocks += req.blocks
        req.blocks = 0
        out = out or RequestOutput(req.request.request_id)
        n = len(req.generated)
        now = time.monotonic()
        out.finished, out.finish_reason = True, reason
        out.prompt_tokens, out.completion_tokens = len(req.request.prompt_token_ids), n
        out.num_cached_tokens = req.cached_tokens
        if req.admitted_at is not None:
            out.queue_time_s = req.admitted_at - req.arrival
        if req.first_token_at is not None:
            out.ttft_s = req.first_token_at - req.arrival
            out.mean_tpot_s = (now - req.first_token_at) / (n - 1) if n > 1 else 0.0
        req.stream.put(out)

    def _note_peak(self) -> None:
        n = sum(1 for r in self._waiting if r.request.request_class is RequestClass.OFFLINE)
        n += sum(1 for r in self._running.values() if r.request.request_class is RequestClass.OFFLINE)
        self.peak_offline = max(self.peak_offline, n)
