"""Bridge an engine `RequestStream` (filled by the engine thread) into asyncio, and the SSE
framing of OpenAI streams.

`deltas` yields each `RequestOutput` on the event loop: a queued delta is taken at once;
otherwise a worker thread (bounded by `limiter`) waits up to `poll_s` for the next one, and
between waits `gone()` is asked whether the client disconnected (then `ClientGone` is
raised; the caller cancels the engine request). `SSEResponse` is a StreamingResponse that
runs `on_close` however the response ends (finished, client gone, server stopping), so an
admitted request is always released and its engine request cancelled if unfinished.
"""
from __future__ import annotations

import json
import queue
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
    while True:
        out = _wait(stream, 0)
        if out is None:
            out = await anyio.to_thread.run_sync(_wait, stream, poll_s, limiter=limiter,
                                                 abandon_on_cancel=True)
        if out is None:
            if gone is not None and await gone():
                raise ClientGone()
            continue
        yield out
        if out.finished:
            return


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
