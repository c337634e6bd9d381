"""`HttpFront`: runs the OpenAI-compatible app (routes.py) under uvicorn on its own thread,
in the same process as the gRPC server and over the same engine, batch store and metrics.

`start()` binds the socket itself (so port 0 works and the bound port is known at once),
wraps it in TLS when the server has a certificate, and starts uvicorn's event loop on a
daemon thread; `stop(grace)` stops accepting, gives open requests `grace` seconds and joins
the thread (`stop(grace, wait=False)` + `join` lets the caller drain gRPC at the same
time). `admitting` is cleared by `ServerApp.stop` first: new work then gets 503.
Called by `ServerApp` from its controlling thread.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Optional

import uvicorn

from conserve_server.admission import Admission
from conserve_server.config import ServerConfig
from conserve_server.metrics import ServerMetrics
from conserve_server.openai_api.files import FileStore
from conserve_server.openai_api.pg_files import PgFileStore
from conserve_server.openai_api.routes import OpenAIRoutes, build_app
from conserve_server.pem import server_ssl_context

log = logging.getLogger(__name__)


def open_file_store(store, data_dir: str):
    """The file store that goes with `store`: in its database when a fleet shares it
    (PostgreSQL), else under `data_dir`."""
    return PgFileStore(store) if getattr(store, "shared", False) else FileStore(data_dir)


class HttpFront:
    def __init__(self, engine, store, runner, auth, metrics: ServerMetrics,
                 admission: Admission, config: ServerConfig, deadlines=None) -> None:
        """`config`: the server's resolved `ServerConfig` (host, http_port, TLS, drain
        timeout, served model name, and the `ServiceOptions` the gRPC face uses too).
        `deadlines`: the server's `DeadlineTracker` (None: no completion-window admission)."""
        self.config = config
        self.routes = OpenAIRoutes(engine, store, runner, auth, metrics, admission,
                                   open_file_store(store, config.data_dir), config.options,
                                   config.served_model_name, deadlines)
        self.app = build_app(self.routes)
        self.port: Optional[int] = None
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def admitting(self) -> bool:
        return self.routes.admitting

    @admitting.setter
    def admitting(self, value: bool) -> None:
        self.routes.admitting = value

    def start(self) -> int:
        c = self.config
        family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((c.host, c.http_port))
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        ucfg = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                              timeout_graceful_shutdown=max(1, int(c.drain_timeout)),
                              timeout_keep_alive=30)
        ucfg.load()
        if c.tls_cert is not None and c.tls_key is not None:
            ucfg.ssl = server_ssl_context(c.tls_cert, c.tls_key)
        self._server = uvicorn.Server(ucfg)
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve(sock, started))
                # uvicorn cancels requests still open after the grace period but does not
                # wait for them: let them unwind (release their slot, cancel their engine
                # request, close their connection) before the loop goes away
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception:
                log.exception("HTTP front stopped with an error")
            finally:
                started.set()
                loop.close()
        self._thread = threading.Thread(target=serve, name="http-front", daemon=True)
        self._thread.start()
        started.wait(30.0)
        if not self._server.started:
            raise RuntimeError(f"HTTP front did not start on {c.host}:{self.port}")
        log.info("OpenAI-compatible HTTP on %s:%d (tls=%s)", c.host, self.port, c.tls_cert is not None)
        return self.port

    async def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        async def mark_started() -> None:
            while not self._server.started and not self._server.should_exit:
                await asyncio.sleep(0.01)
            started.set()
        waiter = asyncio.ensure_future(mark_started())
        await self._server.serve(sockets=[sock])
        waiter.cancel()

    def stop(self, grace: float = 5.0, wait: bool = True) -> None:
        """Stop accepting now; open requests get `grace` seconds, then are cancelled (their
        engine requests with them). `wait=False` returns at once (see `join`)."""
        if self._server is None:
            return
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        if wait:
            self.join(grace + 5.0)

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
