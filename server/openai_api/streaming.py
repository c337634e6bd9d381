"""Bridge an engine `RequestStream` (filled by the engine thread) into asyncio, and the SSE
framing of OpenAI streams.

`deltas` yields each `RequestOutput` on the event loop: a queued delta is taken at once;
otherwise the coroutine sleeps until the stream's producer wakes it (`set_listener` +
`call_soon_threadsafe`), or, for streams without that hook, a worker thread (bounded by
`limiter`) waits up to `poll_s` for the next one.
Every `poll_s` `gone()` is asked whether the client disconnected (then `ClientGone` is
raised; the caller cancels the engine request). `SSEResponse` is a StreamingResponse that
runs `on_close` however the response ends (finished, client gone, server stopping), so an
admitted request is always released and its engine request cancelled if unfinished.
"""
from __future__ import annotations

import asyncio
import json
import queue
import time
from typing import AsyncIterator, Awaitable, Callable, Optional

import anyio.to_thread
from starlette.responses import StreamingResponse

from conserve_jax.engine_api import RequestOutput


class ClientGone(Exception):
    pass


def _wait(stream, timeout: float) -> Optional[RequestOutput]:
    try:
        return stream.get(timeout=timeout)
    except queue.Empty:
        return None


async def deltas(stream, limiter, gone: Optional[Callable[[], Awaitable[bool]]] = None,
                 poll_s: float = 0.5) -> AsyncIterator[RequestOutput]:
    """The request's deltas in order, ending with the finished one."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    listen = getattr(stream, "set_listener", None)
    if listen is not None:  # the producer wakes this loop: no thread parked per request

        def notify() -> None:  # producer thread; the loop may be gone at shutdown
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass
        listen(notify)
    next_check = time.monotonic() + poll_s
    try:
        while True:
            out = _wait(stream, 0)
            if out is None and listen is not None:
                wake.clear()
                out = _wait(stream, 0)  # a put between the first look and clear()
                if out is None:
                    try:
                        await asyncio.wait_for(wake.wait(), poll_s)
                    except asyncio.TimeoutError:
                        pass
            elif out is None:
                out = await anyio.to_thread.run_sync(_wait, stream, poll_s, limiter=limiter,
                                                     abandon_on_cancel=True)
            if gone is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + poll_s
                if await gone():
                    raise ClientGone()
            if out is None:
                continue
            yield out
            if out.finished:
                return
    finally:
        if listen is not None:
            listen(None)


def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class SSEResponse(StreamingResponse):
    def __init__(self, content, on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
