"""`n` choices: one OpenAI request as n engine requests (samples) sharing the prompt's prefill.

`sample_requests(gen, n)` makes the n engine requests from the one the request body gave:
ids `<id>-<i>` (n > 1), and with a `seed`, sample i seeded `seed + i` (vLLM's rule:
reproducible, yet different samples); without a seed each sample draws its own
randomness. Greedy samples (temperature 0) are identical, allowed as in vLLM.

`Fanout` submits them so that they share the prefill. With the engine's prefix caching on,
sample 0 goes first and the others when its first delta arrives: by then its prompt's full
KV blocks are committed to the prefix cache (same prompt, same salt), so the others
compute only the prompt's last, partial block instead of the whole prompt again, and
sample 0's time to first token is that of a lone request. With caching off there is
nothing to share and all go at once. If sample 0 ends in an error or is cancelled before
its first token, the others are not submitted.

`Fanout.deltas` yields `(index, RequestOutput)` for every sample in each sample's order,
on the event loop, woken by the streams' listeners (no thread parked per sample), and ends
when every submitted sample has finished. `cancel` (idempotent, event-loop thread) stops
the unfinished samples and any not yet submitted.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import queue
import time
from typing import AsyncIterator, Awaitable, Callable, Optional

from conserve_jax.engine_api import GenerationRequest, RequestOutput
from conserve_server.openai_api.streaming import ClientGone

NOT_STARTED = ("error", "cancelled")  # sample 0 ending so: the others are not submitted


def sample_requests(gen: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The n engine requests for `gen` (n == 1: `gen` itself)."""
    if n == 1:
        return [gen]
    out = []
    for i in range(n):
        r = copy.copy(gen)
        r.request_id = f"{gen.request_id}-{i}"
        if gen.sampling.seed is not None:
            r.sampling = dataclasses.replace(gen.sampling, seed=gen.sampling.seed + i)
        out.append(r)
    return out


def prefix_caching_on(engine) -> bool:
    """Does `engine` reuse cached prompt KV (the real engine's config, or the mock's flag)?"""
    config = getattr(engine, "config", None)
    if config is not None and hasattr(config, "enable_prefix_caching"):
        return bool(config.enable_prefix_caching)
    return bool(getattr(engine, "enable_prefix_caching", False))


def _take(stream) -> Optional[RequestOutput]:
    try:
        return stream.get(timeout=0)
    except queue.Empty:
        return None


class Fanout:
    """The samples of one request and their streams; see the module doc."""

    def __init__(self, engine, requests: list[GenerationRequest]) -> None:
        self.engine = engine
        self.requests = requests
        self.streams: list = [None] * len(requests)
        self.finished = [False] * len(requests)
        self.share = len(requests) > 1 and prefix_caching_on(engine)
        self._pending: list[tuple[int, RequestOutput]] = []  # synthetic ends of samples that failed to submit
        self._notify: Optional[Callable[[], None]] = None
        self._closed = False
        self._rest_decided = False

    @property
    def n(self) -> int:
        return len(self.requests)

    def submit(self) -> None:
        """Submit sample 0 (and the others too when not sharing). Raises what
        `engine.submit` raises for sample 0 (nothing is left running then)."""
        self.streams[0] = self.engine.submit(self.requests[0])
        if not self.share:
            self._submit_rest()

    def _submit_rest(self) -> None:
        self._rest_decided = True
        for i in range(1, self.n):
            if self._closed:
                self.finished[i] = True
                continue
            try:
                self.streams[i] = self.engine.submit(self.requests[i])
            except (ValueError, RuntimeError) as e:  # engine stopping, or a late refusal
                self.finished[i] = True
                self._pending.append((i, RequestOutput(self.requests[i].request_id, finished=True,
                                                       finish_reason="error", error=str(e))))
                continue
            if self._notify is not None:
                self.streams[i].set_listener(self._notify)

    def _abandon_rest(self) -> None:
        self._rest_decided = True
        for i in range(1, self.n):
            self.finished[i] = True

    def _seen_first(self, out: RequestOutput) -> None:
        """Sample 0's first delta: its prefill is done; start (or drop) the others."""
        if out.finished and out.finish_reason in NOT_STARTED:
            self._abandon_rest()
        else:
            self._submit_rest()

    def cancel(self) -> None:
        """Stop every unfinished sample (submitted or not). Idempotent."""
        self._closed = True
        for i, s in enumerate(self.streams):
            if s is not None and not self.finished[i]:
                self.engine.cancel(self.requests[i].request_id)

    async def deltas(self, gone: Optional[Callable[[], Awaitable[bool]]] = None,
                     poll_s: float = 0.5) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every sample's deltas as `(index, delta)`, each sample's in order, until all
        have finished. Every `poll_s` `gone()` is asked whether the client left; then
        `ClientGone` is raised (the caller cancels)."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify() -> None:  # a producer thread; the loop may be gone at shutdown
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass
        self._notify = notify
        for s in self.streams:
            if s is not None:
                s.set_listener(notify)
        next_check = time.monotonic() + poll_s
        try:
            while not all(self.finished):
                wake.clear()  # before looking: a put after the look sets it again
                got = False
                for i in range(self.n):
                    s = self.streams[i]
                    while s is not None and not self.finished[i]:
                        out = _take(s)
                        if out is None:
                            break
                        got = True
                        if i == 0 and not self._rest_decided:
                            self._seen_first(out)
                        self.finished[i] = out.finished
                        yield i, out
                while self._pending:
                    got = True
                    yield self._pending.pop(0)
                if gone is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + poll_s
                    if await gone():
                        raise ClientGone()
                if not got and not all(self.finished):
                    try:
                        await asyncio.wait_for(wake.wait(), poll_s)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self._notify = None
            for s in self.streams:
                if s is not None:
                    s.set_listener(None)
