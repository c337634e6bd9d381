"""How well does the online load of the last H seconds forecast the load of the next L
seconds? The deadline estimator (issue 27) assumes that the harvest rate it measured over
its window (`DeadlineOptions.harvest_window_s`) lasts for the job's life; this measures,
on the Azure conversation trace alone (no engine, no JAX), how often that assumption
holds within a given error for a few history lengths H and job lives L.

The trace's gaps are stretched uniformly to a mean of --rate requests/s, as
`coserve_workload` stretches its window for the benchmarks. For every start time s (every
--step-s seconds) it compares the load in [s - H, s) with the load in [s, s + L), as a
ratio (future / past), for two measures of load: requests, and tokens (prompt + output, the
trace's own lengths). Reported per (H, L) and measure: the share of start times whose
ratio is within 1 +- --tolerance, and the ratio's 10th / 50th / 90th percentiles. A job's
estimate error follows the harvest rate, not the online load itself, so this is a proxy:
with online work a share u of the engine, a change of x in the online load changes the
harvest rate by about -x u / (1 - u), more than x when u > 0.5.

    python scripts/bench_load_forecast.py --json out/load_forecast.json
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from conserve_jax.bench import script_io
from conserve_jax.bench.coserve_workload import TRACE
from conserve_jax.loadtest.trace import read_azure_trace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=TRACE, help="Azure LLM inference trace CSV")
    p.add_argument("--rate", type=float, default=0.4, help="mean online requests/s after stretching")
    p.add_argument("--history-s", default="24,48,120,240", help="history lengths H (s)")
    p.add_argument("--life-s", default="40,110,220", help="job lives L (s)")
    p.add_argument("--tolerance", type=float, default=0.25)
    p.add_argument("--step-s", type=float, default=5.0, help="seconds between start times")
    p.add_argument("--json", default="out/load_forecast.json")
    return p


def _cumulative(times: np.ndarray, weights: np.ndarray):
    """A function t -> total weight of the arrivals before t."""
    order = np.argsort(times)
    t, c = times[order], np.concatenate([[0.0], np.cumsum(weights[order])])
    return lambda x: c[np.searchsorted(t, x, side="left")]


def forecast_table(times: np.ndarray, weights: dict, histories: list, lives: list,
                   tolerance: float, step_s: float) -> list:
    """One row per (history, life, measure): the share of start times whose future/past
    load ratio is within 1 +- tolerance, and the ratio's percentiles. Start times run
    from max(histories) to the end less max(lives), so every cell sees the same ones."""
    starts = np.arange(max(histories), times.max() - max(lives), step_s)
    rows = []
    for name, w in weights.items():
        cum = _cumulative(times, w)
        for h in histories:
            past = (cum(starts) - cum(starts - h)) / h
            for life in lives:
                future = (cum(starts + life) - cum(starts)) / life
                ok = past > 0  # a start with no load in its history has no forecast
                ratio = future[ok] / past[ok]
                row = {"measure": name, "history_s": h, "life_s": life,
                       "starts": int(len(starts)), "no_history": int((~ok).sum()),
                       "within": None, "ratio_p10": None, "ratio_p50": None, "ratio_p90": None}
                if len(ratio):
                    row["within"] = float(np.mean(np.abs(ratio - 1) <= tolerance))
                    for q in (10, 50, 90):
                        row[f"ratio_p{q}"] = float(np.percentile(ratio, q))
                rows.append(row)
    return rows


def main(argv=None) -> dict:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        histories = [float(x) for x in a.history_s.split(",")]
        lives = [float(x) for x in a.life_s.split(",")]
    except ValueError:
        parser.error("--history-s and --life-s take comma-separated seconds")
    if min(histories + lives) <= 0 or a.rate <= 0 or a.step_s <= 0 or a.tolerance < 0:
        parser.error("--history-s, --life-s, --rate and --step-s must be > 0, "
                     "--tolerance >= 0")
    t_start = time.perf_counter()
    rows = read_azure_trace(a.trace)
    raw = np.array([r.arrival_s for r in rows], dtype=np.float64)
    span = raw.max() - raw.min()
    stretch = (len(rows) / a.rate) / span
    times = (raw - raw.min()) * stretch
    weights = {"requests": np.ones(len(rows)),
               "tokens": np.array([r.input_len + r.output_len for r in rows], dtype=np.float64)}
    table = forecast_table(times, weights, histories, lives, a.tolerance, a.step_s)
    res = {"trace": a.trace, "requests": len(rows), "rate": a.rate, "stretch": stretch,
           "tolerance": a.tolerance, "step_s": a.step_s, "table": table,
           "total_s": time.perf_counter() - t_start}
    print(f"{len(rows)} requests, trace gaps x{stretch:.1f} to {a.rate} req/s; share of start "
          f"times whose next-L load is within +-{a.tolerance:.0%} of the last-H load")
    print("| measure | H (s) | L (s) | within | ratio p10 / p50 / p90 |")
    print("|---|---|---|---|---|")
    for r in table:
        if r["within"] is None:
            print(f"| {r['measure']} | {r['history_s']:.0f} | {r['life_s']:.0f} | – | – |")
            continue
        print(f"| {r['measure']} | {r['history_s']:.0f} | {r['life_s']:.0f} | {r['within']:.0%} | "
              f"{r['ratio_p10']:.2f} / {r['ratio_p50']:.2f} / {r['ratio_p90']:.2f} |")
    if a.json:
        script_io.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
