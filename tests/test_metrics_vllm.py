"""vLLM-shaped metrics (issue 29, item 6): `conserve_kv_cache_usage_perc` (fraction 0-1),
`conserve_num_requests_running` / `_waiting` by class, the queue-time and iteration-tokens
histograms, and a `model_name` label on every family, today's names kept; every metric is
in docs/serving.md's one table. A real in-process server over the mock engine, scraped over
HTTP while requests run and when idle. (The real engine's feed of the two histograms:
tests/test_openai_real_engine.py.)"""
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
from tests.metrics_helpers import metric, samples
from tests.openai_helpers import MODEL, client, start_http_server


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


def test_queue_time_and_iteration_tokens_count_the_work_done(tmp_path):
    """3 online requests (two slots: one waits) and 2 flex ones: the queue-time histogram
    counts each finished request once in its class, the waiting one above the mock's step
    delay; iteration tokens sum to every request's uncached prompt plus completion tokens,
    which are also the prompt and generation token counters."""
    delay = 0.02
    eng = MockEngine(token_delay_s=delay, max_num_seqs=2)
    srv = start_http_server(tmp_path, engine=eng)
    try:
        c = client(srv)
        usage = {"online": [], "offline": []}

        def ask(i, tier=None):
            extra = {"ignore_eos": True, **({"service_tier": tier} if tier else {})}
            r = c.completions.create(model=MODEL, prompt=f"{i}" + "y" * (30 + i),
                                     max_tokens=(8 if tier else 40) + i, extra_body=extra)
            usage["offline" if tier else "online"].append(r.usage)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        seen_waiting = wait_until(lambda: eng.stats().online_waiting == 1, 10)
        for t in threads:
            t.join(60)
        for i in (3, 4):
            ask(i, "flex")
        assert seen_waiting and [len(usage[k]) for k in ("online", "offline")] == [3, 2]
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.app.http_port}/metrics",
                                      timeout=10).read().decode()
        for cls, n in (("online", 3), ("offline", 2)):
            lab = f'{{class="{cls}"}}'
            assert metric(text, "conserve_request_queue_time_seconds_count", lab) == n
            done = sum(u.prompt_tokens - u.prompt_tokens_details.cached_tokens
                       + u.completion_tokens for u in usage[cls])
            assert metric(text, "conserve_iteration_tokens_total_sum", lab) == done
            assert done == metric(text, "conserve_prompt_tokens_total", lab) + \
                metric(text, "conserve_generation_tokens_total", lab)
            # one observation per iteration that served the class
            assert 0 < metric(text, "conserve_iteration_tokens_total_count", lab) \
                <= metric(text, "conserve_iterations_total")
        # the online request that waited for a slot waited at least one step delay
        assert metric(text, "conserve_request_queue_time_seconds_bucket",
                      f'{{class="online",le="{delay / 2}"}}') <= 2
        # every family carries the served model name
        assert {lb.get("model_name") for name, lb, _ in samples(text)
                if name.startswith("conserve_")} == {MODEL}
    finally:
        srv.stop()


def test_every_metric_is_in_the_one_documented_table():
    text = open(os.path.join(REPO, "docs", "serving.md")).read()
    rows = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `conserve_")}
    assert set(METRIC_NAMES) | set(VLLM_METRIC_NAMES) == rows
