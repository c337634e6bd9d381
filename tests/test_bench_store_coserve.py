"""The store co-serving benchmark (issue 26) on the mock engine: a real `serve --model mock`
on sqlite, then one on PostgreSQL (a database of its own on the test cluster), each under
`conserve-jax loadtest` for a few seconds of the real trace with a small offline batch; the
JSON has both sides, with online requests and offline items done on each, and the ratios.
Skips when no PostgreSQL cluster can be started locally (fails under CI: tests/pg_cluster.py)."""
import json

import pytest

from conserve_jax.bench import store_coserve
from tests.pg_cluster import pg_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(300)


def test_store_coserve_mock(tmp_path, pg_cluster):  # noqa: F811
    out = tmp_path / "store_coserve.json"
    rc = store_coserve.main([
        "--model", "mock", "--quick", "--duration", "8", "--order", "sqlite,postgres",
        "--rate-scale", "1", "--pg-url", pg_cluster.url(), "--start-timeout", "60",
        "--stop-timeout", "30", "--json", str(out), "--", "--mock-token-delay", "0.005"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["order"] == ["sqlite", "postgres"] and d["offline_requests"] == 8
    assert [r["side"] for r in d["runs"]] == ["sqlite", "postgres"]
    assert d["runs"][1]["store"].startswith("postgresql://")
    for r in d["runs"]:
        assert r["loadtest_rc"] == 0 and r["server_stop_rc"] == 0 and r["online_failed"] == 0
        assert r["metrics"]["online_done"] > 0 and r["metrics"]["offline_done"] > 0
    for side in ("sqlite", "postgres"):
        m = d["sides"][side]
        assert m["online_done"]["median"] > 0 and m["offline_done"]["median"] > 0
        assert m["ttft_p99_s"]["median"] is not None
    assert d["ratio_postgres_over_sqlite"]["online_done"] is not None
    # each postgres run had a database of its own, dropped afterwards
    import psycopg
    with psycopg.connect(pg_cluster.url()) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE "
                            "'store_coserve_%'").fetchall()
    assert left == []
