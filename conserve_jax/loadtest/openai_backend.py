"""`OpenAIClient`: the load tester's backend for any OpenAI-compatible HTTP server
(`conserve-jax loadtest --backend openai`), with the surface `ClientAdapter` drives
(`generate`, `submit_batch`, `get_batch`, `batch_results`, `cancel_batch`, `stats`, `close`).

- Online requests: `POST /v1/completions` with the prompt as token ids, `stream: true`,
  `stream_options.include_usage`, `ignore_eos`, and the objectives as the extra fields
  `ttft_s`/`tpot_s` (servers that do not know them ignore them). Each content chunk counts
  as one token (as vLLM's benchmark_serving does); the final usage chunk settles the exact
  count, delivered with the finished chunk.
- Offline load, `offline_via="batch"`: the Batch API (upload a JSONL file, create a batch
  with a 24h completion window, poll it, read the output/error files).
  `offline_via="flex"`: each "batch" is a set of `service_tier: "flex"` requests sent by
  `flex.FlexBatch` threads, with the same status/results/cancel surface.
- `stats()` scrapes `/metrics` and maps conserve's metrics onto the `GetServerStats` field
  names the report uses (`stats_from_metrics`: a sample matches when it has the labels
  asked for, whatever others it carries, e.g. `model_name`); for servers without them it
  returns what it can (maybe `{}`).

HTTP goes through one `HttpPool` (aiohttp on one event-loop thread, keep-alive connections
reused across requests), so client overhead does not inflate the latencies it measures at
high rates; aiohttp comes with the `bench` extra. Thread-safety: one client serves many
threads (the runner's workers, flex batches); `close()` stops its pool.
"""
from __future__ import annotations

import json
import re
import ssl
import threading
import uuid
from typing import Any, Iterator, Optional

from conserve_jax.loadtest.http_pool import HttpPool, LineStream
from conserve_jax.loadtest.openai_flex import FlexBatch
from conserve_jax.loadtest.openai_types import BatchInfo, BatchResult, Chunk, HttpError

_STATES = {"validating": "queued", "in_progress": "running", "finalizing": "running",
           "cancelling": "running", "completed": "completed", "cancelled": "cancelled",
           "expired": "failed", "failed": "failed"}
_ONLINE, _OFFLINE = (("class", "online"),), (("class", "offline"),)
_STATS = {  # GetServerStats field <- (metric, labels it must have) in conserve's /metrics
    "online_tokens_total": ("conserve_generation_tokens_total", _ONLINE),
    "offline_tokens_total": ("conserve_generation_tokens_total", _OFFLINE),
    "online_prefill_tokens_total": ("conserve_prompt_tokens_total", _ONLINE),
    "offline_prefill_tokens_total": ("conserve_prompt_tokens_total", _OFFLINE),
    "preemptions": ("conserve_preemptions_total", ()),
    "preempted_tokens_discarded": ("conserve_preempted_tokens_discarded_total", ()),
    "evictions": ("conserve_evictions_total", ()),
    "restored_tokens": ("conserve_restored_tokens_total", ()),
    "recomputed_tokens": ("conserve_recomputed_tokens_total", ()),
    "iterations": ("conserve_iterations_total", ()),
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? (\S+)", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def stats_from_metrics(text: str) -> dict[str, float]:
    """The `_STATS` fields found in a Prometheus text exposition: for each, the sum of the
    metric's samples that carry its labels (other labels, e.g. `model_name`, are ignored;
    a server serves one model, so there is one such sample)."""
    found: dict[str, float] = {}
    wanted = {metric for metric, _ in _STATS.values()}
    samples = []
    for m in _SAMPLE.finditer(text):
        if m.group(1) in wanted:
            samples.append((m.group(1), set(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    for field, (metric, labels) in _STATS.items():
        hits = [v for name, have, v in samples if name == metric and set(labels) <= have]
        if hits:
            found[field] = sum(hits)
    return found


class _Stream:
    """Iterates one streamed completion as `Chunk`s; `cancel()` aborts the request."""

    def __init__(self, lines: LineStream) -> None:
        self._lines = lines
        self._finished = False  # the finished chunk was handed out

    def cancel(self) -> None:
        self._lines.cancel()

    def __iter__(self) -> Iterator[Chunk]:
        counted, reason = 0, None
        try:
            for raw in self._lines:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"] or {}
                    raise HttpError(500, err.get("message", "stream error"))
                if obj.get("usage") and not obj.get("choices"):
                    n = max(0, int(obj["usage"].get("completion_tokens", 0)) - counted)
                    counted += n
                    self._finished = True
                    yield Chunk([0] * n, True, reason or "stop")
                    return
                for ch in obj.get("choices") or ():
                    text = ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                    if ch.get("finish_reason"):
                        reason = ch["finish_reason"]
                    if text:
                        counted += 1
                        yield Chunk([0])
        except BaseException:  # abandoned or failed: drop the request; a finished one reads
            if not self._finished:  # its last line by itself and its connection is reused
                self.cancel()
            raise
        yield Chunk([], True, reason)  # a server that sent no usage chunk


class OpenAIClient:
    """See the module docstring. `target` is HOST:PORT or a base URL (http[s]://host:port[/v1])."""

    def __init__(self, target: str, token: Optional[str] = None, tls_ca: Optional[str] = None,
                 model: Optional[str] = None, offline_via: str = "batch",
                 flex_concurrency: int = 64) -> None:
        if offline_via not in ("batch", "flex"):
            raise ValueError(f"offline_via must be 'batch' or 'flex', got {offline_via!r}")
        if "," in target:
            raise ValueError("--target: the openai backend takes one server (HOST:PORT or a "
                             "base URL); several replicas need the grpc backend")
        if not re.match(r"^https?://", target):
            target = f"{'https' if tls_ca else 'http'}://{target}"
        target = target.rstrip("/")
        self.base = target if target.endswith("/v1") else target + "/v1"
        self.root = self.base[: -len("/v1")]
        self.token = token
        self.ssl = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.http = HttpPool({"Authorization": f"Bearer {token}"} if token else None, self.ssl)
        self.offline_via = offline_via
        self.flex_concurrency = flex_concurrency
        self._flex: dict[str, FlexBatch] = {}
        self._lock = threading.Lock()
        self._model = model

    # ---- HTTP --------------------------------------------------------------------------
    def _json(self, method: str, path: str, payload: Any = None, timeout: Optional[float] = None):
        body = json.dumps(payload).encode() if payload is not None else None
        return json.loads(self.http.request(method, self.base + path, body, timeout=timeout))

    @property
    def model(self) -> str:
        if self._model is None:
            models = self._json("GET", "/models")["data"]
            if not models:
                raise HttpError(404, "the server lists no models")
            self._model = models[0]["id"]
        return self._model

    def completion_body(self, token_ids: list[int], max_tokens: int, ignore_eos: bool = True,
                        ttft: Optional[float] = None, tpot: Optional[float] = None,
                        stream: bool = False, tier: Optional[str] = None) -> dict:
        body: dict[str, Any] = {"model": self.model, "prompt": list(token_ids),
                                "max_tokens": int(max_tokens), "ignore_eos": ignore_eos,
                                "temperature": 0.0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if ttft is not None:
            body["ttft_s"] = ttft
        if tpot is not None:
            body["tpot_s"] = tpot
        if tier:
            body["service_tier"] = tier
        return body

    # ---- online ------------------------------------------------------------------------
    def generate(self, token_ids: list[int], max_tokens: int, ignore_eos: bool = True,
                 timeout: Optional[float] = None, ttft: Optional[float] = None,
                 tpot: Optional[float] = None, tier: Optional[str] = None) -> _Stream:
        body = self.completion_body(token_ids, max_tokens, ignore_eos, ttft, tpot, True, tier)
        return _Stream(self.http.stream("POST", self.base + "/completions",
                                        json.dumps(body).encode(), timeout))

    # ---- offline -----------------------------------------------------------------------
    def submit_batch(self, requests: list[dict], timeout: Optional[float] = None) -> str:
        if self.offline_via == "flex":
            fb = FlexBatch(self.generate, requests, self.flex_concurrency)
            with self._lock:
                self._flex[fb.batch_id] = fb
            fb.start()
            return fb.batch_id
        lines = []
        for i, r in enumerate(requests):
            body = self.completion_body(r["token_ids"], r["max_tokens"], r.get("ignore_eos", True))
            lines.append(json.dumps({"custom_id": str(i), "method": "POST",
                                     "url": "/v1/completions", "body": body}))
        data = ("\n".join(lines) + "\n").encode()
        boundary = uuid.uuid4().hex
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"loadtest.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").encode()
        form += data + f"\r\n--{boundary}--\r\n".encode()
        file_id = json.loads(self.http.request("POST", self.base + "/files", form,
                                               f"multipart/form-data; boundary={boundary}",
                                               timeout))["id"]
        b = self._json("POST", "/batches", {"input_file_id": file_id, "endpoint": "/v1/completions",
                                            "completion_window": "24h"}, timeout)
        return b["id"]

    def _flex_batch(self, batch_id: str) -> Optional[FlexBatch]:
        with self._lock:
            return self._flex.get(batch_id)

    def get_batch(self, batch_id: str, timeout: Optional[float] = None) -> BatchInfo:
        fb = self._flex_batch(batch_id)
        if fb is not None:
            return BatchInfo(batch_id, *fb.status())
        b = self._json("GET", f"/batches/{batch_id}", timeout=timeout)
        c = b.get("request_counts") or {}
        return BatchInfo(batch_id, _STATES.get(b.get("status"), b.get("status", "")),
                         int(c.get("total", 0)), int(c.get("completed", 0)) + int(c.get("failed", 0)),
                         int(c.get("failed", 0)))

    def batch_results(self, batch_id: str, start: int = 0,
                      timeout: Optional[float] = None) -> Iterator[BatchResult]:
        fb = self._flex_batch(batch_id)
        if fb is not None:
            yield from (r for r in fb.results() if r.index >= start)
            return
        b = self._json("GET", f"/batches/{batch_id}", timeout=timeout)
        out: list[BatchResult] = []
        for key, ok in (("output_file_id", True), ("error_file_id", False)):
            if not b.get(key):
                continue
            raw = self.http.request("GET", f"{self.base}/files/{b[key]}/content", timeout=timeout)
            for line in raw.decode().splitlines():
                if line.strip():
                    out.append(_result_of(json.loads(line), ok))
        out.sort(key=lambda r: r.index)
        yield from (r for r in out if r.index >= start)

    def cancel_batch(self, batch_id: str, timeout: Optional[float] = None) -> BatchInfo:
        fb = self._flex_batch(batch_id)
        if fb is not None:
            fb.cancel()
            return self.get_batch(batch_id)
        self._json("POST", f"/batches/{batch_id}/cancel", timeout=timeout)
        return self.get_batch(batch_id, timeout)

    # ---- stats -------------------------------------------------------------------------
    def stats(self, timeout: Optional[float] = None) -> dict[str, float]:
        text = self.http.request("GET", self.root + "/metrics", timeout=timeout).decode()
        return stats_from_metrics(text)

    def close(self) -> None:
        with self._lock:
            batches = list(self._flex.values())
        for fb in batches:
            fb.cancel()
        self.http.close()


def _result_of(line: dict, ok: bool) -> BatchResult:
    try:
        index = int(line.get("custom_id"))
    except (TypeError, ValueError):
        index = -1
    resp = line.get("response") or {}
    body = resp.get("body") or {}
    if ok and resp.get("status_code") == 200:
        n = int((body.get("usage") or {}).get("completion_tokens", 0))
        reason = ((body.get("choices") or [{}])[0]).get("finish_reason") or "stop"
        return BatchResult(index, [0] * n, reason)
    code = (line.get("error") or {}).get("code") or ""
    return BatchResult(index, [], "cancelled" if "cancel" in code else "error")
