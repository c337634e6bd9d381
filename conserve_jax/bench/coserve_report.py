"""The co-serving benchmark's statistics and report (helpers of `coserve`, run as
scripts/bench_coserve.py): one online request's record, percentiles and medians, the
offline rate over time, the safepoint interval, issue 7's targets, the idle-harvest
ceiling, the printed table and the per-policy plot. Pure functions of the measured
numbers; matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def request_record(c, t0: float, t_end: float, ttft_slo: float, tpot_slo: float) -> dict:
    """One online request as seen by its client thread `c` at time `t_end`."""
    times = [t for t in list(c.times) if t <= t_end]
    done = c.finish_t is not None and c.finish_t <= t_end and c.reason == "length"
    sub = c.submit_t if c.submit_t is not None else t_end
    ttft = times[0] - sub if times else t_end - sub  # censored when no token yet
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    met = done and ttft <= ttft_slo and (tpot is None or tpot <= tpot_slo)
    return {"id": c.req.request_id, "arrival_s": sub - t0, "ttft_s": ttft, "tpot_s": tpot,
            "tokens": len(times), "finished": done, "slo_met": met,
            "reason": c.reason or c.error}


def pct(xs, q) -> Optional[float]:
    """The q-th percentile (numpy linear interpolation), None for no data."""
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


def median_of(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def offline_rate_series(samples, window_s: float = 2.0):
    """(times, tokens/s) from samples [(t, offline_tokens_total), ...]: the rate over the
    trailing `window_s` at each sample."""
    ts = np.array([s[0] for s in samples], float)
    tot = np.array([s[1] for s in samples], float)
    out_t, out_r = [], []
    for i in range(1, len(ts)):
        j = int(np.searchsorted(ts, ts[i] - window_s))
        j = min(j, i - 1)
        if ts[i] > ts[j]:
            out_t.append(ts[i])
            out_r.append((tot[i] - tot[j]) / (ts[i] - ts[j]))
    return out_t, out_r


def plot_policy(path: str, name: str, requests: list, samples: list, ttft_slo: float,
                tpot_slo: float, duration_s: float) -> None:
    """One PNG: online TTFT and mean TPOT per request over arrival time (unfinished
    requests drawn as x at their censored TTFT), and offline tokens/s over time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    done = [r for r in requests if r["finished"]]
    cut = [r for r in requests if not r["finished"]]
    a1.scatter([r["arrival_s"] for r in done], [r["ttft_s"] for r in done], s=12, label="TTFT")
    if cut:
        a1.scatter([r["arrival_s"] for r in cut], [r["ttft_s"] for r in cut], marker="x",
                   color="red", label="unfinished (censored)")
    a1.axhline(ttft_slo, color="gray", ls="--", label=f"SLO {ttft_slo:g}s")
    a1.set_ylabel("TTFT (s)")
    a1.set_yscale("log")
    a1.legend(loc="upper right", fontsize=8)
    tp = [r for r in done if r["tpot_s"] is not None]
    a2.scatter([r["arrival_s"] for r in tp], [r["tpot_s"] for r in tp], s=12, color="C1",
               label="mean TPOT")
    a2.axhline(tpot_slo, color="gray", ls="--", label=f"SLO {tpot_slo:g}s")
    a2.set_ylabel("TPOT (s)")
    a2.legend(loc="upper right", fontsize=8)
    t, r = offline_rate_series(samples)
    a3.plot(t, r, color="C2")
    a3.axvline(duration_s, color="gray", ls=":", label="end of arrivals")
    a3.set_ylabel("offline tokens/s (2 s window)")
    a3.set_xlabel("time since start of run (s)")
    a3.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"policy {name}: online latency and offline throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def safepoint_interval(iter_s: list, stops: list, k: int, layers: int) -> dict:
    """k / layers of the typical completed offline-only iteration of conserve, typical as
    an arrival sees it: the time-weighted median (offline-only iterations are bimodal here,
    ~0.1 s decode-only and ~2 s with a prefill chunk; an arrival lands in the long ones).
    Also: the plain median, and the interval measured in the iterations preempted."""
    if not iter_s:
        return {"safepoint_interval_s": None, "offline_iterations": 0}
    xs = np.sort(np.asarray(iter_s))
    tw = float(xs[min(len(xs) - 1, int(np.searchsorted(np.cumsum(xs) / xs.sum(), 0.5)))])
    return {"safepoint_interval_s": tw * k / layers, "layers_per_safepoint": k,
            "num_layers": layers, "offline_iteration_time_weighted_median_s": tw,
            "offline_iteration_median_s": float(np.median(xs)), "offline_iterations": len(xs),
            "offline_iteration_s": [round(float(x), 4) for x in iter_s],
            "preempted_iterations_interval_median_s": pct(stops, 50)}


def targets(P: dict, ratio, sp_cost: dict) -> dict:
    """Issue 7's targets for `conserve` (its default variant): value, threshold, met."""
    def t(desc, value, thr, le, **extra):
        met = None if value is None else bool(value <= thr if le else value >= thr)
        return {"description": desc, "value": value, "threshold": thr, "met": met, **extra}

    def div(x, y):
        return None if x is None or y is None or y == 0 else x / y

    c, oo = P.get("conserve", {}), P.get("online-only", {})
    pr, npp = P.get("priority-recompute", {}), P.get("non-preemptive", {})
    g = lambda d, k: d.get(k)  # noqa: E731
    pr_ok = None
    keys = ("online_ttft_p99_s", "online_tpot_p99_s")
    if c and pr and all(g(d, k) is not None for d in (c, pr) for k in keys):
        pr_ok = all(g(c, k) <= g(pr, k) for k in keys)
    off = "offline_processed_tokens_per_s"
    over = [x for r in c.get("runs", []) for x in (r["preemption_detail"] or {}).get(
        "latency_over_layer_time", [])]
    layer_times = [x for r in c.get("runs", []) for x in (r["preemption_detail"] or {}).get(
        "layer_time_s", [])]
    shapes = sp_cost.get("shapes", {}) if sp_cost else {}
    out = {
        "ttft_p99_vs_online_only": t("conserve p99 TTFT / online-only p99 TTFT",
                                     div(g(c, "online_ttft_p99_s"), g(oo, "online_ttft_p99_s")), 1.2, True),
        "tpot_p99_vs_online_only": t("conserve p99 TPOT / online-only p99 TPOT",
                                     div(g(c, "online_tpot_p99_s"), g(oo, "online_tpot_p99_s")), 1.2, True),
        "offline_vs_priority_recompute": t(
            "conserve offline processed tokens/s / priority-recompute's, at equal or better online p99",
            div(g(c, off), g(pr, off)), 2.0, False, online_p99_equal_or_better=pr_ok),
        "offline_vs_non_preemptive": t("conserve offline processed tokens/s / non-preemptive's",
                                       div(g(c, off), g(npp, off)), 0.5, False),
        "preemption_latency_p99_vs_layer_time": t(
            "conserve p99 over preemptions of (arrival -> runner stopped) / that iteration's "
            "measured time per layer", pct(over, 99), 2.0, True,
            preemptions=len(over), preemption_latency_p99_s=g(c, "preemption_latency_p99_s"),
            layer_time_median_s=pct(layer_times, 50),
            check_call_s=sp_cost.get("check_call_s") if sp_cost else None,
            per_layer_safepoint_overhead_s={k: v["per_layer_safepoint_overhead_s"]
                                            for k, v in shapes.items()}),
        "resume_vs_recompute_ratio": t("resume cost / recompute cost at 1k context", ratio, 0.1, True),
    }
    o = out["offline_vs_priority_recompute"]
    if o["met"] is not None and pr_ok is not None:
        o["met"] = o["met"] and pr_ok
    return out


def idle_harvest(P: dict) -> dict:
    """How much of the offline work the online load leaves room for each policy harvested.
    The ceiling is non-preemptive's processed offline tokens/s scaled by the share of the
    window online-only's runner was not busy with online work: what an ideal co-server
    would get by running non-preemptive's offline batches in every idle moment and nothing
    alongside online iterations. `fraction` per policy = its offline processed tokens/s /
    the ceiling (above 1 only by carrying offline tokens in online iterations). None
    without both baselines."""
    oo, npp = P.get("online-only"), P.get("non-preemptive")
    off = "offline_processed_tokens_per_s"
    if not oo or not npp or oo.get("online_busy_fraction") is None or not npp.get(off):
        return {"ceiling_tokens_per_s": None, "fraction": {}}
    idle = 1.0 - oo["online_busy_fraction"]
    ceiling = idle * npp[off]
    return {"online_only_idle_fraction": idle, "non_preemptive_tokens_per_s": npp[off],
            "ceiling_tokens_per_s": ceiling,
            "fraction": {k: (m[off] / ceiling if ceiling > 0 else None) for k, m in P.items()
                         if k not in ("online-only", "non-preemptive") and m.get(off) is not None}}


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def print_table(res: dict) -> None:
    cols = [("policy", 19), ("TTFT p50", 9), ("TTFT p99", 9), ("TPOT p50", 9), ("TPOT p99", 9),
            ("SLO", 6), ("off tok/s", 9), ("proc tok/s", 10), ("preempt", 7), ("pl p50", 7), ("pl p99", 7),
            ("evict", 6), ("recomp", 7), ("restored", 8), ("online", 9)]
    print("  ".join(n.rjust(w) for n, w in cols))
    for name, m in res["policies"].items():
        row = [name, fmt(m["online_ttft_p50_s"]), fmt(m["online_ttft_p99_s"]),
               fmt(m["online_tpot_p50_s"]), fmt(m["online_tpot_p99_s"]),
               fmt(m["slo_attainment"], ".0%"), fmt(m["offline_tokens_per_s"], ".2f"),
               fmt(m["offline_processed_tokens_per_s"], ".1f"),
               fmt(m["preemptions"], ".0f"), fmt(m["preemption_latency_p50_s"]),
               fmt(m["preemption_latency_p99_s"]), fmt(m["evictions"], ".0f"),
               fmt(m["recomputed_tokens"], ".0f"), fmt(m["restored_tokens"], ".0f"),
               f"{fmt(m['online_requests'], '.0f')}({fmt(m['online_unfinished'], '.0f')} cut)"]
        print("  ".join(str(v).rjust(w) for v, (_, w) in zip(row, cols)))
    rv = res["resume_vs_recompute"]
    print(f"resume {rv['resume_s']:.4f}s vs recompute {rv['recompute_s']:.4f}s at "
          f"{rv['context_tokens']} tokens: ratio {rv['ratio']:.3f} (tokens match: {rv['tokens_match']})")
    print(f"safepoint interval: {fmt(res['safepoint_interval_s'], '.4f')}s")
    sc = res.get("safepoint_cost") or {}
    for label, v in sc.get("shapes", {}).items():
        it = v["iteration_s"]
        print(f"safepoint cost, {label}: iteration {it['none']:.4f}s (no safepoints), "
              f"{it['every_1']:.4f}s (every layer, x{v['every_1_vs_none']:.3f}), "
              f"{it['every_4']:.4f}s (every 4, x{v['every_4_vs_none']:.3f}); layer "
              f"{v['layer_time_s'] * 1e3:.2f} ms, per-layer safepoint overhead "
              f"{v['per_layer_safepoint_overhead_s'] * 1e6:.0f} us")
    if "check_call_s" in sc:
        print(f"one conserve safepoint check (nobody waiting): {sc['check_call_s'] * 1e6:.1f} us")
    for label, d in (res.get("sweep_dominance") or {}).items():
        print(f"sweep: {label} dominated by conserve: {d['dominated']} {d['dominated_by']}")
    ih = res.get("idle_harvest") or {}
    if ih.get("ceiling_tokens_per_s"):
        print(f"idle ceiling: {ih['online_only_idle_fraction']:.3f} idle x non-preemptive "
              f"{ih['non_preemptive_tokens_per_s']:.1f} = {ih['ceiling_tokens_per_s']:.1f} tok/s; "
              + ", ".join(f"{k} {fmt(v, '.2f')}" for k, v in ih["fraction"].items()))
    for k, v in res["targets"].items():
        print(f"target {k}: {fmt(v['value'])} (threshold {v['threshold']}) "
              f"{'MET' if v['met'] else 'n/a' if v['met'] is None else 'MISSED'}")
