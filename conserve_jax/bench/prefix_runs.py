"""The prefix-caching benchmark's timed runs: each function runs one side of one repeat on one
engine and returns its metrics (a helper of `prefix`, run as scripts/bench_prefix.py).

- `run_batch(eng, items)`: every item submitted at once as OFFLINE (greedy, ignore_eos),
  timed from the first submit to the last finish; (metrics, outputs). Metrics: time,
  served/processed tokens/s, computed prefill tokens (the engine's stats delta), hit tokens
  (num_cached_tokens) and rate, the stats' hit/query tokens, evictions, unfinished items,
  compiles while measured.
- `run_chat(a, eng, script, tag)`: every conversation on its own thread, turns in sequence
  (turn k's prompt = turn k-1's prompt + the answer + the new user tokens); client-side
  TTFT per turn; (metrics with per-turn p50/p99 and hit rates and the hit-rate optimum,
  answers per conversation and turn). A failed conversation raises.
- `run_coserve(a, engines, label, policy, cache_on, online, offline)`: one co-serving run on
  a fresh engine: the offline batch submitted at t=0 (where the policy takes offline work),
  the online trace driven by bench_coserve's `drive_online`; online TTFT/TPOT percentiles
  and SLO attainment, offline tokens/s in the arrival window. The engine is shut down and
  released before it returns.
Every run starts and ends on a settled engine (prefix_engines.settled); the metric names
are the result JSON's keys.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from conserve_jax.bench import coserve as cs
from conserve_jax.bench import coserve_report as report
from conserve_jax.bench import prefix_workload as wl
from conserve_jax.bench.prefix_engines import Engines, collect, coserve_config, greedy, settled
from conserve_jax.bench.prefix_workload import div, pct
from conserve_jax.engine.engine import Engine
from conserve_jax.engine_api import SLO, EngineStats, GenerationRequest, RequestClass


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _delta(st: EngineStats, base: EngineStats, name: str) -> int:
    return getattr(st, name) - getattr(base, name)


# ---- offline batches (offline, nosharing) ------------------------------------------------
def run_batch(eng: Engine, items: list) -> tuple:
    """Submit every item at once (offline), wait for all; (metrics, outputs)."""
    base = settled(eng)
    c0 = eng.compiled_count()
    t0 = time.monotonic()
    streams = [eng.submit(GenerationRequest(it.request_id, list(it.prompt), greedy(it.output_len),
                                            RequestClass.OFFLINE)) for it in items]
    outs, finals = [], []
    for s in streams:
        toks, fin, _ = collect(s)
        outs.append(toks)
        finals.append(fin)
    elapsed = time.monotonic() - t0
    st = settled(eng)
    prompt = sum(len(it.prompt) for it in items)
    output = sum(len(o) for o in outs)
    prefill = _delta(st, base, "offline_prefill_tokens_total")
    hits = sum(f.num_cached_tokens or 0 for f in finals)
    m = {"time_s": elapsed, "served_tokens_per_s": (prompt + output) / elapsed,
         "processed_tokens_per_s": (prefill + output) / elapsed,
         "computed_prefill_tokens": prefill, "prompt_tokens": prompt, "output_tokens": output,
         "hit_tokens": hits, "hit_rate": hits / prompt,
         "stats_hit_tokens": _delta(st, base, "prefix_cache_hits_offline"),
         "stats_query_tokens": _delta(st, base, "prefix_cache_queries_offline"),
         "prefix_cache_evictions": _delta(st, base, "prefix_cache_evictions"),
         "kv_blocks_cached_free_after": st.kv_blocks_cached_free,
         "evictions": _delta(st, base, "evictions"),
         "recomputed_tokens": _delta(st, base, "recomputed_tokens"),
         "iterations": _delta(st, base, "iterations"),
         "unfinished": sum(f.finish_reason != "length" for f in finals),
         "compiles_during_run": eng.compiled_count() - c0}
    return m, outs


# ---- chat ------------------------------------------------------------------------------
def run_chat(a, eng: Engine, script: wl.ChatScript, tag: str) -> tuple:
    """Every conversation on its own thread, turns in sequence; (metrics, answers)."""
    C, K = script.conversations, script.turns
    recs = [[None] * K for _ in range(C)]
    errors: list = []
    slo = SLO(a.ttft, a.tpot)

    def conversation(c: int) -> None:
        try:
            history: list = []
            for k in range(K):
                prompt = history + script.users[c][k]
                req = GenerationRequest(f"{tag}-c{c}-t{k}", prompt,
                                        greedy(script.answer_lens[c][k]),
                                        RequestClass.ONLINE, slo)
                t_sub = time.monotonic()
                toks, fin, first = collect(eng.submit(req))
                recs[c][k] = {"prompt": prompt, "answer": toks,
                              "ttft_s": first - t_sub if first is not None else None,
                              "cached": fin.num_cached_tokens or 0, "reason": fin.finish_reason}
                history = prompt + toks
        except Exception as e:  # reported by the main thread
            errors.append(f"conversation {c}: {type(e).__name__}: {e}")

    base = settled(eng)
    c0 = eng.compiled_count()
    t0 = time.monotonic()
    threads = [threading.Thread(target=conversation, args=(c,), daemon=True) for c in range(C)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError("; ".join(errors))
    st = settled(eng)
    m: dict = {"time_s": elapsed}
    turns = []
    for k in range(K):
        rs = [recs[c][k] for c in range(C)]
        p = sum(len(r["prompt"]) for r in rs)
        h = sum(r["cached"] for r in rs)
        t = {"turn": k + 1, "ttft_p50_s": pct([r["ttft_s"] for r in rs], 50),
             "ttft_p99_s": pct([r["ttft_s"] for r in rs], 99),
             "ttft_mean_s": _mean([r["ttft_s"] for r in rs]),
             "prompt_tokens_mean": p / C, "hit_tokens": h, "hit_rate": h / p}
        turns.append(t)
        for key in ("ttft_p50_s", "ttft_p99_s", "prompt_tokens_mean", "hit_rate"):
            m[f"turn{k + 1}_{key}"] = t[key]
    order = [(c, k) for c in range(C) for k in range(K)]
    prompts = [recs[c][k]["prompt"] for c, k in order]
    answers = [recs[c][k]["answer"] for c, k in order]
    opt = sum(wl.optimal_hit_tokens(prompts, answers, a.block_size))
    ptoks = sum(len(p) for p in prompts)
    hits = sum(recs[c][k]["cached"] for c, k in order)
    m.update(prompt_tokens=ptoks, hit_tokens=hits, hit_rate=hits / ptoks,
             optimal_hit_tokens=opt, optimal_hit_rate=opt / ptoks, hit_vs_optimal=div(hits, opt),
             computed_prefill_tokens=_delta(st, base, "online_prefill_tokens_total"),
             stats_hit_tokens=_delta(st, base, "prefix_cache_hits_online"),
             unfinished=sum(recs[c][k]["reason"] != "length" for c, k in order),
             compiles_during_run=eng.compiled_count() - c0, turns=turns)
    return m, [[recs[c][k]["answer"] for k in range(K)] for c in range(C)]


# ---- co-serving ------------------------------------------------------------------------
def run_coserve(a, engines: Engines, label: str, policy: str, cache_on: bool, online: list,
                offline: list) -> dict:
    """One co-serving run on a fresh engine (bench_coserve's run, with the window's stats)."""
    eng = engines.build(coserve_config(a, policy, cache_on), "coserve")
    slo, stop = SLO(a.ttft, a.tpot), threading.Event()
    base = settled(eng)
    c0 = eng.compiled_count()
    t0 = time.monotonic()
    if eng.policy.accepts(GenerationRequest("x", [5], request_class=RequestClass.OFFLINE)):
        for it in offline:
            eng.submit(GenerationRequest(it.request_id, list(it.prompt), greedy(it.output_len),
                                         RequestClass.OFFLINE))
    clients, st_win, win_s, t_end, st = cs.drive_online(eng, online, slo, stop, t0,
                                                        a.coserve_duration, a.drain)
    stop.set()
    compiles = eng.compiled_count() - c0
    eng.shutdown()
    cs.release(eng)
    reqs = [report.request_record(c, t0, t_end, a.ttft, a.tpot) for c in clients]
    prefill = _delta(st_win, base, "offline_prefill_tokens_total")
    decode = _delta(st_win, base, "offline_tokens_total")
    hits = _delta(st_win, base, "prefix_cache_hits_offline")
    queries = _delta(st, base, "prefix_cache_queries_offline")
    return {
        "label": label, "policy": policy, "prefix_caching": cache_on,
        "online_ttft_p50_s": pct([r["ttft_s"] for r in reqs], 50),
        "online_ttft_p99_s": pct([r["ttft_s"] for r in reqs], 99),
        "online_tpot_p50_s": pct([r["tpot_s"] for r in reqs], 50),
        "online_tpot_p99_s": pct([r["tpot_s"] for r in reqs], 99),
        "slo_attainment": sum(r["slo_met"] for r in reqs) / max(1, len(reqs)),
        "online_requests": len(reqs), "online_unfinished": sum(not r["finished"] for r in reqs),
        "offline_served_tokens_per_s": (prefill + decode + hits) / win_s,
        "offline_processed_tokens_per_s": (prefill + decode) / win_s,
        "offline_output_tokens_per_s": decode / win_s,
        "offline_prefill_tokens_in_window": prefill, "offline_output_tokens_in_window": decode,
        "offline_hit_tokens_in_window": hits,
        "offline_hit_rate": div(_delta(st, base, "prefix_cache_hits_offline"), queries),
        "offline_waiting_at_window_end": st_win.offline_waiting,
        "preemptions": _delta(st, base, "preemptions"),
        "evictions": _delta(st, base, "evictions"),
        "recomputed_tokens": _delta(st, base, "recomputed_tokens"),
        "restored_tokens": _delta(st, base, "restored_tokens"),
        "prefix_cache_evictions": _delta(st, base, "prefix_cache_evictions"),
        "window_s": win_s, "drain_s": t_end - t0 - win_s, "compiles_during_run": compiles,
    }
