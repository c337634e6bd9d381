"""Launching a benchmark's worker processes on 127.0.0.1 (the multi-process benchmarks:
bench/multihost.py, bench/collectives.py): a free port for their coordinator, and running
them to the end with a hard timeout, every one killed if any fails, then reading the JSON
result one of them wrote.

Called from a benchmark's main thread; holds no state; imports no JAX.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """The hidden flags the launcher passes to each worker process (besides its layout):
    --worker, --process-id, --port (the coordinator's), --out (the JSON path)."""
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)


def run_workers(cmds: list[list[str]], env: dict, timeout: float, out: str, what: str) -> dict:
    """Start one process per command, wait for all (at most `timeout` s each), kill the
    rest if one fails or times out (RuntimeError or TimeoutExpired naming `what`), and
    return the JSON object the workers wrote to `out`."""
    procs = [subprocess.Popen(cmd, env=env) for cmd in cmds]
    try:
        for p in procs:
            if p.wait(timeout=timeout) != 0:
                raise RuntimeError(f"{what} process exited with {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    with open(out) as f:
        return json.load(f)
