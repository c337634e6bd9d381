"""`FakeClient`: an in-process stand-in for `conserve_jax.entrypoints.client.Client`.

It has the methods the load tester uses, with the same signatures, and emulates a server
by sleeping: `generate` waits `ttft_s`, then yields chunks of `chunk_size` tokens every
`itl_s * chunk_size` seconds (the first chunk carries one token). Offline batch items
complete one after another every `offline_item_s` seconds from submission. `stats()`
counts one preemption per online request started while an offline batch is unfinished;
each entry of `calls` records that decision as "during_batch", so tests can check the
count exactly instead of bounding a race.

Errors are `FakeRpcError` (a `grpc.RpcError` with `code()` and `details()`):
INVALID_ARGUMENT when prompt + max_tokens exceeds `max_context`, DEADLINE_EXCEEDED when
the call's `timeout` runs out, CANCELLED after the returned call's `cancel()`,
UNAVAILABLE for every `fail_every`-th request (1-based).
Thread-safe: one lock guards the counters and batches.
"""
from __future__ import annotations

import itertools
import threading
import time
from types import SimpleNamespace
from typing import Iterator, Optional

import grpc


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _FakeCall:
    """Iterator of chunks for one fake Generate call; `cancel()` ends it (the iteration
    then raises CANCELLED), as a gRPC streaming call does."""

    def __init__(self, client: "FakeClient", n_prompt: int, max_tokens: int, timeout) -> None:
        self._cancelled = threading.Event()
        self._it = self._run(client, n_prompt, max_tokens,
                             None if timeout is None else time.monotonic() + timeout)

    def __iter__(self) -> "_FakeCall":
        return self

    def __next__(self) -> SimpleNamespace:
        return next(self._it)

    def cancel(self) -> None:
        self._cancelled.set()

    def _sleep(self, s: float, deadline: Optional[float]) -> None:
        late = deadline is not None and time.monotonic() + s > deadline
        if late:
            s = max(0.0, deadline - time.monotonic())
        if self._cancelled.wait(s):
            raise FakeRpcError(grpc.StatusCode.CANCELLED, "cancelled by the client")
        if late:
            raise FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    def _run(self, c: "FakeClient", n_prompt: int, max_tokens: int,
             deadline: Optional[float]) -> Iterator[SimpleNamespace]:
        self._sleep(c.ttft_s, deadline)
        sent = 0
        while sent < max_tokens:
            k = 1 if sent == 0 else min(c.chunk_size, max_tokens - sent)
            if sent:
                self._sleep(c.itl_s * k, deadline)
            sent += k
            done = sent >= max_tokens
            yield SimpleNamespace(
                token_ids=[7] * k, text="x" * k, finished=done,
                finish_reason="length" if done else None,
                usage=SimpleNamespace(prompt_tokens=n_prompt, completion_tokens=sent))


class FakeClient:
    """See module doc. `Client(target, token=None, tls_ca=None)`-compatible constructor."""

    def __init__(self, target: str = "fake", token: Optional[str] = None,
                 tls_ca: Optional[str] = None, *, ttft_s: float = 0.02, itl_s: float = 0.005,
                 chunk_size: int = 1, offline_item_s: float = 0.01, max_context: int = 4096,
                 fail_every: Optional[int] = None) -> None:
        self.target, self.token, self.tls_ca = target, token, tls_ca
        self.ttft_s, self.itl_s, self.chunk_size = ttft_s, itl_s, max(1, chunk_size)
        self.offline_item_s, self.max_context, self.fail_every = offline_item_s, max_context, fail_every
        self._lock = threading.Lock()
        self._count = itertools.count(1)
        self._batches: dict[str, dict] = {}
        self.preemptions = 0
        self.calls: list[dict] = []
        self.closed = False

    # ---- online ---------------------------------------------------------------------
    def generate(self, prompt=None, *, token_ids=None, messages=None, ttft=None, tpot=None,
                 timeout=None, **sampling) -> _FakeCall:
        n = next(self._count)
        with self._lock:  # one decision per call, recorded with it: tests count exactly
            during = any(not self._finished(b) for b in self._batches.values())
            self.calls.append({"token_ids": token_ids, "ttft": ttft, "tpot": tpot,
                               "timeout": timeout, "during_batch": during, **sampling})
            self.preemptions += int(during)
        max_tokens = int(sampling.get("max_tokens", 16))
        if not token_ids and not prompt and not messages:
            raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "prompt: empty")
        if len(token_ids or ()) + max_tokens > self.max_context:
            raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "prompt: longer than context")
        if self.fail_every and n % self.fail_every == 0:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "fake failure")
        return self._stream(len(token_ids or ()), max_tokens, timeout)

    def _stream(self, n_prompt: int, max_tokens: int, timeout) -> "_FakeCall":
        return _FakeCall(self, n_prompt, max_tokens, timeout)

    # ---- offline --------------------------------------------------------------------
    def _finished(self, b: dict) -> bool:
        return b["cancelled"] or self._done(b) >= len(b["requests"])

    def _done(self, b: dict) -> int:
        end = b["cancelled_at"] or time.monotonic()
        return min(len(b["requests"]), int((end - b["t0"]) / self.offline_item_s))

    def submit_batch(self, requests: list[dict], deadline=None, timeout=None) -> str:
        if not requests:
            raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "requests: empty batch")
        with self._lock:
            batch_id = f"batch-{len(self._batches) + 1}"
            self._batches[batch_id] = {"requests": list(requests), "t0": time.monotonic(),
                                       "cancelled": False, "cancelled_at": None}
        return batch_id

    def _batch(self, batch_id: str) -> dict:
        b = self._batches.get(batch_id)
        if b is None:
            raise FakeRpcError(grpc.StatusCode.NOT_FOUND, f"batch_id: unknown {batch_id}")
        return b

    def get_batch(self, batch_id: str, timeout=None) -> SimpleNamespace:
        with self._lock:
            b = self._batch(batch_id)
            done, total = self._done(b), len(b["requests"])
            state = ("cancelled" if b["cancelled"] else "completed" if done >= total
                     else "running" if done else "queued")
            return SimpleNamespace(batch_id=batch_id, state=state, done=done, total=total,
                                   failed=0)

    def cancel_batch(self, batch_id: str, timeout=None) -> None:
        with self._lock:
            b = self._batch(batch_id)
            if not self._finished(b):
                b["cancelled"], b["cancelled_at"] = True, time.monotonic()

    def batch_results(self, batch_id: str, start: int = 0,
                      timeout=None) -> Iterator[SimpleNamespace]:
        with self._lock:
            b = self._batch(batch_id)
            done, reqs = self._done(b), b["requests"]
        for i in range(start, len(reqs)):
            if i < done:
                k = int(reqs[i].get("max_tokens", 16))
                yield SimpleNamespace(index=i, token_ids=[7] * k, text="x" * k,
                                      finish_reason="length")
            elif b["cancelled"]:
                yield SimpleNamespace(index=i, token_ids=[], text="", finish_reason="cancelled")

    # ---- misc -----------------------------------------------------------------------
    def stats(self, timeout=None) -> SimpleNamespace:
        with self._lock:
            return SimpleNamespace(preemptions=self.preemptions, online_waiting=0,
                                   offline_tokens_per_s=0.0)

    def close(self) -> None:
        self.closed = True
