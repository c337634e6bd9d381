"""Prefix-caching benchmark (issue 25): four workloads, each with the prefix cache on and off,
interleaved in one process on one loaded model.

Cases (--cases, comma-separated; prefix_workload says how prompts are drawn; every repeat
draws new token ids, so a later repeat never hits what an earlier one left cached, and the
cache-on and cache-off sides of a repeat get the same prompts; the side that runs first
alternates by repeat):
- offline: --offline-items (64) offline items, one shared --instruction-tokens (1,024)
  instruction + --item-tokens (32-64) distinct tokens each, --output-tokens (16) each
  (greedy, ignore_eos), all submitted at once. Per side: end-to-end time (first submit ->
  last item finished), served tokens/s = (prompt + output tokens) / time, processed
  tokens/s = (prefill tokens actually computed + output tokens) / time, computed prefill
  tokens (the engine's stats delta), hit rate = prompt tokens served from the cache
  (num_cached_tokens) / prompt tokens, against the optimum (prefix_workload.
  optimal_hit_tokens); greedy outputs compared token by token between the sides.
- chat (online): --chat-conversations (8) conversations x --chat-turns (4) turns, running
  concurrently, turns sequential within a conversation; turn k's prompt = turn k-1's prompt
  + the answer the model gave (--chat-answer 16-32 tokens, forced) + --chat-user-tokens
  (90-110) new tokens. Per turn: client-side TTFT (submit -> first token) p50/p99 over the
  conversations, hit rate; answers compared between the sides.
- coserve: the co-serving benchmark's online load (coserve_workload: the Azure conversation
  trace at --coserve-rate 0.4 req/s over --coserve-duration s (120; --quick 60), prompts
  /8 in [16, --online-prompt-max], outputs /8 in [8, --online-output-max]; SLO --ttft 1 s,
  --tpot 0.2 s as in bench_coserve) with a saturating offline batch submitted at t=0 whose
  items share a --coserve-prefix-tokens (1,024) prefix (+ --coserve-item-tokens 32-64
  distinct tokens, outputs --coserve-offline-output 64-128, --quick 32-64). Engine as
  bench_coserve's (KV for --coserve-kv-seqs 4 full contexts, so offline work fills it).
  Three runs per repeat, order rotated: online-only (the isolation reference), conserve
  with the cache on, conserve with the cache off; each a fresh engine. Per run: online
  TTFT/TPOT p50/p99 (coserve_report.request_record: client-side, censored when unfinished),
  SLO attainment; in the arrival window: offline served tokens/s = (computed prefill +
  output + prefix-hit tokens) / window, offline processed tokens/s = (computed prefill +
  output) / window (bench_coserve's measure; recomputation counts again).
- nosharing: --nosharing-items (32) offline items of random --nosharing-prompt (256-512)
  token prompts, --output-tokens each: the cache's overhead when nothing is shared.
Numbers per side are the median, minimum and maximum over --repeats (each repeat kept under
`runs`). Targets (issue 25; judged on medians, ratios from the best repeat shown too):
offline served tokens/s on/off >= 4 and hit rate >= 0.9 of optimal; chat last-turn TTFT
p50 on/off <= 0.4; coserve offline served tokens/s on/off >= 2 with conserve's online p99
TTFT and TPOT (cache on) within 1.2x of online-only's; nosharing time off/on >= 0.97;
greedy outputs identical on and off (offline, chat, nosharing).

Engines: offline, chat and nosharing run on two engines (cache on, cache off) built once
and kept for all their repeats (conserve policy, KV for --kv-seqs full contexts, so memory
never limits either side); coserve builds a fresh engine per run. Compiled code: the first
engine of each KV geometry compiles every executable (--warmup all), later ones reuse its
jitted functions (bench_coserve's SharedCompiled); each engine then serves a short warm-up
request mix before it is measured; `compiles_during_run` checks nothing compiled while
measured.

    python scripts/bench_prefix.py                # default model, ~25-30 min
    python scripts/bench_prefix.py --quick        # smaller cases, 60 s co-serving runs, ~12 min
    python scripts/bench_prefix.py --cases offline,nosharing --repeats 3

Engine knobs are the engine's own flags (add_engine_args: --model, --dtype, --block-size,
--max-num-seqs, --isolation, ...) with bench_coserve's defaults (max_model_len 1280, 16
sequences, 512 prefill tokens, 16-token blocks, 4 GB host pool); --num-blocks or
--kv-cache-tokens override the on/off engines' KV (not co-serving's). Not flags here:
--policy, --enable-prefix-caching (each side sets them), the engine's --warmup (see the
script's --warmup), --default-ttft-s/--default-tpot-s (--ttft/--tpot set them).

This module is the entry point: the flags (`build_parser`, `parse_args`) and `main`, which
loads the model, runs the chosen cases, and writes the result JSON. The rest is in helpers:
prefix_cases (what each case submits per repeat, its side order, summaries and ratios),
prefix_runs (one timed side: submit, wait, metrics), prefix_engines (engine configs, the
builder that shares compiled code and warms each engine, stream primitives), prefix_workload
(the prompts, the hit-rate optimum, summaries), prefix_report (targets, printed tables).

Callers: scripts/bench_prefix.py (the entry point; also `python -m
conserve_jax.bench.prefix`); tests/test_bench_prefix.py runs `main` on a tiny model.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

from conserve_jax.bench import coserve as cs
from conserve_jax.bench import prefix_report
from conserve_jax.bench import script_io
from conserve_jax.bench.prefix_cases import (SIDES, chat_case, coserve_case, nosharing_case,
                                             offline_case, progress)
from conserve_jax.bench.prefix_engines import Engines, batch_config, coserve_config
from conserve_jax.engine_args import add_engine_args
from conserve_jax.models.loader import load_model

CASES = ["offline", "chat", "coserve", "nosharing"]
ENGINE_DEFAULTS = {"max_model_len": 1280, "max_num_seqs": 16, "max_prefill_tokens": 512,
                   "block_size": 16, "host_pool_bytes": 4 << 30}
NOT_FLAGS = ("policy", "enable_prefix_caching", "warmup", "default_ttft_s", "default_tpot_s")


# ---- entry point -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller cases (16 offline items with a 512-token instruction, 4 chats, "
                        "8 no-sharing items, 60 s co-serving runs with outputs 32-64)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kv-seqs", type=int, default=16,
                   help="on/off engines (offline, chat, nosharing): KV for this many full "
                        "contexts (+1 scratch block); --num-blocks or --kv-cache-tokens override")
    p.add_argument("--ttft", type=float, default=1.0,
                   help="online TTFT objective (s); also the engines' default_ttft_s")
    p.add_argument("--tpot", type=float, default=0.2,
                   help="online TPOT objective (s); also the engines' default_tpot_s")
    p.add_argument("--output-tokens", type=int, default=16,
                   help="output tokens per item (offline, nosharing)")
    g = p.add_argument_group("offline")
    g.add_argument("--offline-items", type=int, help="default 64, quick 16")
    g.add_argument("--instruction-tokens", type=int, help="shared instruction; default 1024, "
                   "quick 512")
    g.add_argument("--item-tokens", type=int, nargs=2, metavar=("MIN", "MAX"), default=[32, 64],
                   help="distinct tokens per item")
    g = p.add_argument_group("chat")
    g.add_argument("--chat-conversations", type=int, help="default 8, quick 4")
    g.add_argument("--chat-turns", type=int, default=4)
    g.add_argument("--chat-user-tokens", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=[90, 110], help="new user tokens per turn")
    g.add_argument("--chat-answer", type=int, nargs=2, metavar=("MIN", "MAX"), default=[16, 32],
                   help="answer tokens per turn (forced)")
    g = p.add_argument_group("coserve")
    g.add_argument("--coserve-duration", type=float, help="online arrival window per run (s); "
                   "default 120, quick 60")
    g.add_argument("--coserve-rate", type=float, default=0.4, help="online requests/s")
    g.add_argument("--drain", type=float, help="max wait for online requests after the window; "
                   "default ttft + online_output_max * tpot + 2")
    g.add_argument("--online-prompt-max", type=int, default=512)
    g.add_argument("--online-output-max", type=int, default=64)
    g.add_argument("--coserve-kv-seqs", type=int, default=4,
                   help="co-serving engines: KV for this many full contexts (bench_coserve's)")
    g.add_argument("--coserve-offline-items", type=int,
                   help="default max(48, 2 x duration): saturating")
    g.add_argument("--coserve-prefix-tokens", type=int, default=1024)
    g.add_argument("--coserve-item-tokens", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=[32, 64])
    g.add_argument("--coserve-offline-output", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="default 64-128, quick 32-64")
    g = p.add_argument_group("nosharing")
    g.add_argument("--nosharing-items", type=int, help="default 32, quick 8")
    g.add_argument("--nosharing-prompt", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=[256, 512])
    # dest is not `warmup`: engine_config_from_args would take it for the engine's knob
    p.add_argument("--warmup", dest="warmup_buckets", choices=["all", "none"], default="all",
                   help="all: the first engine of each KV geometry compiles every executable")
    p.add_argument("--json", default="out/bench_prefix.json")
    add_engine_args(p, defaults=ENGINE_DEFAULTS, exclude=NOT_FLAGS)
    return p


def parse_args(argv=None):
    parser = build_parser()
    a = script_io.parse_checked(parser, argv, policy="conserve")
    q = a.quick
    a.cases = [x for x in a.cases.split(",") if x]
    unknown = [x for x in a.cases if x not in CASES]
    if unknown or not a.cases:
        parser.error(f"--cases: unknown {unknown}; known: {CASES}")
    a.offline_items = a.offline_items or (16 if q else 64)
    a.instruction_tokens = a.instruction_tokens or (512 if q else 1024)
    a.chat_conversations = a.chat_conversations or (4 if q else 8)
    a.coserve_duration = a.coserve_duration or (60.0 if q else 120.0)
    a.coserve_offline_items = a.coserve_offline_items or max(48, round(2 * a.coserve_duration))
    a.coserve_offline_output = a.coserve_offline_output or ([32, 64] if q else [64, 128])
    a.nosharing_items = a.nosharing_items or (8 if q else 32)
    a.drain = a.drain if a.drain is not None else a.ttft + a.online_output_max * a.tpot + 2.0
    if a.repeats < 1:
        parser.error("--repeats must be >= 1")
    for name in ("item_tokens", "chat_user_tokens", "chat_answer", "coserve_item_tokens",
                 "coserve_offline_output", "nosharing_prompt"):
        lo, hi = getattr(a, name)
        if not 1 <= lo <= hi:
            parser.error(f"--{name.replace('_', '-')}: need 1 <= MIN <= MAX, got {lo} {hi}")
    longest = {
        "offline": a.instruction_tokens + a.item_tokens[1] + a.output_tokens,
        "chat": a.chat_turns * (a.chat_user_tokens[1] + a.chat_answer[1]),
        "coserve": a.coserve_prefix_tokens + a.coserve_item_tokens[1] + a.coserve_offline_output[1],
        "nosharing": a.nosharing_prompt[1] + a.output_tokens}
    too_long = {c: n for c, n in longest.items() if c in a.cases and n > a.max_model_len}
    if too_long:
        parser.error(f"requests longer than --max-model-len {a.max_model_len}: {too_long}")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    a.t_start = time.perf_counter()
    loaded = load_model(a.model, seed=a.seed)
    vocab = loaded.config.vocab_size
    engines = Engines(a, loaded)
    engines.setup["model_load_s"] = time.perf_counter() - a.t_start
    res: dict = {}
    batch = [c for c in ("offline", "chat", "nosharing") if c in a.cases]
    if batch:
        progress(a, "building the cache-on and cache-off engines")
        pair = {s: engines.build(batch_config(a, s == "on"), "batch") for s in SIDES}
        for c in batch:
            res[c] = {"offline": offline_case, "chat": chat_case,
                      "nosharing": nosharing_case}[c](a, pair, vocab)
        for eng in pair.values():
            eng.shutdown()
            cs.release(eng)
    if "coserve" in a.cases:
        res["coserve"] = coserve_case(a, engines, vocab)
    cfg = dataclasses.asdict(batch_config(a, True))
    cfg.pop("enable_prefix_caching")
    co = dataclasses.asdict(coserve_config(a, "conserve", True))
    co.pop("enable_prefix_caching")
    out = {
        "model": loaded.source, "num_layers": loaded.config.num_layers,
        "machine": {"cpus": os.cpu_count(), "backend": __import__("jax").default_backend()},
        "mode": "quick" if a.quick else "full", "repeats": a.repeats,
        "cases": [c for c in CASES if c in a.cases],
        "engine_config": cfg, "coserve_engine_config": co,
        "slo": {"ttft_s": a.ttft, "tpot_s": a.tpot},
        **{c: res[c] for c in CASES if c in res},
    }
    out["targets"] = prefix_report.targets(out)
    out["setup"] = {**engines.setup, "total_s": time.perf_counter() - a.t_start}
    if a.json:
        script_io.write_json(a.json, out, announce=False)
    prefix_report.print_report(out)
    print(f"total {out['setup']['total_s']:.0f}s; JSON: {a.json}")
    return out


if __name__ == "__main__":
    main()
