"""A throwaway local PostgreSQL cluster, for tests and benchmarks of the PostgreSQL batch
store (never used by `serve`).

`PgCluster()` runs the server binaries (Debian's `/usr/lib/postgresql/<v>/bin`, else
`pg_ctl` on PATH) in a new temporary directory: `initdb` with trust auth, then `pg_ctl
start` on 127.0.0.1 at a free port with its unix socket in that directory. As root it runs
them as the unprivileged `postgres` user (postgres refuses root). `stop`/`start` restart it
on the same port (outage tests), `destroy` stops it and deletes the directory,
`new_database()` returns the URL of a fresh database. Raises RuntimeError naming what is
missing when the cluster cannot be made. Called from one thread.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from typing import Optional


def _bin_dir() -> Optional[str]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return os.path.dirname(found[-1])
    exe = shutil.which("pg_ctl")
    return os.path.dirname(exe) if exe else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self) -> None:
        self.bin = _bin_dir()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries (pg_ctl) found; "
                               "apt-get install postgresql")
        self.as_user: Optional[str] = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run "
                                   "the server as") from None
            self.as_user = "postgres"
        self.dir = tempfile.mkdtemp(prefix="conserve-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        if self.as_user:
            shutil.chown(self.dir, self.as_user, self.as_user)
        self.port = free_port()
        self.user = "postgres" if self.as_user else pwd.getpwuid(os.geteuid()).pw_name
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", self.user, "--no-sync",
                  "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bin, tool), *args]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            tail = ""
            if os.path.exists(self.log):
                with open(self.log, errors="replace") as f:
                    tail = f.read()[-2000:]
            raise RuntimeError(f"{tool} failed ({p.returncode}): {p.stderr.strip()[-2000:]} {tail}")
        return p

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                "-c max_connections=200 -c shared_buffers=64MB")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
