"""PostgreSQL fixtures for tests (imported explicitly by the tests that need them).

`pg_cluster` is a session fixture: one throwaway cluster (`conserve_server.batch.pg_local.
PgCluster`: initdb/pg_ctl in a temp dir, as the unprivileged postgres user under root)
per test session (shared by every module that imports the fixture), stopped and deleted
when the session's process exits; `pg_url` gives each test a fresh database
on it.

When no cluster can be started the tests skip with the reason, unless the `CI` environment
variable is set: then they fail (the PostgreSQL tests always run in CI).
"""
from __future__ import annotations

import atexit
import os

import pytest

from conserve_server.batch.pg_local import PgCluster


_STATE: dict = {}  # one cluster per test session, even when several modules import the fixture


def _cluster() -> PgCluster:
    if "cluster" not in _STATE and "error" not in _STATE:
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
            _STATE["cluster"] = PgCluster()
            atexit.register(_STATE["cluster"].destroy)  # stopped when the session ends
        except Exception as e:  # no binaries, no psycopg, initdb refused, ...
            _STATE["error"] = e
    if "error" in _STATE:
        why = f"no PostgreSQL cluster could be started: {_STATE['error']}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests but {why}")
        pytest.skip(why)
    return _STATE["cluster"]


@pytest.fixture(scope="session")
def pg_cluster():
    return _cluster()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    return pg_cluster.new_database()
