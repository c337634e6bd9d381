"""Metrics under the names and units vLLM dashboards expect, beside today's `conserve_*`
families (`server/metrics.py`, unchanged). Each carries a `model_name` label (the served
model name), as vLLM's do:

    conserve_kv_cache_usage_perc{model_name}              gauge, fraction 0-1 of device KV
                                                          blocks held by requests (vLLM's
                                                          kv_cache_usage_perc, 1 = 100 %)
    conserve_num_requests_running{model_name, class}      gauge, engine running set
    conserve_num_requests_waiting{model_name, class}      gauge, engine waiting queues
    conserve_model_info{model_name}                       gauge, always 1

`class` is online or offline. Read from `EngineStats` at scrape time (a custom collector),
so any thread may scrape.
"""
from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

VLLM_METRIC_NAMES = {
    "conserve_kv_cache_usage_perc": "gauge {model_name}: fraction (0-1) of device KV blocks held",
    "conserve_num_requests_running": "gauge {model_name, class}: engine running set",
    "conserve_num_requests_waiting": "gauge {model_name, class}: engine waiting queues",
    "conserve_model_info": "gauge {model_name}: 1",
}


class VllmShapedCollector:
    """The families above for one engine (anything with `stats() -> EngineStats`)."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def describe(self):
        return []

    def collect(self):
        s = self.engine.stats()
        m = self.model_name
        used = s.kv_blocks_online + s.kv_blocks_offline
        g = GaugeMetricFamily("conserve_kv_cache_usage_perc", "Fraction of device KV blocks "
                              "held by requests (1 = 100 %)", labels=["model_name"])
        g.add_metric([m], used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield g
        for name, doc, online, offline in (
                ("conserve_num_requests_running", "Requests in the engine's running set",
                 s.online_running, s.offline_running),
                ("conserve_num_requests_waiting", "Requests in the engine's waiting queues",
                 s.online_waiting, s.offline_waiting)):
            g = GaugeMetricFamily(name, doc, labels=["model_name", "class"])
            g.add_metric([m, "online"], online)
            g.add_metric([m, "offline"], offline)
            yield g
        g = GaugeMetricFamily("conserve_model_info", "The served model", labels=["model_name"])
        g.add_metric([m], 1)
        yield g
