"""The deadlines benchmark's report (conserve_jax/bench/deadlines.py, run as
scripts/bench_deadlines.py): per variant, the online statistics over the requests no
at-risk period overlapped; per job, the harvest rate its life actually had, the error its
estimate at submit would have had at that rate, and the jobs that overtook it; over all
variants, the issue's targets and the README table.

Plain functions of the benchmark's records (dicts, lists and numbers), called from its
main thread; no JAX.
"""
from __future__ import annotations

from typing import Optional

from conserve_jax.bench import coserve_report as report

JOBS = ("tight", "medium", "loose")


def online_stats(reqs: list, at_risk_spans: list, ref: Optional[dict]) -> dict:
    """p50/p99 over all online requests and over those no at-risk period overlapped."""
    def overlaps(r):
        return any(s < r["end"] and e > r["start"] for s, e in at_risk_spans)
    calm = [r for r in reqs if not overlaps(r)]
    out = {"online_requests": len(reqs), "online_requests_no_job_at_risk": len(calm)}
    for label, rs in (("", reqs), ("_no_job_at_risk", calm)):
        for m in ("ttft", "tpot"):
            out[f"online_{m}_p99_s{label}"] = report.pct([r[f"{m}_s"] for r in rs], 99)
    out["slo_attainment"] = sum(r["slo_met"] for r in reqs) / max(1, len(reqs))
    if ref is not None:
        for m in ("ttft", "tpot"):
            for label in ("", "_no_job_at_risk"):
                v, base = out[f"online_{m}_p99_s{label}"], ref.get(f"online_{m}_p99_s")
                out[f"online_{m}_p99_vs_online_only{label}"] = (
                    v / base if v is not None and base else None)
    return out


def realized_rate(timeline: list, cost, t_from: float, t_to: Optional[float]) -> Optional[float]:
    """Offline work units a second the engine did between `t_from` and `t_to` (seconds
    after the first submission), from the timeline's rows nearest them: the harvest rate
    a job's life actually had, beside the one measured before it (an estimate at submit
    can only assume that one lasts)."""
    if t_to is None or not timeline:
        return None
    a = min(timeline, key=lambda r: abs(r["t"] - t_from))
    b = min(timeline, key=lambda r: abs(r["t"] - t_to))
    if b["t"] - a["t"] < 1.0:
        return None
    return cost.of(b["offline_prefill_tokens"] - a["offline_prefill_tokens"],
                   b["offline_tokens"] - a["offline_tokens"]) / (b["t"] - a["t"])


def at_realized_rate(job: dict) -> Optional[float]:
    """The error the estimate at submit would have had had the estimator known the harvest
    rate the job's life turned out to have: the whole estimate scaled by the ratio of the
    two rates (an approximation: its tail, which does not scale with the rate, scales too).
    It separates the model's error from the forecast's (the online load to come)."""
    est, act = job["estimate_at_submit_s"], job["finished_after_s"]
    r0, r1 = job["estimator_at_submit"]["harvest_rate"], job["harvest_rate_realized"]
    if job["estimate_error"] is None or not (r0 and r1 and est and act):
        return None
    return (est * r0 / r1 - act) / act


def overtaken_by(name: str, submitted: dict, due: dict, deadline_order: bool) -> list:
    """The jobs submitted after `name` whose work went before or beside its own: those due
    before it (the engine serves deadlines in order), or with `deadline_order` off (today's
    order) every later one, as their items run in the engine beside its own. Their work is
    in its actual finish and could not be in its estimate at submit."""
    return [o for o in submitted if submitted[o] > submitted[name]
            and (not deadline_order or due[o] < due[name])]


def targets(V: dict) -> dict:
    """The issue's targets, from the variants' results (None where a variant is missing)."""
    def misses(v):
        return None if v not in V else {j: V[v]["jobs"][j]["missed"] for j in JOBS}
    out = {}
    iso, today = misses("isolate"), misses("today")
    if iso and today:
        feasible = [j for j in JOBS if V["isolate"]["jobs"][j]["predicted_feasible"]]
        out["isolate_zero_misses_on_feasible_windows"] = {
            "feasible_jobs": feasible, "isolate_misses": [j for j in feasible if iso[j]],
            "today_misses": [j for j in feasible if today[j]],
            "met": not any(iso[j] for j in feasible) and any(today[j] for j in feasible)}
    if "borrow" in V:
        r = V["borrow"].get("online_ttft_p99_vs_online_only_no_job_at_risk")
        out["borrow_meets_tight"] = {"met": not V["borrow"]["jobs"]["tight"]["missed"]}
        out["online_p99_within_1.2x_when_no_job_at_risk"] = {"ttft_ratio": r, "met": r is not None
                                                            and r <= 1.2}
    done = [j for v in V.values() for j in v["jobs"].values() if j["estimate_error"] is not None]
    errs = [j["estimate_error"] for j in done]
    alone = [j["estimate_error"] for j in done if not j.get("overtaken_by")]
    out["estimate_within_25pct"] = {
        "errors": errs, "met": bool(errs) and all(abs(e) <= 0.25 for e in errs),
        # the jobs no later job went before (an estimate at submit cannot see those)
        "errors_not_overtaken": alone,
        "met_not_overtaken": bool(alone) and all(abs(e) <= 0.25 for e in alone)}
    recs = [j["one_record_per_item"] for v in V.values() for j in v["jobs"].values()]
    out["one_record_per_item"] = {"met": bool(recs) and all(recs)}
    return out


def print_table(V: dict) -> None:
    def f(x, spec=".2f"):
        return "–" if x is None else format(x, spec)
    print("| variant | misses (tight/medium/loose) | estimate error at submit | settled | "
          "harvest rate at submit > over the job | error at that rate | online p99 TTFT (s) | "
          "TPOT (s) | TTFT vs online-only (no job at risk) | offline processed tok/s | "
          "borrowed s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, v in V.items():
        jobs = v.get("jobs") or {}
        miss = "/".join("miss" if jobs[j]["missed"] else "ok" for j in JOBS) if jobs else "–"
        errs = ", ".join(f(jobs[j]["estimate_error"], "+.0%")
                         + ("*" if jobs[j].get("overtaken_by") else "") for j in JOBS
                         ) if jobs else "–"
        settled = (", ".join(f(jobs[j].get("estimate_error_settled"), "+.0%") for j in JOBS)
                   if jobs else "–")
        rates = ", ".join(f"{f(jobs[j]['estimator_at_submit']['harvest_rate'])}>"
                          f"{f(jobs[j].get('harvest_rate_realized'))}" for j in JOBS
                          ) if jobs else "–"
        at_rate = (", ".join(f(jobs[j].get("estimate_error_at_realized_rate"), "+.0%")
                             for j in JOBS) if jobs else "–")
        print(f"| {name} | {miss} | {errs} | {settled} | {rates} | {at_rate} | "
              f"{f(v['online_ttft_p99_s'], '.3f')} | "
              f"{f(v['online_tpot_p99_s'], '.3f')} | "
              f"{f(v.get('online_ttft_p99_vs_online_only_no_job_at_risk'))} | "
              f"{f(v['offline_processed_tokens_per_s'], '.1f')} | {f(v['borrowed_s'], '.1f')} |")
    print("(* a job submitted later went before it (due sooner) or, under today's order, beside "
          "it: not in its estimate at submit)")
