"""Metrics under the names and units vLLM dashboards expect, beside today's `conserve_*`
families (`server/metrics.py`, which carry `model_name` too). Each carries a `model_name`
label (the served model name), as vLLM's do:

    conserve_kv_cache_usage_perc{model_name}              gauge, fraction 0-1 of device KV
                                                          blocks held by requests (vLLM's
                                                          kv_cache_usage_perc, 1 = 100 %)
    conserve_num_requests_running{model_name, class}      gauge, engine running set
    conserve_num_requests_waiting{model_name, class}      gauge, engine waiting queues
    conserve_model_info{model_name}                       gauge, always 1
    conserve_request_queue_time_seconds{model_name, class}
                                                          histogram, submit to first
                                                          scheduling (vLLM's
                                                          request_queue_time_seconds)
    conserve_iteration_tokens_total{model_name, class}    histogram (named as vLLM's,
                                                          _total and all), tokens of one
                                                          engine iteration: prompt tokens
                                                          committed + tokens generated

`class` is online or offline. The gauges are read from `EngineStats` at scrape time (a
custom collector), so any thread may scrape. The histograms are observed (`VllmHistograms`):
queue time from each finished request's final delta (`queue_time_s`, as TTFT is), iteration
tokens from the engine's per-iteration records (`EngineAPI.add_iteration_listener`). An
iteration serving both classes is observed once in each, with that class's tokens, so a
class's `_sum` equals its prompt plus generation token counters and its `_count` is the
iterations that served it.
"""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

from conserve_jax.engine_api import IterationStats

# vLLM's request latency buckets, finer below 0.3 s (online requests rarely wait long)
QUEUE_TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0,
                        1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                        240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's iteration-token buckets (powers of two up to a large batched-token budget)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

VLLM_METRIC_NAMES = {
    "conserve_kv_cache_usage_perc": "gauge {model_name}: fraction (0-1) of device KV blocks held",
    "conserve_num_requests_running": "gauge {model_name, class}: engine running set",
    "conserve_num_requests_waiting": "gauge {model_name, class}: engine waiting queues",
    "conserve_model_info": "gauge {model_name}: 1",
    "conserve_request_queue_time_seconds": "histogram {model_name, class}: submit to first scheduling",
    "conserve_iteration_tokens_total": "histogram {model_name, class}: prompt + generated tokens "
                                       "of one engine iteration",
}


class VllmHistograms:
    """The two histograms above, in `registry`. `observe_queue_time`: any thread (the
    consumer of a final delta). `observe_iteration`: an iteration listener, called on the
    engine's step loop thread (cheap: at most two observations)."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        self.queue_time = Histogram(
            "conserve_request_queue_time_seconds", "Time a request waited from submit to its "
            "first scheduling", ["model_name", "class"], buckets=QUEUE_TIME_BUCKETS_S,
            registry=registry)
        self.iteration_tokens = Histogram(
            "conserve_iteration_tokens_total", "Tokens of one engine iteration (prompt tokens "
            "committed + tokens generated), per class it served", ["model_name", "class"],
            buckets=ITERATION_TOKENS_BUCKETS, registry=registry)

    def observe_queue_time(self, request_class: str, seconds: Optional[float]) -> None:
        if seconds is not None:
            self.queue_time.labels(self.model_name, request_class).observe(max(seconds, 0.0))

    def observe_iteration(self, it: IterationStats) -> None:
        for cls, n in (("online", it.online_tokens), ("offline", it.offline_tokens)):
            if n:
                self.iteration_tokens.labels(self.model_name, cls).observe(n)


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
