"""vLLM-shaped metrics (issue 29, item 7): `conserve_kv_cache_usage_perc` (fraction 0-1),
`conserve_num_requests_running` / `_waiting` by class, all with a `model_name` label, beside
today's families (kept); every metric is in docs/serving.md's one table. A real in-process
server over the mock engine, scraped over HTTP while requests run and when idle."""
from __future__ import annotations

import os
import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conserve_jax.client import Client
from conserve_jax.engine.mock_engine import MockEngine
from conserve_server.metrics import METRIC_NAMES
from conserve_server.metrics_vllm import VLLM_METRIC_NAMES
from tests.conftest_server import REPO, wait_until
from tests.openai_helpers import MODEL, start_http_server


def _scrape(srv) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.app.http_port}/metrics",
                                  timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_vllm_named_gauges_with_model_name(tmp_path):
    eng = MockEngine(token_delay_s=0.02, max_num_seqs=2)
    srv = start_http_server(tmp_path, engine=eng)
    try:
        idle = _scrape(srv)
        assert idle["conserve_kv_cache_usage_perc"] == [({"model_name": MODEL}, 0.0)]
        assert idle["conserve_model_info"] == [({"model_name": MODEL}, 1.0)]
        assert "conserve_kv_blocks" in idle and "conserve_requests_running" in idle  # kept
        done = []

        def ask():
            with Client(srv.target) as c:
                done.append("".join(ch.text for ch in c.generate("x" * 40, max_tokens=200)))
        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
        # three requests, two slots: two running online, one waiting
        assert wait_until(lambda: eng.stats().online_running == 2
                          and eng.stats().online_waiting == 1, 10)
        busy = _scrape(srv)
        running = {lb["class"]: v for lb, v in busy["conserve_num_requests_running"]}
        waiting = {lb["class"]: v for lb, v in busy["conserve_num_requests_waiting"]}
        assert running == {"online": 2.0, "offline": 0.0}
        assert waiting == {"online": 1.0, "offline": 0.0}
        assert all(lb["model_name"] == MODEL for lb, _ in
                   busy["conserve_num_requests_running"] + busy["conserve_num_requests_waiting"])
        (labels, usage), = busy["conserve_kv_cache_usage_perc"]
        assert labels == {"model_name": MODEL} and 0.0 < usage < 1.0  # a fraction, as vLLM's
        for t in threads:
            t.join(60)
        assert len(done) == 3
        assert _scrape(srv)["conserve_kv_cache_usage_perc"][0][1] == 0.0
    finally:
        srv.stop()


def test_every_metric_is_in_the_one_documented_table():
    text = open(os.path.join(REPO, "docs", "serving.md")).read()
    rows = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `conserve_")}
    assert set(METRIC_NAMES) | set(VLLM_METRIC_NAMES) == rows
