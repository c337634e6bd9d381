"""The prefix-caching benchmark's report: its targets (issue 25's bars, from the measured
medians) and the printed tables. Pure functions of the result dict `prefix.main` builds;
no engine, no JAX. Callers: `conserve_jax.bench.prefix.main`."""
from __future__ import annotations

from conserve_jax.bench.prefix_workload import fmt, target

SIDES = ("on", "off")


def targets(res: dict) -> dict:
    out = {}
    if "offline" in res:
        c = res["offline"]
        out["offline_served_tokens_per_s_ratio"] = target(
            "offline batch: served tokens/s cache on / off (medians)",
            c["ratios"]["served_tokens_per_s_on_over_off"], 4.0, True,
            best=c["ratios"]["served_tokens_per_s_on_over_off_best"])
        out["offline_hit_rate_vs_optimal"] = target(
            "offline batch: hit rate / optimal hit rate, cache on (median)",
            c["on"]["median"].get("hit_vs_optimal"), 0.9, True,
            hit_rate=c["on"]["median"].get("hit_rate"),
            optimal_hit_rate=c["on"]["median"].get("optimal_hit_rate"))
        out["offline_tokens_identical"] = target(
            "offline batch: greedy outputs identical on and off", c["tokens_identical"], True, True)
    if "chat" in res:
        c, k = res["chat"], res["chat"]["workload"]["turns"]
        out["chat_last_turn_ttft_p50_ratio"] = target(
            f"chat: turn-{k} TTFT p50 cache on / off (medians)",
            c["ratios"][f"turn{k}_ttft_p50_on_over_off"], 0.4, False,
            best=c["ratios"][f"turn{k}_ttft_p50_on_over_off_best"])
        out["chat_tokens_identical"] = target(
            "chat: greedy answers identical on and off", c["tokens_identical"], True, True)
    if "coserve" in res:
        r = res["coserve"]["ratios"]
        ttft, tpot = r["online_ttft_p99_cache_on_over_online_only"], \
            r["online_tpot_p99_cache_on_over_online_only"]
        iso = target("co-serving: conserve (cache on) online p99 TTFT and TPOT / online-only's "
                     "(the worse of the two)",
                     None if ttft is None or tpot is None else max(ttft, tpot), 1.2, False,
                     ttft_ratio=ttft, tpot_ratio=tpot)
        t = target("co-serving: offline served tokens/s cache on / off (medians), at online p99 "
                   "within 1.2x of online-only", r["offline_served_on_over_off"], 2.0, True,
                   best=r["offline_served_on_over_off_best"], online_within_isolation=iso["met"],
                   saturated=res["coserve"]["saturated"])
        if t["met"] is not None and iso["met"] is not None:
            t["met"] = t["met"] and iso["met"]
        out["coserve_offline_served_ratio"] = t
        out["coserve_online_p99_vs_online_only"] = iso
    if "nosharing" in res:
        c = res["nosharing"]
        out["nosharing_speed_ratio"] = target(
            "no sharing: end-to-end time cache off / on (medians; >= 0.97: on at most 3% slower)",
            c["ratios"]["speed_on_over_off"], 0.97, True,
            best=c["ratios"]["speed_on_over_off_best"],
            paired=c["ratios"]["paired_speed_on_over_off"])
        out["nosharing_tokens_identical"] = target(
            "no sharing: greedy outputs identical on and off", c["tokens_identical"], True, True)
    return out


def _table(title: str, rows: list, cols: list) -> None:
    """rows: (label, summary); cols: (header, key, stat, format)."""
    print(f"\n{title}")
    widths = [max(10, len(h) + 1) for h, _, _, _ in cols]
    print("side".ljust(20) + "".join(h.rjust(w) for (h, _, _, _), w in zip(cols, widths)))
    for label, s in rows:
        print(label.ljust(20) + "".join(fmt(s[stat].get(key), f).rjust(w)
                                        for (_, key, stat, f), w in zip(cols, widths)))


def print_report(res: dict) -> None:
    reps = res["repeats"]
    batch_cols = [("time med", "time_s", "median", ".2f"), ("time min", "time_s", "min", ".2f"),
                  ("served/s med", "served_tokens_per_s", "median", ".1f"),
                  ("served/s max", "served_tokens_per_s", "max", ".1f"),
                  ("proc/s med", "processed_tokens_per_s", "median", ".1f"),
                  ("prefill med", "computed_prefill_tokens", "median", ".0f"),
                  ("hit rate", "hit_rate", "median", ".3f"),
                  ("hit/opt", "hit_vs_optimal", "median", ".3f"),
                  ("compiles", "compiles_during_run", "max", ".0f")]
    for name in ("offline", "nosharing"):
        if name not in res:
            continue
        c = res[name]
        w = c["workload"]
        what = (f"{w['items']} items, {w['instruction_tokens']}-token instruction + "
                f"{w['item_tokens'][0]}-{w['item_tokens'][1]} tokens" if name == "offline"
                else f"{w['items']} items, random {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]}"
                     "-token prompts")
        _table(f"== {name}: {what}, {w['output_tokens']} output tokens; {reps} repeat(s)",
               [(f"cache {s}", c[s]) for s in SIDES], batch_cols)
        r = c["ratios"]
        print(f"on/off: served tokens/s x{fmt(r['served_tokens_per_s_on_over_off'])} (median), "
              f"x{fmt(r['served_tokens_per_s_on_over_off_best'])} (best); time "
              f"x{fmt(r['time_on_over_off'])} (median), x{fmt(r['time_on_over_off_best'])} (min); "
              f"computed prefill x{fmt(r['computed_prefill_on_over_off'])}; "
              f"optimal hit rate {fmt(c['on']['median'].get('optimal_hit_rate'))}; "
              f"tokens identical: {c['tokens_identical']}")
    if "chat" in res:
        c = res["chat"]
        w = c["workload"]
        cols = []
        for k in range(1, w["turns"] + 1):
            cols += [(f"t{k} p50 med", f"turn{k}_ttft_p50_s", "median", ".3f"),
                     (f"t{k} p50 min", f"turn{k}_ttft_p50_s", "min", ".3f"),
                     (f"t{k} p99 med", f"turn{k}_ttft_p99_s", "median", ".3f")]
        cols += [("hit rate", "hit_rate", "median", ".3f"), ("hit/opt", "hit_vs_optimal", "median", ".3f"),
                 ("compiles", "compiles_during_run", "max", ".0f")]
        _table(f"== chat: {w['conversations']} conversations x {w['turns']} turns (+"
               f"{w['user_tokens_per_turn'][0]}-{w['user_tokens_per_turn'][1]} user tokens, "
               f"answers {w['answer_tokens'][0]}-{w['answer_tokens'][1]}); TTFT (s); {reps} repeat(s)",
               [(f"cache {s}", c[s]) for s in SIDES], cols)
        r = c["ratios"]
        print("TTFT p50 on/off by turn: " + ", ".join(
            f"turn {k} x{fmt(r[f'turn{k}_ttft_p50_on_over_off'])}"
            for k in range(1, w["turns"] + 1)) + f"; tokens identical: {c['tokens_identical']}")
    if "coserve" in res:
        c = res["coserve"]
        cols = [("TTFT p50", "online_ttft_p50_s", "median", ".3f"),
                ("TTFT p99", "online_ttft_p99_s", "median", ".3f"),
                ("p99 min", "online_ttft_p99_s", "min", ".3f"),
                ("TPOT p99", "online_tpot_p99_s", "median", ".3f"),
                ("SLO", "slo_attainment", "median", ".2f"),
                ("served/s", "offline_served_tokens_per_s", "median", ".1f"),
                ("served max", "offline_served_tokens_per_s", "max", ".1f"),
                ("proc/s", "offline_processed_tokens_per_s", "median", ".1f"),
                ("hit rate", "offline_hit_rate", "median", ".3f"),
                ("evict", "evictions", "median", ".0f"),
                ("compiles", "compiles_during_run", "max", ".0f")]
        _table(f"== coserve: {c['duration_s']:.0f} s of trace arrivals "
               f"({c['workload']['online']['requests']} online requests) + shared-prefix offline "
               f"batch; medians; {reps} repeat(s)", list(c["variants"].items()), cols)
        r = c["ratios"]
        print(f"offline served tokens/s on/off x{fmt(r['offline_served_on_over_off'])} (median), "
              f"processed x{fmt(r['offline_processed_on_over_off'])}; online p99 vs online-only: "
              f"TTFT on x{fmt(r['online_ttft_p99_cache_on_over_online_only'])} off "
              f"x{fmt(r['online_ttft_p99_cache_off_over_online_only'])}, TPOT on "
              f"x{fmt(r['online_tpot_p99_cache_on_over_online_only'])} off "
              f"x{fmt(r['online_tpot_p99_cache_off_over_online_only'])}"
              + ("" if c["saturated"] else "; WARNING: the offline batch ran out in a window "
                 "(raise --coserve-offline-items)"))
    print()
    for k, t in res["targets"].items():
        state = "n/a" if t["met"] is None else "MET" if t["met"] else "MISSED"
        print(f"target {k}: {fmt(t['value'])} (threshold {t['threshold']}) {state}")
