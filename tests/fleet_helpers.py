"""Replicas of `conserve-jax serve --model mock` sharing one PostgreSQL batch store, for the
fleet tests (imported explicitly). Each replica is a subprocess with its own data dir and
a log file; `Replica.stop` kills what is still running."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from tests.conftest_server import REPO, wait_until


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
        self.proc.wait(timeout=10)


def spawn_replica(tmp_path, name: str, url: str, *extra: str, timeout: float = 60.0) -> Replica:
    data = tmp_path / name
    log_path = str(tmp_path / f"{name}.log")
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--model", "mock",
           "--port", "0", "--http-port", "0", "--data-dir", str(data), "--batch-store", url,
           "--replica-id", name, *extra]
    out = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    out.close()

    def port():
        with open(log_path, errors="replace") as f:
            for line in f:
                if line.startswith("listening on "):
                    return int(line.rsplit(":", 1)[1])
        return None
    if not wait_until(lambda: port() is not None or proc.poll() is not None, timeout, 0.05) \
            or port() is None:
        proc.kill()
        with open(log_path, errors="replace") as f:
            raise RuntimeError(f"replica {name} did not start: {f.read()[-3000:]}")
    return Replica(name, proc, port(), log_path)


def item_rows(url: str, batch_id: str) -> list[tuple]:
    """(idx, state, attempts, done_by) of every item of the batch, in index order."""
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT idx, state, attempts, done_by FROM items WHERE batch_id=%s "
                            "ORDER BY idx", (batch_id,)).fetchall()


def wait_for(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")

