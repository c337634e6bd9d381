"""The load-test report: a JSON-ready dict, a text table, and PNG plots.

`build_report` returns (all times in seconds, rates per second):

    {
      "schema": "conserve-jax-loadtest/1",
      "config":  {...the run's options...},
      "duration_s": float,             # measurement window (see runner)
      "online": {
        "issued", "completed", "failed", "not_issued": int,
        "errors_by_code": {code: count},
        "output_len_mismatches": int,  # completed with output != forced length
        "input_tokens", "output_tokens": int,
        "request_throughput", "output_tokens_per_s": float,
        "ttft_s", "tpot_s", "itl_s", "e2e_s", "send_lag_s":
            {"count", "mean", "p50", "p90", "p99", "max"},   # numbers None if no data
        "slo": {"ttft_s", "tpot_s": float|None, "met": int,
                "attainment": float|None, "goodput_rps": float},
      },
      "offline": {} or {
        "requests": int, "batches": [{"batch_id", "state", "done", "total", "failed"}],
        "submit_errors": {code: count}, "completed_at_window_end", "failed_at_window_end",
        "results_collected", "output_tokens": int, "tokens_source": "results"|"estimate",
        "tokens_per_s": float, "all_finished_at_s": float|None, "cancelled_batches": [id],
      },
      "server": {"preemptions": int|None,       # delta of stats().preemptions
                 "stats_delta": {field: number}, "stats_after": {field: number}},
      "requests": [{"index", "scheduled_s", "sent_s", "input_len", "output_tokens",
                    "ttft_s", "tpot_s", "e2e_s", "error"}],
      "offline_timeline": [[t_s, offline requests done], ...],   # get_batch polls
    }

`write_plot` draws latency over time (TTFT, TPOT, E2E per request against send time, and
offline requests completed on a second axis) and latency CDFs, with matplotlib's Agg
backend (selected here, without touching pyplot's global state for other users).
"""
from __future__ import annotations

import json
from typing import Optional

from conserve_jax.loadtest.metrics import summarize_online
from conserve_jax.loadtest.runner import RunResult

SCHEMA = "conserve-jax-loadtest/1"


def _delta(before: Optional[dict], after: Optional[dict]) -> dict:
    if not before or not after:
        return {}
    return {k: after[k] - before[k] for k in after if k in before}


def build_report(result: RunResult, config: dict, slo_ttft: Optional[float] = None,
                 slo_tpot: Optional[float] = None) -> dict:
    """The report dict described in the module doc."""
    online = summarize_online(result.records, result.duration_s, slo_ttft, slo_tpot)
    online["not_issued"] = result.not_issued
    delta = _delta(result.stats_before, result.stats_after)
    pre = delta.get("preemptions")
    requests = [{"index": r.index, "scheduled_s": r.scheduled_s, "sent_s": r.sent_s,
                 "input_len": r.input_len, "output_tokens": r.output_tokens,
                 "ttft_s": r.ttft if r.ok else None, "tpot_s": r.tpot if r.ok else None,
                 "e2e_s": r.e2e if r.ok else None, "error": r.error}
                for r in sorted(result.records, key=lambda r: r.index)]
    return {
        "schema": SCHEMA,
        "config": config,
        "duration_s": result.duration_s,
        "online": online,
        "offline": result.offline,
        "server": {"preemptions": None if pre is None else int(pre),
                   "stats_delta": delta, "stats_after": result.stats_after or {}},
        "requests": requests,
        "offline_timeline": [list(p) for p in result.offline_timeline],
    }


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _num(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_table(report: dict) -> str:
    """A human-readable summary of `report` (latencies in milliseconds)."""
    on, off, srv = report["online"], report["offline"], report["server"]
    lines = [f"{'duration (s)':<34}{report['duration_s']:.2f}",
             f"{'online requests':<34}issued {on['issued']}  completed {on['completed']}"
             f"  failed {on['failed']}  not issued {on['not_issued']}"]
    if on["errors_by_code"]:
        lines.append(f"{'errors by status':<34}" + ", ".join(
            f"{k}={v}" for k, v in on["errors_by_code"].items()))
    lines += ["", f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'count':>8}"]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"),
                       ("e2e_s", "E2E"), ("send_lag_s", "send lag")):
        s = on[key]
        lines.append(f"{label:<14}{_ms(s['mean']):>10}{_ms(s['p50']):>10}{_ms(s['p90']):>10}"
                     f"{_ms(s['p99']):>10}{s['count']:>8}")
    slo = on["slo"]
    lines += ["",
              f"{'SLO (TTFT, TPOT) ms':<34}{_ms(slo['ttft_s'])}, {_ms(slo['tpot_s'])}",
              f"{'SLO attainment':<34}{_num(slo['attainment'], '{:.1%}')} ({slo['met']} met)",
              f"{'goodput (req/s)':<34}{slo['goodput_rps']:.3f}",
              f"{'request throughput (req/s)':<34}{on['request_throughput']:.3f}",
              f"{'online output tokens/s':<34}{on['output_tokens_per_s']:.1f}"]
    if on["output_len_mismatches"]:
        lines.append(f"{'online outputs of wrong length':<34}{on['output_len_mismatches']}")
    if off:
        lines.append(f"{'offline tokens/s':<34}{off['tokens_per_s']:.1f}  ({off['output_tokens']}"
                     f" tokens, {off['completed_at_window_end']}/{off['requests']} requests done,"
                     f" from {off['tokens_source']})")
        if off["submit_errors"]:
            lines.append(f"{'offline submit errors':<34}" + ", ".join(
                f"{k}={v}" for k, v in off["submit_errors"].items()))
    else:
        lines.append(f"{'offline tokens/s':<34}-")
    lines.append(f"{'server preemptions':<34}{_num(srv['preemptions'], '{}')}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")


PLOT_HINT = ("plots need matplotlib, which only the bench extra installs: "
             "pip install 'conserve-jax[bench]'")


def plotting_available() -> bool:
    """Whether matplotlib can be imported (it is in the `bench` extra, not a core
    dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(report: dict, path: str) -> None:
    """Latency over time and latency CDFs to a PNG at `path` (Agg backend)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in report["requests"] if r["error"] is None]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_c = fig.subplots(1, 2)
    series = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))
    for key, label in series:
        pts = [(r["sent_s"], r[key]) for r in ok if r[key] is not None]
        if pts:
            x, y = zip(*pts)
            ax_t.scatter(x, np.asarray(y) * 1000, s=8, label=label)
    failed = [r["sent_s"] for r in report["requests"] if r["error"] is not None]
    if failed:
        ax_t.scatter(failed, [0.02] * len(failed), marker="x", c="red", s=16, label="failed",
                     transform=ax_t.get_xaxis_transform())
    ax_t.set(xlabel="request sent at (s)", ylabel="latency (ms)", yscale="log",
             title="online latency over time")
    slo = report["online"]["slo"]
    for key, style in (("ttft_s", "--"), ("tpot_s", ":")):
        if slo[key] is not None:
            ax_t.axhline(slo[key] * 1000, ls=style, c="gray", lw=1, label=f"SLO {key[:4].upper()}")
    timeline = report.get("offline_timeline") or []
    if timeline:
        ax_o = ax_t.twinx()
        tx, ty = zip(*timeline)
        ax_o.plot(tx, ty, c="black", lw=1, label="offline done")
        ax_o.set_ylabel("offline requests done")
        ax_o.set_ylim(bottom=0)
        ax_o.legend(loc="lower right", fontsize=8)
    if ok or failed:
        ax_t.legend(loc="upper left", fontsize=8)
    for key, label in series:
        v = np.sort([r[key] for r in ok if r[key] is not None])
        if v.size:
            ax_c.plot(v * 1000, np.arange(1, v.size + 1) / v.size, label=label)
    ax_c.set(xlabel="latency (ms)", ylabel="fraction of requests", xscale="log",
             title="latency CDF", ylim=(0, 1.02))
    if ok:
        ax_c.legend(loc="lower right", fontsize=8)
    ax_c.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
