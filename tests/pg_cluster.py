"""PostgreSQL fixtures for tests (imported explicitly by the tests that need them).

`pg_cluster` is a session fixture: one throwaway cluster (`conserve_server.batch.pg_local.
PgCluster`: initdb/pg_ctl in a temp dir, as the unprivileged postgres user under root)
per test session, stopped and deleted at the end; `pg_url` gives each test a fresh database
on it.

When no cluster can be started the tests skip with the reason, unless the `CI` environment
variable is set: then they fail (the PostgreSQL tests always run in CI).
"""
from __future__ import annotations

import os

import pytest

from conserve_server.batch.pg_local import PgCluster


@pytest.fixture(scope="session")
def pg_cluster():
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
        cluster = PgCluster()
    except Exception as e:  # no binaries, no psycopg, initdb refused, ...
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests but no cluster started: {e}")
        pytest.skip(f"no PostgreSQL cluster could be started: {e}")
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    return pg_cluster.new_database()
