"""The prefix-caching benchmark's cases: what each case submits per repeat, in which order its
sides run, and what it reports (a helper of `prefix`, run as scripts/bench_prefix.py).

Each `<case>_case(a, engines, vocab)` takes `prefix.parse_args`'s namespace; offline, chat and
nosharing take the {"on": engine, "off": engine} pair `prefix.main` built, coserve takes the
`prefix_engines.Engines` builder (it builds a fresh engine per run). Every repeat draws new
prompts from its own seed (prefix_workload); the two sides of a repeat get the same ones,
the side that runs first alternates by repeat (co-serving: the three runs rotate). Each
returns the case's JSON section: "workload", "runs" (every repeat's metrics, from
prefix_runs), per side (or co-serving variant) the median/min/max (`summarize`), "ratios",
and where outputs are compared "tokens_identical". The targets are judged from these by
prefix_report. `progress` prints the elapsed time and what starts next.
"""
from __future__ import annotations

import time

import numpy as np

from conserve_jax.bench import coserve as cs
from conserve_jax.bench import coserve_workload as cwl
from conserve_jax.bench import prefix_workload as wl
from conserve_jax.bench.prefix_engines import Engines, coserve_config
from conserve_jax.bench.prefix_runs import run_batch, run_chat, run_coserve
from conserve_jax.bench.prefix_workload import div, summarize

SIDES = ("on", "off")
COSERVE_RUNS = [("online-only", "online-only", True), ("conserve-cache-on", "conserve", True),
                ("conserve-cache-off", "conserve", False)]  # (label, policy, cache on)


def progress(a, what: str) -> None:
    print(f"[{time.perf_counter() - a.t_start:6.0f}s] {what}", flush=True)


# ---- offline batches (offline, nosharing) ------------------------------------------------
def batch_case(a, name: str, engines: dict, make_items, describe: dict) -> dict:
    """`make_items(rep)` -> the repeat's items; runs both sides per repeat, order alternating."""
    bs = a.block_size
    runs = []
    for rep in range(a.repeats):
        items = make_items(rep)
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        res, outs = {}, {}
        for side in order:
            progress(a, f"{name} repeat {rep + 1}/{a.repeats}: cache {side}")
            res[side], outs[side] = run_batch(engines[side], items)
        prompts = [it.prompt for it in items]
        opt = sum(wl.optimal_hit_tokens(prompts, outs["off"], bs))
        ptoks = res["on"]["prompt_tokens"]
        for side in SIDES:
            res[side].update(optimal_hit_tokens=opt, optimal_hit_rate=opt / ptoks,
                             hit_vs_optimal=div(res[side]["hit_tokens"], opt))
        same = outs["on"] == outs["off"]
        runs.append({"repeat": rep + 1, "order": list(order), "tokens_identical": same,
                     "items_differing": sum(x != y for x, y in zip(outs["on"], outs["off"])),
                     **res})
    out = {"workload": describe, "runs": runs,
           "tokens_identical": all(r["tokens_identical"] for r in runs)}
    for side in SIDES:
        out[side] = summarize([r[side] for r in runs])
    on, off = out["on"], out["off"]
    out["ratios"] = {
        "served_tokens_per_s_on_over_off": div(on["median"]["served_tokens_per_s"],
                                               off["median"]["served_tokens_per_s"]),
        "served_tokens_per_s_on_over_off_best": div(on["max"]["served_tokens_per_s"],
                                                    off["max"]["served_tokens_per_s"]),
        "time_on_over_off": div(on["median"]["time_s"], off["median"]["time_s"]),
        "time_on_over_off_best": div(on["min"]["time_s"], off["min"]["time_s"]),
        "speed_on_over_off": div(off["median"]["time_s"], on["median"]["time_s"]),
        "speed_on_over_off_best": div(off["min"]["time_s"], on["min"]["time_s"]),
        "computed_prefill_on_over_off": div(on["median"]["computed_prefill_tokens"],
                                            off["median"]["computed_prefill_tokens"]),
        "paired_speed_on_over_off": [div(r["off"]["time_s"], r["on"]["time_s"]) for r in runs],
    }
    return out


def offline_case(a, engines: dict, vocab: int) -> dict:
    def items(rep):
        rng = np.random.default_rng([a.seed, rep, 1])
        return wl.shared_prefix_batch(rng, vocab, a.offline_items, a.instruction_tokens,
                                      tuple(a.item_tokens), a.output_tokens, f"off{rep}")
    desc = {"items": a.offline_items, "instruction_tokens": a.instruction_tokens,
            "item_tokens": list(a.item_tokens), "output_tokens": a.output_tokens,
            "class": "offline", "submitted": "all at once",
            "sampling": "greedy, ignore_eos, max_tokens = output tokens"}
    return batch_case(a, "offline", engines, items, desc)


def nosharing_case(a, engines: dict, vocab: int) -> dict:
    def items(rep):
        rng = np.random.default_rng([a.seed, rep, 4])
        return wl.random_batch(rng, vocab, a.nosharing_items, tuple(a.nosharing_prompt),
                               a.output_tokens, f"ns{rep}")
    desc = {"items": a.nosharing_items, "prompt_tokens": list(a.nosharing_prompt),
            "output_tokens": a.output_tokens, "class": "offline", "submitted": "all at once",
            "sampling": "greedy, ignore_eos, max_tokens = output tokens"}
    return batch_case(a, "nosharing", engines, items, desc)


# ---- chat ------------------------------------------------------------------------------
def chat_case(a, engines: dict, vocab: int) -> dict:
    runs = []
    for rep in range(a.repeats):
        rng = np.random.default_rng([a.seed, rep, 2])
        script = wl.chat_script(rng, vocab, a.chat_conversations, a.chat_turns,
                                tuple(a.chat_user_tokens), tuple(a.chat_answer))
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        res, answers = {}, {}
        for side in order:
            progress(a, f"chat repeat {rep + 1}/{a.repeats}: cache {side}")
            res[side], answers[side] = run_chat(a, engines[side], script, f"chat{rep}")
        runs.append({"repeat": rep + 1, "order": list(order),
                     "tokens_identical": answers["on"] == answers["off"], **res})
    out = {"workload": {"conversations": a.chat_conversations, "turns": a.chat_turns,
                        "user_tokens_per_turn": list(a.chat_user_tokens),
                        "answer_tokens": list(a.chat_answer), "class": "online",
                        "slo": {"ttft_s": a.ttft, "tpot_s": a.tpot},
                        "prompt": "previous prompt + the model's answer + new user tokens",
                        "sampling": "greedy, ignore_eos, max_tokens = answer length"},
           "runs": runs, "tokens_identical": all(r["tokens_identical"] for r in runs)}
    for side in SIDES:
        out[side] = summarize([r[side] for r in runs])
    ratios = {}
    for k in range(1, a.chat_turns + 1):
        for q in ("p50", "p99"):
            key = f"turn{k}_ttft_{q}_s"
            ratios[f"turn{k}_ttft_{q}_on_over_off"] = div(out["on"]["median"][key],
                                                          out["off"]["median"][key])
            ratios[f"turn{k}_ttft_{q}_on_over_off_best"] = div(out["on"]["min"][key],
                                                               out["off"]["min"][key])
    out["ratios"] = ratios
    return out


# ---- co-serving ------------------------------------------------------------------------
def coserve_case(a, engines: Engines, vocab: int) -> dict:
    # the first engine of this geometry compiles every executable; a checkpointing one, so
    # that the KV transfers compile too (online-only has none and may come first)
    progress(a, "coserve: compiling the co-serving engines' executables")
    first = engines.build(coserve_config(a, "conserve", True), "coserve")
    first.shutdown()
    cs.release(first)
    runs: dict = {label: [] for label, _, _ in COSERVE_RUNS}
    order_log = []
    work = None
    for rep in range(a.repeats):
        spec = cwl.WorkloadSpec(duration_s=a.coserve_duration, rate=a.coserve_rate,
                                prompt_max=a.online_prompt_max, output_max=a.online_output_max,
                                offline_requests=0, seed=a.seed + rep)
        work = cwl.build(spec, vocab, a.max_model_len)  # same arrivals and lengths, new ids
        rng = np.random.default_rng([a.seed, rep, 3])
        offline = wl.shared_prefix_batch(rng, vocab, a.coserve_offline_items,
                                         a.coserve_prefix_tokens, tuple(a.coserve_item_tokens),
                                         tuple(a.coserve_offline_output), f"cs{rep}")
        k = rep % len(COSERVE_RUNS)
        for label, policy, cache_on in COSERVE_RUNS[k:] + COSERVE_RUNS[:k]:
            progress(a, f"coserve repeat {rep + 1}/{a.repeats}: {label}")
            order_log.append(label)
            runs[label].append(run_coserve(a, engines, label, policy, cache_on, work.online,
                                           offline))
    wdesc = work.describe()
    wdesc["offline"] = {
        "requests": a.coserve_offline_items, "submitted_at_s": 0.0,
        "shared_prefix_tokens": a.coserve_prefix_tokens,
        "item_tokens": list(a.coserve_item_tokens),
        "output_tokens": list(a.coserve_offline_output)}
    out = {"workload": wdesc, "duration_s": a.coserve_duration, "drain_s": a.drain,
           "order": order_log, "runs": runs,
           "variants": {label: summarize(rs) for label, rs in runs.items()}}
    v = out["variants"]
    on, off, oo = v["conserve-cache-on"], v["conserve-cache-off"], v["online-only"]
    med = lambda d, key: d["median"].get(key)  # noqa: E731
    out["ratios"] = {
        "offline_served_on_over_off": div(med(on, "offline_served_tokens_per_s"),
                                          med(off, "offline_served_tokens_per_s")),
        "offline_served_on_over_off_best": div(on["max"].get("offline_served_tokens_per_s"),
                                               off["max"].get("offline_served_tokens_per_s")),
        "offline_processed_on_over_off": div(med(on, "offline_processed_tokens_per_s"),
                                             med(off, "offline_processed_tokens_per_s")),
    }
    for side, d in (("on", on), ("off", off)):
        for key in ("online_ttft_p99_s", "online_tpot_p99_s"):
            out["ratios"][f"{key[:-2]}_cache_{side}_over_online_only"] = div(med(d, key),
                                                                            med(oo, key))
    out["saturated"] = all(r["offline_waiting_at_window_end"] > 0
                           for label in ("conserve-cache-on", "conserve-cache-off")
                           for r in runs[label])
    return out
