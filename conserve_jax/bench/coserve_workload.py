"""The co-serving benchmark's workload (a helper of `coserve`, run as
scripts/bench_coserve.py; its statistics and report are in `coserve_report`).

Online load: a window of the Azure LLM inference trace 2023, conversation service
(`data/traces/azure_llm_2023_conv.csv`; CC-BY 4.0, Patel et al., "Splitwise", ISCA 2024;
see data/traces/README.md). How it is shaped, in this order:
1. window: the `n = round(rate * duration)` consecutive rows starting at trace time
   `start_s` (default 600 s into the trace, past its first minutes);
2. arrival times: re-based to 0 and multiplied by `duration / n / mean gap`, i.e. the
   window's gaps are stretched uniformly so that its mean rate is `rate` req/s (the
   shape of the bursts is kept; the last arrival lands just before `duration`);
3. token counts: prompt = clamp(round(ContextTokens / prompt_div), prompt_min, prompt_max),
   output = clamp(round(GeneratedTokens / output_div), output_min, output_max)
   (defaults: both /8, prompt in [16, 512], output in [8, 64]);
4. prompt token ids: uniform random ids in [5, vocab) from a seeded numpy RNG (the trace
   has no text); every request forces its output length (greedy, ignore_eos).

Offline load: `offline_requests` requests submitted together at t=0 (before the first
online arrival), prompt lengths uniform in [offline_prompt_min, offline_prompt_max], output
lengths uniform in [offline_output_min, offline_output_max], same RNG. There are more of
them than the engine can finish in the run, so offline work is never short (saturating).

Every policy gets exactly the same requests (same ids, lengths, arrival times).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from conserve_jax.loadtest.trace import read_azure_trace

# the repository's copy of the trace (conserve_jax/bench/ -> the repository root)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACE = os.path.join(REPO, "data", "traces", "azure_llm_2023_conv.csv")


@dataclass
class WorkloadSpec:
    duration_s: float = 120.0
    rate: float = 0.4  # online requests per second
    trace_path: str = TRACE
    trace_start_s: float = 600.0
    prompt_div: float = 8.0
    prompt_min: int = 16
    prompt_max: int = 512
    output_div: float = 8.0
    output_min: int = 8
    output_max: int = 64
    offline_requests: int = 64
    offline_prompt_min: int = 512
    offline_prompt_max: int = 1024
    offline_output_min: int = 64
    offline_output_max: int = 128
    seed: int = 0


@dataclass
class Req:
    request_id: str
    arrival_s: float  # 0 for offline requests
    prompt: list
    output_len: int
    trace_prompt: Optional[int] = None  # original ContextTokens (online only)
    trace_output: Optional[int] = None


@dataclass
class Workload:
    spec: WorkloadSpec
    online: list
    offline: list
    trace_window: tuple  # (first row's trace time, last row's trace time), seconds

    def describe(self) -> dict:
        """What the JSON's `workload` section says: the recipe and the realised numbers."""
        s = self.spec
        on_p = [len(r.prompt) for r in self.online]
        on_o = [r.output_len for r in self.online]
        off_p = [len(r.prompt) for r in self.offline]
        off_o = [r.output_len for r in self.offline]
        return {
            "spec": dataclasses.asdict(s),
            "online": {
                "source": "Azure LLM inference trace 2023 (conversation), CC-BY 4.0, "
                          "Patel et al., Splitwise, ISCA 2024",
                "window": f"{len(self.online)} consecutive rows from trace time "
                          f"{self.trace_window[0]:.1f}s to {self.trace_window[1]:.1f}s",
                "arrivals": f"gaps stretched uniformly to a mean rate of {s.rate} req/s "
                            f"over {s.duration_s:.0f}s (burst shape kept)",
                "prompt_tokens": f"clamp(round(ContextTokens/{s.prompt_div:g}), "
                                 f"{s.prompt_min}, {s.prompt_max})",
                "output_tokens": f"clamp(round(GeneratedTokens/{s.output_div:g}), "
                                 f"{s.output_min}, {s.output_max}), forced (ignore_eos)",
                "token_ids": f"uniform random in [5, vocab), numpy seed {s.seed}",
                "requests": len(self.online),
                "prompt_mean": _mean(on_p), "prompt_max": max(on_p, default=0),
                "output_mean": _mean(on_o), "output_max": max(on_o, default=0),
            },
            "offline": {
                "requests": len(self.offline), "submitted_at_s": 0.0,
                "prompt_tokens": f"uniform in [{s.offline_prompt_min}, {s.offline_prompt_max}]",
                "output_tokens": f"uniform in [{s.offline_output_min}, {s.offline_output_max}]",
                "prompt_mean": _mean(off_p), "output_mean": _mean(off_o),
            },
            "sampling": "greedy (temperature 0), ignore_eos, max_tokens = output length",
        }


def _mean(xs) -> Optional[float]:
    return round(float(np.mean(xs)), 1) if xs else None


def build(spec: WorkloadSpec, vocab_size: int, max_model_len: int) -> Workload:
    """The workload for `spec`; lengths are also clamped so that prompt + output fits
    `max_model_len` (the engine refuses longer requests)."""
    rng = np.random.default_rng(spec.seed)
    n = max(1, round(spec.rate * spec.duration_s))
    rows = [r for r in read_azure_trace(spec.trace_path) if r.arrival_s >= spec.trace_start_s]
    if len(rows) < n:
        raise ValueError(f"the trace has only {len(rows)} rows after {spec.trace_start_s}s; "
                         f"{n} are needed (lower --rate or --duration)")
    rows = rows[:n]
    t0 = rows[0].arrival_s
    span = rows[-1].arrival_s - t0
    mean_gap = span / max(1, n - 1) if n > 1 else 1.0
    stretch = (spec.duration_s / n) / mean_gap if mean_gap > 0 else 0.0

    def ids(k: int) -> list:
        return [int(x) for x in rng.integers(5, vocab_size, k)]

    def fit(p: int, o: int) -> tuple:
        p = min(p, max_model_len - 1 - o)
        return max(1, p), o

    online = []
    for i, r in enumerate(rows):
        p = int(np.clip(round(r.input_len / spec.prompt_div), spec.prompt_min, spec.prompt_max))
        o = int(np.clip(round(r.output_len / spec.output_div), spec.output_min, spec.output_max))
        p, o = fit(p, o)
        online.append(Req(f"on-{i}", (r.arrival_s - t0) * stretch, ids(p), o,
                          r.input_len, r.output_len))
    offline = []
    for i in range(spec.offline_requests):
        p = int(rng.integers(spec.offline_prompt_min, spec.offline_prompt_max + 1))
        o = int(rng.integers(spec.offline_output_min, spec.offline_output_max + 1))
        p, o = fit(p, o)
        offline.append(Req(f"off-{i}", 0.0, ids(p), o))
    return Workload(spec, online, offline, (t0, rows[-1].arrival_s))
