"""`ServerMetrics`: the one set of server counters that `GetServerStats` and Prometheus
`/metrics` both read.

What it holds:
- latency histograms and SLO counters fed by `ObservedEngine` (below) from every finished
  request's engine-measured `ttft_s` / `mean_tpot_s`, judged against the objectives the
  request carries (the faces filled in the defaults: `Admission.fill_defaults`), labelled
  by request class only (no tenant or request labels, so cardinality stays fixed);
- the vLLM-named families of `metrics_vllm`: gauges read at scrape time, the queue-time
  histogram (from the same final deltas' `queue_time_s`), the iteration-tokens histogram
  (fed on the engine's step loop thread by an iteration listener this object installs
  and `close()` removes);
- at scrape time (a custom collector) the engine's `EngineStats`, the online counts of the
  server's `Admission` (in flight, limit), the batch store's item counts and the batch
  runner's in-flight count: the very values `snapshot()` hands to `GetServerStats`.

Metric names (all prefixed `conserve_`) are listed in `METRIC_NAMES` (and
`metrics_vllm.VLLM_METRIC_NAMES`). Every family carries a `model_name` label (the served
model name, as vLLM's metrics do) besides the labels listed there.

Threading: any thread may call any method. The admission counts are read from
`Admission` (its own lock); prometheus-client metrics are thread-safe. `ObservedEngine` observes a request when its
final delta is taken from its stream, on whichever thread consumes it (gRPC worker, HTTP
worker, batch runner).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from conserve_jax.engine_api import (EngineStats, GenerationRequest, RequestClass,
                                     RequestOutput, RequestStream)
from conserve_server.admission import Admission
from conserve_server.batch.base import STORE_ERRORS
from conserve_server.batch.deadlines import SLACK_BUCKETS_S
from conserve_server.metrics_vllm import VllmHistograms, VllmShapedCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)

METRIC_NAMES = {
    "conserve_time_to_first_token_seconds": "histogram {class}: TTFT, engine-measured",
    "conserve_time_per_output_token_seconds": "histogram {class}: mean inter-token time per request",
    "conserve_e2e_request_latency_seconds": "histogram {class}: arrival to last token",
    "conserve_inter_token_latency_seconds": "histogram {class=online}: gaps between streamed tokens, at the face",
    "conserve_requests_finished_total": "counter {class, finish_reason}",
    "conserve_slo_requests_total": "counter {class, objective=ttft|tpot, met=true|false}",
    "conserve_generation_tokens_total": "counter {class}: tokens generated",
    "conserve_prompt_tokens_total": "counter {class}: prompt-side tokens committed (incl. recompute)",
    "conserve_requests_waiting": "gauge {class}: engine waiting queue",
    "conserve_requests_running": "gauge {class}: engine running set",
    "conserve_online_in_flight": "gauge: online requests admitted by the server, all faces",
    "conserve_online_queue_limit": "gauge: beyond it online requests are refused (429 / RESOURCE_EXHAUSTED)",
    "conserve_kv_blocks": "gauge {class=online|offline|total}: device KV blocks",
    "conserve_host_pool_slots": "gauge {state=used|total}: host KV checkpoint pool",
    "conserve_tokens_per_second": "gauge {class}: recent generation rate",
    "conserve_preemptions_total": "counter: sub-iteration preemptions",
    "conserve_preempted_tokens_discarded_total": "counter",
    "conserve_preemptions_resumed_total": "counter: preempted iterations continued from their layer",
    "conserve_evictions_total": "counter: offline KV evictions",
    "conserve_restored_tokens_total": "counter: tokens restored from the host pool",
    "conserve_recomputed_tokens_total": "counter: tokens recomputed after eviction",
    "conserve_iterations_total": "counter: engine iterations",
    "conserve_prefix_cache_queries_total": "counter {class}: prompt tokens looked up in the prefix cache",
    "conserve_prefix_cache_hits_total": "counter {class}: prompt tokens found there (KV reused)",
    "conserve_kv_blocks_cached_free": "gauge: cached KV blocks no request holds (reusable, evictable)",
    "conserve_prefix_cache_evictions_total": "counter: cached blocks whose content was dropped for reuse",
    "conserve_batches_active": "gauge: batches queued or running",
    "conserve_batch_store_up": "gauge: 1 while the batch database answers, 0 during an outage",
    "conserve_batch_items": "gauge {state=pending|in_flight|succeeded|failed|cancelled}",
    "conserve_uptime_seconds": "gauge",
    "conserve_deadline_batches_total": "counter {class, outcome=met|missed}: batches with a "
                                       "completion window, by outcome",
    "conserve_deadline_refused_total": "counter: batches refused as infeasible at submission",
    "conserve_deadline_at_risk": "gauge {unit=batches|items}: at-risk batches and their unfinished items",
    "conserve_harvest_rate": "gauge: offline work units per backlogged second (absent: no history)",
    "conserve_deadline_estimate_error": "gauge {stat=mean_abs|mean|count}: (estimate at submit - actual) / actual duration",
    "conserve_deadline_slack_at_finish_seconds": "histogram: deadline - finish time of ended batches",
    "conserve_deadline_borrowed_seconds_total": "counter: online budget used by at-risk offline work (borrow)",
}


@dataclass
class Snapshot:
    """What `GetServerStats` returns: engine stats plus the server's own fields."""

    engine: EngineStats
    server: dict[str, Any]


class ServerMetrics:
    """See the module docstring. `store`/`runner` may be attached after construction
    (`attach`), since `ServerApp` builds them from the observed engine. `model_name`: the
    served model name, the value of every family's `model_name` label (a standalone
    servicer's metrics leave it empty)."""

    def __init__(self, engine, admission: Admission, model_name: str = "") -> None:
        self.engine = engine
        self.admission = admission  # the online counts and limit come from here
        self.model_name = model_name
        self.store = None
        self.runner = None
        self.deadlines = None  # conserve_server.batch.deadlines.DeadlineTracker, set by ServerApp
        self._started = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        by_class = ["model_name", "class"]
        self.ttft = Histogram("conserve_time_to_first_token_seconds", "Time to first token",
                              by_class, buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("conserve_time_per_output_token_seconds",
                              "Mean time between output tokens of a request",
                              by_class, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("conserve_e2e_request_latency_seconds",
                             "Arrival to last token", by_class, buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.itl = Histogram("conserve_inter_token_latency_seconds",
                             "Gap between consecutive streamed tokens of online requests, as the "
                             "server's faces receive them", by_class, buckets=_TPOT_BUCKETS,
                             registry=r)
        self.finished = Counter("conserve_requests_finished", "Requests finished",
                                by_class + ["finish_reason"], registry=r)
        self.slo = Counter("conserve_slo_requests", "Requests judged against an objective",
                           by_class + ["objective", "met"], registry=r)
        r.register(_EngineCollector(self))
        r.register(VllmShapedCollector(engine, model_name))
        self.vllm = VllmHistograms(r, model_name)
        engine.add_iteration_listener(self.vllm.observe_iteration)

    def close(self) -> None:
        """Stop observing the engine's iterations (the server stops). Any thread."""
        self.engine.remove_iteration_listener(self.vllm.observe_iteration)

    def attach(self, store, runner) -> None:
        self.store, self.runner = store, runner

    # ---- observation -------------------------------------------------------------------
    def observe_finished(self, request: GenerationRequest, out: RequestOutput) -> None:
        """Record one finished request (its final delta)."""
        cls, m = request.request_class.value, self.model_name
        self.finished.labels(m, cls, out.finish_reason or "unknown").inc()
        self.vllm.observe_queue_time(cls, out.queue_time_s)  # whenever it ran at all
        if out.finish_reason not in ("stop", "length") or out.ttft_s is None:
            return
        self.ttft.labels(m, cls).observe(out.ttft_s)
        tpot = out.mean_tpot_s or 0.0
        if out.completion_tokens > 1:
            self.tpot.labels(m, cls).observe(tpot)
        self.e2e.labels(m, cls).observe(out.ttft_s + tpot * max(out.completion_tokens - 1, 0))
        if request.request_class is not RequestClass.ONLINE:
            return
        ttft_slo, tpot_slo = request.slo.ttft_s, request.slo.tpot_s
        if ttft_slo is not None:
            self.slo.labels(m, cls, "ttft", str(out.ttft_s <= ttft_slo).lower()).inc()
        if tpot_slo is not None and out.completion_tokens > 1:
            self.slo.labels(m, cls, "tpot", str(tpot <= tpot_slo).lower()).inc()

    # ---- reading -----------------------------------------------------------------------
    def snapshot(self, tenant: Optional[str] = None) -> Snapshot:
        """Engine stats and server fields, as `GetServerStats` reports them. With a tenant
        (auth on), the batch and online counts are that tenant's own."""
        counts = {}
        if self.store is not None:
            try:
                counts = self.store.counts(tenant)
            except STORE_ERRORS:  # the database is down: online stats still answer
                counts = {}
        if tenant is None:
            online = self.admission.online_in_flight
            in_flight = self.runner.in_flight if self.runner is not None else 0
        else:
            online = self.admission.online_in_flight_of(tenant)
            in_flight = counts.get("batch_items_running", 0)
        server = {
            "online_in_flight": online,
            "online_queue_limit": self.admission.max_online,
            "batches_active": counts.get("batches_active", 0),
            "batch_items_pending": counts.get("batch_items_pending", 0),
            "batch_items_in_flight": in_flight,
            "uptime_s": time.monotonic() - self._started,
        }
        if self.deadlines is not None and tenant is None:  # server-wide: not per tenant
            d = self.deadlines.snapshot()
            errs = d.estimate_errors
            server.update(
                deadline_met=sum(d.met.values()), deadline_missed=sum(d.missed.values()),
                deadline_refused=d.refused, deadline_at_risk_batches=d.at_risk_batches,
                deadline_at_risk_items=d.at_risk_items, harvest_rate=d.harvest_rate or 0.0,
                deadline_estimate_error_mean=sum(abs(e) for e in errs) / len(errs) if errs else 0.0)
        return Snapshot(self.engine.stats(), server)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads `ServerMetrics.snapshot()` at scrape time (the same values `GetServerStats`
    returns) plus the store's finished-item totals."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        snap = self.m.snapshot()
        s, srv = snap.engine, snap.server
        model = self.m.model_name

        def family(kind, name, doc, value=None, label=None, values=()):
            """One family with `model_name` and at most one more label: `value` alone,
            or one sample per (label value, value) in `values`."""
            f = kind(name, doc, labels=["model_name", label] if label else ["model_name"])
            if label:
                for lv, v in values:
                    f.add_metric([model, lv], v)
            else:
                f.add_metric([model], value)
            return f

        def gauge(*a, **kw):
            return family(GaugeMetricFamily, *a, **kw)

        def counter(*a, **kw):
            return family(CounterMetricFamily, *a, **kw)

        yield counter("conserve_generation_tokens", "Tokens generated", label="class",
                      values=[("online", s.online_tokens_total), ("offline", s.offline_tokens_total)])
        yield counter("conserve_prompt_tokens", "Prompt-side tokens committed", label="class",
                      values=[("online", s.online_prefill_tokens_total),
                              ("offline", s.offline_prefill_tokens_total)])
        yield gauge("conserve_requests_waiting", "Requests in the engine's waiting queues",
                    label="class", values=[("online", s.online_waiting), ("offline", s.offline_waiting)])
        yield gauge("conserve_requests_running", "Requests in the engine's running set",
                    label="class", values=[("online", s.online_running), ("offline", s.offline_running)])
        yield gauge("conserve_online_in_flight", "Online requests admitted, all faces",
                    srv["online_in_flight"])
        yield gauge("conserve_online_queue_limit", "Online in-flight limit", srv["online_queue_limit"])
        yield gauge("conserve_kv_blocks", "Device KV blocks", label="class",
                    values=[("online", s.kv_blocks_online), ("offline", s.kv_blocks_offline),
                            ("total", s.kv_blocks_total)])
        yield gauge("conserve_host_pool_slots", "Host KV checkpoint pool slots", label="state",
                    values=[("used", s.host_pool_slots_used), ("total", s.host_pool_slots_total)])
        yield gauge("conserve_tokens_per_second", "Recent generation rate", label="class",
                    values=[("online", s.online_tokens_per_s), ("offline", s.offline_tokens_per_s)])
        for name, value, doc in (
                ("preemptions", s.preemptions, "Sub-iteration preemptions"),
                ("preempted_tokens_discarded", s.preempted_tokens_discarded,
                 "Tokens of preempted iterations discarded"),
                ("preemptions_resumed", s.preemptions_resumed,
                 "Preempted iterations continued from their layer"),
                ("evictions", s.evictions, "Offline KV evictions"),
                ("restored_tokens", s.restored_tokens, "Tokens restored from the host pool"),
                ("recomputed_tokens", s.recomputed_tokens, "Tokens recomputed after eviction"),
                ("iterations", s.iterations, "Engine iterations")):
            yield counter(f"conserve_{name}", doc, value)
        yield counter("conserve_prefix_cache_queries",
                      "Prompt tokens looked up in the prefix cache (at a request's first start)",
                      label="class", values=[("online", s.prefix_cache_queries_online),
                                             ("offline", s.prefix_cache_queries_offline)])
        yield counter("conserve_prefix_cache_hits",
                      "Prompt tokens whose KV was found in the prefix cache", label="class",
                      values=[("online", s.prefix_cache_hits_online),
                              ("offline", s.prefix_cache_hits_offline)])
        yield gauge("conserve_kv_blocks_cached_free",
                    "Cached KV blocks no request holds (reusable at once, evicted when needed)",
                    s.kv_blocks_cached_free)
        yield counter("conserve_prefix_cache_evictions",
                      "Cached KV blocks whose content was dropped to reuse the block",
                      s.prefix_cache_evictions)
        yield gauge("conserve_batches_active", "Batches queued or running", srv["batches_active"])
        items = [("pending", srv["batch_items_pending"]), ("in_flight", srv["batch_items_in_flight"])]
        totals = getattr(self.m.store, "item_totals", None)
        t = None
        if totals is not None:
            try:
                t = totals()
            except STORE_ERRORS:
                t = None
        if t is not None:
            items += [("succeeded", t["succeeded"]), ("failed", t["failed"]),
                      ("cancelled", t["cancelled"])]
        if self.m.store is not None:
            yield gauge("conserve_batch_store_up", "Batch database reachable",
                        int(bool(self.m.store.healthy)))
        yield gauge("conserve_batch_items", "Batch items by state", label="state", values=items)
        yield gauge("conserve_uptime_seconds", "Server uptime", srv["uptime_s"])
        yield counter("conserve_deadline_borrowed_seconds", "Predicted seconds of online "
                      "iterations beyond the isolation budget used by at-risk offline work "
                      "(deadline_policy borrow)", s.deadline_borrowed_s)
        if self.m.deadlines is not None:
            yield from _deadline_metrics(self.m.deadlines.snapshot(), gauge, counter, model)


def _deadline_metrics(d, gauge, counter, model: str):
    """The deadline families of one `DeadlineStats` snapshot (see METRIC_NAMES); `gauge`
    and `counter` are the collector's (they add `model_name`), `model` its value."""
    c = CounterMetricFamily("conserve_deadline_batches", "Batches with a completion window, "
                            "by outcome (missed: expired or finished late)",
                            labels=["model_name", "class", "outcome"])
    for cls in sorted(set(d.met) | set(d.missed) | {"batch"}):
        c.add_metric([model, cls, "met"], d.met.get(cls, 0))
        c.add_metric([model, cls, "missed"], d.missed.get(cls, 0))
    yield c
    yield counter("conserve_deadline_refused", "Batches refused as infeasible at submission",
                  d.refused)
    yield gauge("conserve_deadline_at_risk", "At-risk batches and their unfinished items",
                label="unit", values=[("batches", d.at_risk_batches), ("items", d.at_risk_items)])
    if d.harvest_rate is not None:
        yield gauge("conserve_harvest_rate", "Offline work units per backlogged second",
                    d.harvest_rate)
    errs = d.estimate_errors
    yield gauge("conserve_deadline_estimate_error", "(estimate at submit - actual) / actual "
                "duration of completed batches (the last 1000)", label="stat",
                values=[("mean_abs", sum(abs(e) for e in errs) / len(errs) if errs else 0.0),
                        ("mean", sum(errs) / len(errs) if errs else 0.0), ("count", len(errs))])
    h = HistogramMetricFamily("conserve_deadline_slack_at_finish_seconds",
                              "Deadline minus finish time of ended batches (negative: "
                              "missed; prometheus-client leaves out _count and _sum while "
                              "the sum is negative)", labels=["model_name"])
    cum, buckets = 0, []
    for bound, n in zip(list(SLACK_BUCKETS_S) + [float("inf")], d.slack_hist):
        cum += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
    h.add_metric([model], buckets, sum_value=d.slack_sum_s)
    yield h


class ObservedStream:
    """A `RequestStream` stand-in that reports the request to `ServerMetrics` when its
    final delta is taken. Same consumer surface: `get`, iteration, `done`, `request_id`."""

    def __init__(self, inner: RequestStream, request: GenerationRequest,
                 metrics: ServerMetrics) -> None:
        self._inner, self._request, self._metrics = inner, request, metrics
        self.request_id = inner.request_id
        self.done = inner.done
        self._last: Optional[float] = None  # when the previous token-bearing delta was taken

    def _seen(self, out: RequestOutput) -> RequestOutput:
        """Observe a delta as its consumer takes it. Inter-token gaps are recorded for
        online requests only: their consumers (gRPC Generate, HTTP) take deltas as they
        come, while the batch runner polls offline streams in bursts."""
        if out.token_ids and self._request.request_class is RequestClass.ONLINE:
            now = time.monotonic()
            if self._last is not None:
                gap = (now - self._last) / len(out.token_ids)
                h = self._metrics.itl.labels(self._metrics.model_name, "online")
                for _ in out.token_ids:
                    h.observe(gap)
            self._last = now
        if out.finished:
            self._metrics.observe_finished(self._request, out)
        return out

    def put(self, out: RequestOutput) -> None:
        self._inner.put(out)

    def set_listener(self, fn) -> None:
        self._inner.set_listener(fn)

    def get(self, timeout: Optional[float] = None) -> RequestOutput:
        return self._seen(self._inner.get(timeout=timeout))

    def __iter__(self) -> Iterator[RequestOutput]:
        for out in self._inner:
            yield self._seen(out)


class ObservedEngine:
    """Wraps an `EngineAPI` so every submitted request is observed by `ServerMetrics`.
    Everything else is delegated unchanged; the server's faces use this wrapper."""

    def __init__(self, engine, metrics: ServerMetrics) -> None:
        self._engine = engine
        self._metrics = metrics

    def submit(self, request: GenerationRequest, **kw) -> ObservedStream:
        """`kw`: the wrapped engine's extra submit arguments (e.g. `resume`)."""
        return ObservedStream(self._engine.submit(request, **kw), request, self._metrics)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def serve_metrics(metrics: ServerMetrics, host: str, port: int, tls_cert: Optional[bytes] = None,
                  tls_key: Optional[bytes] = None):
    """Serve `/metrics` alone (prometheus-client's exporter thread) for processes that run
    without the HTTP front. Returns (server with `.shutdown()`, bound port)."""
    from prometheus_client import start_http_server

    from conserve_server.pem import pem_files

    if tls_cert is not None and tls_key is not None:
        with pem_files(tls_cert, tls_key) as (cert_path, key_path):
            httpd, _ = start_http_server(port, addr=host, registry=metrics.registry,
                                         certfile=cert_path, keyfile=key_path)
    else:
        httpd, _ = start_http_server(port, addr=host, registry=metrics.registry)
    return httpd, httpd.server_address[1]
