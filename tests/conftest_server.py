"""Shared helpers for the server/client/batch tests (imported explicitly; not a conftest).

`start_server` runs a real gRPC server in-process on 127.0.0.1 port 0 over a `MockEngine`
(HTTP off unless `http_port` is given: 0 picks a free one);
`spawn_server` runs `python -m conserve_jax.entrypoints.cli serve --model mock ...` as a subprocess
and reads the bound port from its `listening on HOST:PORT` line.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from conserve_jax.config import EngineConfig
from conserve_jax.engine.mock_engine import MockEngine
from conserve_server.app import ServerApp
from conserve_server.config import ServerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RunningServer:
    app: ServerApp
    engine: MockEngine
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.app.stop(drain_timeout_s=0.5)


def start_server(data_dir, engine: Optional[MockEngine] = None,
                 engine_config: Optional[EngineConfig] = None, **config) -> RunningServer:
    """`config`: `ServerConfig` fields (port defaults to 0 here: a free one; http_port to
    None: off);
    `engine_config`: what the server takes the engine to be built with (ServerApp's)."""
    engine = engine or MockEngine()
    config.setdefault("port", 0)
    config.setdefault("http_port", None)  # HTTP off unless asked (its default is :8000)
    app = ServerApp(engine, ServerConfig(data_dir=str(data_dir), **config),
                    engine_config=engine_config)
    port = app.start()
    return RunningServer(app, engine, port)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def spawn_server(data_dir, *extra: str, timeout: float = 30.0) -> tuple[subprocess.Popen, int]:
    """Start the CLI server as a subprocess; returns (process, port)."""
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--model", "mock", "--port", "0",
           "--http-port", "0", "--data-dir", str(data_dir), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found: list[int] = []
    errors: list[str] = []

    def read_stdout():
        for line in proc.stdout:
            if line.startswith("listening on ") and not found:
                found.append(int(line.rsplit(":", 1)[1]))

    def read_stderr():  # keep the pipe drained
        for line in proc.stderr:
            errors.append(line)
    for target in (read_stdout, read_stderr):
        threading.Thread(target=target, daemon=True).start()
    if not wait_until(lambda: bool(found) or proc.poll() is not None, timeout, 0.02) or not found:
        proc.kill()
        raise RuntimeError("server did not start: " + "".join(errors[-30:]))
    return proc, found[0]


def echo_text(prompt: str, n: int) -> str:
    """What MockEngine generates for an ASCII prompt and max_tokens n (no stop hit)."""
    return (prompt * (n // len(prompt) + 1))[:n]
