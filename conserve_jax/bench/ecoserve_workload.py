"""The KV-bound online workload of the EcoServe benchmark (helpers of `ecoserve`, run as
scripts/bench_ecoserve.py: workload, natural lengths, metrics).

Arrivals and sizes come from the Azure LLM inference trace 2023, conversation service
(CC-BY 4.0, Patel et al., "Splitwise", ISCA 2024; see data/traces/README.md): the
`n = rate * duration` consecutive rows from trace time `start_s`, gaps stretched uniformly
to the mean rate (burst shape kept). Prompt = a shared 24-token system prefix (the same
for every request, as a chat template would be), a 3-token task marker, then random
content of clamp(ContextTokens / 8, 16, 256) tokens.

Natural answer lengths (greedy, EOS honoured, generous max_tokens for all): a random-weight
model has no idea when an answer ends, so each request gets an end of its own that the
scheduler cannot see: a one-token stop (stop_token_ids) chosen from the request's own
greedy continuation, computed once by a pre-pass (fcfs, ignore_eos, max_tokens tokens): the
token whose first occurrence is closest to the target length clamp(GeneratedTokens / 3, 4,
max_tokens - 1). The request then stops there ("stop") exactly as if it had produced EOS.
Targets follow the trace's (long-tailed, bimodal) length distribution; where the
continuation has no new token near the target, the end falls at the nearest one.
The task marker is the trace row's length class (quartile of GeneratedTokens over the
pool of rows), standing in for instructions that predict answer length ("summarise" vs "write");
`hint_frac` of requests also carry `expected_output_tokens` = natural length x
lognormal(0, 0.3) (a noisy client guess).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from conserve_jax.loadtest.trace import read_azure_trace

SYSTEM_LEN, MARKER_LEN = 24, 3


@dataclass
class Item:
    rid: str
    arrival_s: float
    prompt: list
    target: int  # wanted natural length (from the trace)
    kind: int
    natural: int = 0  # natural length after the pre-pass
    stop_token: int = -1
    hint: int | None = None


def build(trace: str, rate: float, duration: float, vocab: int, max_tokens: int,
          start_s: float = 600.0, seed: int = 0, pool: int = 1000,
          n: int | None = None) -> list[Item]:
    """The first n (default rate * duration) rows of the pool; row i's request is the same
    at every rate (so one pre-pass over the pool serves every run)."""
    rows = [r for r in read_azure_trace(trace) if r.arrival_s >= start_s][:pool]
    n = n or max(2, round(rate * duration))
    if len(rows) < n:
        raise ValueError(f"the pool has {len(rows)} rows, {n} needed (raise --pool)")
    q = np.percentile([r.output_len for r in rows], [25, 50, 75])
    rows = rows[:n]
    t0, span = rows[0].arrival_s, rows[-1].arrival_s - rows[0].arrival_s
    stretch = (duration / n) / (span / (n - 1)) if span > 0 else 0.0
    sysp = [int(x) for x in np.random.default_rng(seed).integers(5, vocab, SYSTEM_LEN)]
    out = []
    for i, r in enumerate(rows):
        # per-row RNG: the i-th request is the same at every rate (lower rates: a prefix)
        rng = np.random.default_rng([seed, i])
        kind = int(np.searchsorted(q, r.output_len))
        marker = [7 + 3 * kind + j for j in range(MARKER_LEN)]
        plen = int(np.clip(round(r.input_len / 8), 16, 256))
        content = [int(x) for x in rng.integers(5, vocab, plen)]
        target = int(np.clip(round(r.output_len / 3), 4, max_tokens - 1))
        out.append(Item(f"r{i}", (r.arrival_s - t0) * stretch, sysp + marker + content,
                        target, kind))
    return out


def assign_ends(items: list[Item], continuations: dict, hint_frac: float, seed: int = 0) -> None:
    """Pick each item's stop token from its greedy continuation (see module docstring)."""
    for it in items:
        cont = continuations[it.rid]
        firsts, seen = [], set()
        for pos, tok in enumerate(cont):
            if tok not in seen:
                seen.add(tok)
                if pos >= 1:
                    firsts.append(pos)
        if firsts:
            pos = min(firsts, key=lambda p: (abs(p + 1 - it.target), p))
            it.natural, it.stop_token = pos + 1, int(cont[pos])
        else:  # never a new token: runs to max_tokens
            it.natural, it.stop_token = len(cont), -1
        rng = np.random.default_rng([seed, 7, int(it.rid[1:])])
        if rng.random() < hint_frac:
            it.hint = max(1, int(round(it.natural * float(np.exp(rng.normal(0, 0.3))))))


def load_or_run_prepass(path: str, items: list[Item], run) -> dict:
    """{rid: greedy continuation}, cached in `path` (keyed by the prompts' hash)."""
    key = str(hash(tuple(tuple(it.prompt) for it in items)) & 0xFFFFFFFF)
    if os.path.exists(path):
        with open(path) as f:
            d = json.load(f)
        if d.get("key") == key:
            return d["continuations"]
    cont = run(items)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "continuations": cont}, f)
    return cont


def pct(xs, q):
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


def summarize(records: list[dict], duration: float, ttft: float, tpot: float) -> dict:
    """Per-policy metrics from per-request records {arrival, ttft, tpot, jct, finished}."""
    n = len(records)
    met = [r for r in records if r["finished"] and r["ttft"] is not None and r["ttft"] <= ttft
           and (r["tpot"] is None or r["tpot"] <= tpot)]
    jct = [r["jct"] for r in records if r["jct"] is not None]
    return {"requests": n, "finished": sum(r["finished"] for r in records),
            "slo_attainment": len(met) / n if n else None,
            "goodput_rps": len(met) / duration,
            "mean_jct_s": float(np.mean(jct)) if jct else None, "p99_jct_s": pct(jct, 99),
            "ttft_p50_s": pct([r["ttft"] for r in records], 50),
            "ttft_p99_s": pct([r["ttft"] for r in records], 99),
            "tpot_p50_s": pct([r["tpot"] for r in records], 50),
            "tpot_p99_s": pct([r["tpot"] for r in records], 99)}


def max_rate_at(rates: list, att: list, level: float = 0.9):
    """Highest rate with attainment >= level, linearly interpolated to the crossing with the
    next tested rate; None if even the lowest rate misses."""
    best = None
    for i, (r, a) in enumerate(zip(rates, att)):
        if a is None or a < level:
            if best is not None and i > 0 and att[i - 1] is not None and att[i - 1] >= level:
                a0, r0 = att[i - 1], rates[i - 1]
                best = r0 + (r - r0) * (a0 - level) / (a0 - a) if a0 != a else r0
            return best
        best = r
    return best


def median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None
