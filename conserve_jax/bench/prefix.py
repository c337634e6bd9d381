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

Callers: scripts/bench_prefix.py (the entry point; also `python -m
conserve_jax.bench.prefix`); tests/test_bench_prefix.py runs `main` on a tiny model.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time

import numpy as np

from conserve_jax.bench import coserve as cs
from conserve_jax.bench import coserve_report as report
from conserve_jax.bench import coserve_workload as cwl
from conserve_jax.bench import prefix_report
from conserve_jax.bench import prefix_workload as wl
from conserve_jax.bench import script_io
from conserve_jax.bench.prefix_workload import div, pct, summarize
from conserve_jax.config import EngineConfig
from conserve_jax.engine.engine import Engine
from conserve_jax.engine_api import SLO, EngineStats, GenerationRequest, RequestClass
from conserve_jax.engine_args import add_engine_args, engine_config_from_args
from conserve_jax.models.loader import load_model
from conserve_jax.sampling_params import SamplingParams

CASES = ["offline", "chat", "coserve", "nosharing"]
SIDES = ("on", "off")
COSERVE_RUNS = [("online-only", "online-only", True), ("conserve-cache-on", "conserve", True),
                ("conserve-cache-off", "conserve", False)]  # (label, policy, cache on)
ENGINE_DEFAULTS = {"max_model_len": 1280, "max_num_seqs": 16, "max_prefill_tokens": 512,
                   "block_size": 16, "host_pool_bytes": 4 << 30}
NOT_FLAGS = ("policy", "enable_prefix_caching", "warmup", "default_ttft_s", "default_tpot_s")
GET_TIMEOUT_S = 1800.0  # one stream delta; a hung engine fails the benchmark, not hangs it


# ---- engines ---------------------------------------------------------------------------
def _blocks_per_seq(a) -> int:
    return -(-a.max_model_len // a.block_size)


def batch_config(a, cache_on: bool) -> EngineConfig:
    """The on/off engines of offline, chat and nosharing: conserve, KV for --kv-seqs full
    contexts unless --num-blocks / --kv-cache-tokens say."""
    nb = a.num_blocks or a.kv_seqs * _blocks_per_seq(a) + 1
    return engine_config_from_args(a, policy="conserve", num_blocks=nb, default_ttft_s=a.ttft,
                                   default_tpot_s=a.tpot, warmup=False,
                                   enable_prefix_caching=cache_on)


def coserve_config(a, policy: str, cache_on: bool) -> EngineConfig:
    """A co-serving run's engine: bench_coserve's, KV for --coserve-kv-seqs full contexts."""
    nb = a.coserve_kv_seqs * _blocks_per_seq(a) + 1
    return engine_config_from_args(a, policy=policy, num_blocks=nb, kv_cache_tokens=None,
                                   default_ttft_s=a.ttft, default_tpot_s=a.tpot, warmup=False,
                                   enable_prefix_caching=cache_on)


class Engines:
    """Builds engines from one loaded model: the first of each KV geometry compiles every
    executable (--warmup all), later ones adopt its jitted functions; each engine serves a
    warm-up mix before it is handed out."""

    def __init__(self, a, loaded) -> None:
        self.a, self.loaded = a, loaded
        self.shared: dict = {}
        self.setup: dict = {"engine_builds_s": [], "warmup_compiles_s": {}}

    def build(self, cfg: EngineConfig, geometry: str) -> Engine:
        shared = self.shared.setdefault(geometry, cs.SharedCompiled())
        first = not shared.fns
        t = time.perf_counter()
        eng = Engine(cfg, loaded=self.loaded,
                     warmup=first and self.a.warmup_buckets == "all")
        if first:
            self.setup["warmup_compiles_s"][geometry] = time.perf_counter() - t
        shared.adopt(eng)
        warm(eng, self.loaded.config.vocab_size, cfg.cache.block_size)
        self.setup["engine_builds_s"].append(time.perf_counter() - t)
        return eng


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _collect(stream) -> tuple:
    """(token ids, final delta, time of the first token or None) of one stream."""
    toks, first = [], None
    while True:
        out = stream.get(timeout=GET_TIMEOUT_S)
        if out.token_ids and first is None:
            first = time.monotonic()
        toks += out.token_ids
        if out.finished:
            return toks, out, first


def warm(eng: Engine, vocab: int, bs: int) -> None:
    """A short mix through a new engine (offline twins sharing two blocks where the policy
    takes offline work, and one online request), so that first-use costs stay out of the
    measured runs."""
    rng = np.random.default_rng(987654321)
    n = max(1, min(2 * bs + 5, eng.max_model_len // 2 - 8))
    shared = wl.ids(rng, n, vocab)
    reqs = [GenerationRequest("warm-on", wl.ids(rng, n, vocab), _greedy(4), RequestClass.ONLINE)]
    if eng.policy.accepts(GenerationRequest("x", [5], request_class=RequestClass.OFFLINE)):
        reqs += [GenerationRequest(f"warm-off-{i}", shared + [5 + i], _greedy(4),
                                   RequestClass.OFFLINE) for i in range(2)]
    for s in [eng.submit(r) for r in reqs]:
        _collect(s)
    settled(eng)


def settled(eng: Engine, timeout_s: float = 60.0) -> EngineStats:
    """The engine's stats once it holds no request (the snapshot follows the last finish by
    up to one loop pass)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = eng.stats()
        busy = st.online_waiting + st.online_running + st.offline_waiting + st.offline_running
        if not busy or time.monotonic() > deadline:
            return st
        time.sleep(0.005)


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
    streams = [eng.submit(GenerationRequest(it.request_id, list(it.prompt), _greedy(it.output_len),
                                            RequestClass.OFFLINE)) for it in items]
    outs, finals = [], []
    for s in streams:
        toks, fin, _ = _collect(s)
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


def batch_case(a, name: str, engines: dict, make_items, describe: dict) -> dict:
    """`make_items(rep)` -> the repeat's items; runs both sides per repeat, order alternating."""
    bs = a.block_size
    runs = []
    for rep in range(a.repeats):
        items = make_items(rep)
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        res, outs = {}, {}
        for side in order:
            _progress(a, f"{name} repeat {rep + 1}/{a.repeats}: cache {side}")
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
                                        _greedy(script.answer_lens[c][k]),
                                        RequestClass.ONLINE, slo)
                t_sub = time.monotonic()
                toks, fin, first = _collect(eng.submit(req))
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


def chat_case(a, engines: dict, vocab: int) -> dict:
    runs = []
    for rep in range(a.repeats):
        rng = np.random.default_rng([a.seed, rep, 2])
        script = wl.chat_script(rng, vocab, a.chat_conversations, a.chat_turns,
                                tuple(a.chat_user_tokens), tuple(a.chat_answer))
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        res, answers = {}, {}
        for side in order:
            _progress(a, f"chat repeat {rep + 1}/{a.repeats}: cache {side}")
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
            eng.submit(GenerationRequest(it.request_id, list(it.prompt), _greedy(it.output_len),
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


def coserve_case(a, engines: Engines, vocab: int) -> dict:
    # the first engine of this geometry compiles every executable; a checkpointing one, so
    # that the KV transfers compile too (online-only has none and may come first)
    _progress(a, "coserve: compiling the co-serving engines' executables")
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
            _progress(a, f"coserve repeat {rep + 1}/{a.repeats}: {label}")
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


def _progress(a, what: str) -> None:
    print(f"[{time.perf_counter() - a.t_start:6.0f}s] {what}", flush=True)


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
        _progress(a, "building the cache-on and cache-off engines")
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
