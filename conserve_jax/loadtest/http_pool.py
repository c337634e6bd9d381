"""`HttpPool`: one pooled keep-alive HTTP client (aiohttp) for the load tester's threads.

One asyncio event loop on a daemon thread owns one `aiohttp.ClientSession`, whose connector
keeps connections alive and reuses them across requests (no connection set-up per request,
no per-request client machinery). Every request, from any thread, runs on that loop:

- `request(method, url, body, content_type, timeout)` blocks the calling thread until the
  whole response body is read and returns it (bytes).
- `stream(method, url, body, timeout)` returns a `LineStream`: the response body's lines as
  they arrive, read on the loop and handed to the iterating thread through a queue;
  `LineStream.cancel()` aborts the request at once (its connection is dropped, not reused).

A non-2xx answer raises `HttpError(status, message)` (OpenAI's `error.message` when the
body has one); transport failures and timeouts raise aiohttp's / asyncio's exceptions.
`timeout` bounds the whole exchange, a stream's included. `connections_made` and
`connections_reused` count the pool's new and reused connections. `close()` closes the session and
stops the loop. Thread-safe. aiohttp comes with the `bench` extra; without it the
constructor raises ImportError saying how to install it.
"""
from __future__ import annotations

import asyncio
import json
import queue
import ssl
import threading
from typing import Iterator, Optional

from conserve_jax.loadtest.openai_types import HttpError

_END = object()  # the end of a stream's lines
DEFAULT_TIMEOUT_S = 60.0


def _message(status: int, raw: bytes) -> HttpError:
    try:
        msg = json.loads(raw)["error"]["message"]
    except Exception:
        msg = raw.decode("utf-8", "replace")[:500]
    return HttpError(status, msg)


class LineStream:
    """A streamed response's body lines (bytes, with their newline); see the module doc."""

    def __init__(self, pool: "HttpPool") -> None:
        self._pool = pool
        self._q: "queue.SimpleQueue" = queue.SimpleQueue()
        self._task: Optional[asyncio.Task] = None
        self._closed = False

    def cancel(self) -> None:
        """Abort the request (idempotent, any thread); iteration then ends."""
        self._closed = True
        task = self._task
        if task is not None:
            try:
                self._pool.loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is closed
                pass

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class HttpPool:
    """See the module doc. `headers` go on every request; `ssl_context` for https (None:
    the default verification)."""

    def __init__(self, headers: Optional[dict] = None,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        try:
            import aiohttp
        except ImportError:
            raise ImportError("the load tester's openai backend needs aiohttp: "
                              "pip install 'conserve-jax[bench]'") from None
        self._aiohttp = aiohttp
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="loadtest-http",
                                        daemon=True)
        self._thread.start()

        self.connections_made = self.connections_reused = 0  # (loop thread writes)
        trace = aiohttp.TraceConfig()

        async def made(*_):
            self.connections_made += 1

        async def reused(*_):
            self.connections_reused += 1
        trace.on_connection_create_end.append(made)
        trace.on_connection_reuseconn.append(reused)

        async def make():
            # limit=0: no cap on open connections (the runner bounds concurrency itself)
            conn = aiohttp.TCPConnector(limit=0, ssl=ssl_context if ssl_context else True)
            return aiohttp.ClientSession(connector=conn, headers=headers or {},
                                         trace_configs=[trace])
        self._session = self._run(make())

    def _run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _timeout(self, timeout: Optional[float]):
        return self._aiohttp.ClientTimeout(total=timeout or DEFAULT_TIMEOUT_S)

    def request(self, method: str, url: str, body: Optional[bytes] = None,
                content_type: str = "application/json",
                timeout: Optional[float] = None) -> bytes:
        async def go() -> bytes:
            headers = {"Content-Type": content_type} if body is not None else None
            async with self._session.request(method, url, data=body, headers=headers,
                                             timeout=self._timeout(timeout)) as r:
                raw = await r.read()
                if r.status >= 400:
                    raise _message(r.status, raw)
                return raw
        return self._run(go())

    def stream(self, method: str, url: str, body: Optional[bytes] = None,
               timeout: Optional[float] = None) -> LineStream:
        """Start the request; returns at once (errors surface while iterating)."""
        out = LineStream(self)

        async def go() -> None:
            try:
                async with self._session.request(
                        method, url, data=body, headers={"Content-Type": "application/json"},
                        timeout=self._timeout(timeout)) as r:
                    if r.status >= 400:
                        raise _message(r.status, await r.read())
                    async for line in r.content:
                        if out._closed:  # cancelled before its task was known
                            break
                        out._q.put(line)
                # aiohttp hands the connection back to the pool in a callback scheduled by
                # the release above: let it run before the iterating thread sees the end and
                # starts its next request (which would otherwise open a second connection)
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                pass
            except BaseException as e:  # handed to the iterating thread
                out._q.put(e)
            finally:
                out._q.put(_END)

        def start() -> None:
            if not out._closed:
                out._task = self.loop.create_task(go())
            else:
                out._q.put(_END)
        self.loop.call_soon_threadsafe(start)
        return out

    def close(self) -> None:
        """Close the session and stop the loop (idempotent)."""
        if not self.loop.is_running():
            return
        try:
            self._run(self._session.close(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
