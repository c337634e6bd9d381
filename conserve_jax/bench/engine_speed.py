"""Engine speed on one machine, all numbers from one run, optionally beside peers.

Measures, interleaved round by round (medians and minimums over all rounds):
  decode tokens/s at batch 1, 8 and 32, each sequence at 128 and 1024 tokens of context
    (one iteration of the runner: layers, head, sampler, device->host of the tokens);
  prefill tokens/s of one 512- and one 2048-token prompt (the engine chunks by
    max_prefill_tokens=512, as it does by default);
  batch-1 decode through the public `LLM.generate` path (decode tokens/s from the time of
    max_tokens=1+N minus max_tokens=1 generations), online and offline (with LLM's
    default of no layer safepoints; --safepoint-interval K measures it with them);
  the batch-1 roofline: matvec bandwidth (numpy / torch / jax, best) over the bytes of
    weights one decode step reads, and the fraction of it batch-1 decode reaches;
  one jitted call per layer vs the default layers-per-call (dispatch overhead).
With --peers transformers the same GGUF weights run in transformers (float32, torch with
--threads threads) on the same measures; ratios are engine/peer of medians.
Engine knobs are the engine's own flags (`add_engine_args`: --dtype, --block-size,
--max-prefill-tokens, ...); the runner measures size the batch and the KV cache themselves
(so --max-num-seqs, --num-blocks and --kv-cache-tokens are not flags here), and the
`LLM.generate` measure uses the flags with the engine's default batch and KV size.

    python scripts/bench_engine.py --peers transformers --json out/bench_engine.json
    python scripts/bench_engine.py --quick --peers transformers    # a few minutes

Callers: scripts/bench_engine.py (the entry point; also `python -m
conserve_jax.bench.engine_speed`); tests/test_bench_scripts_args.py checks `parse_args`,
`runner_config` and `llm_kwargs`. The peers live in their own processes (`peers`): this
process imports no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

import jax

from conserve_jax.bench import script_io
from conserve_jax.bench.peers import make_peers, matvec_bandwidth_isolated, timed_calls
from conserve_jax.config import EngineConfig
from conserve_jax.engine_args import (add_engine_args, engine_config_from_args,
                                      engine_kwargs_from_args)
from conserve_jax.models.loader import default_model_path, load_model
from conserve_jax.runtime.compile_cache import enable_compilation_cache
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan

# the script's own defaults for engine knobs (the engine's defaults otherwise)
ENGINE_DEFAULTS = {"max_model_len": 2048, "max_prefill_tokens": 512, "block_size": 16,
                   "safepoint_interval": None}  # LLM's own default
# knobs the runner measures set per measure (batch, KV blocks)
NOT_FLAGS = ("max_num_seqs", "num_blocks", "kv_cache_tokens")


def greedy() -> SampleSpec:
    return SampleSpec(0.0, 0, 1.0, 0, 0, None)


def runner_config(args, max_batch: int, max_context: int, prefill: int) -> tuple[EngineConfig, int]:
    """(config, blocks per sequence) of the runner measures: the engine flags, with
    `max_batch` sequences and KV blocks for each to hold max(max_context, prefill) tokens."""
    per_seq = -(-max(max_context, prefill) // args.block_size) + 1
    cfg = engine_config_from_args(args, max_num_seqs=max_batch,
                                  num_blocks=max_batch * per_seq + 8)
    return cfg, per_seq


def llm_kwargs(args) -> dict:
    """Keyword arguments of the `LLM` the LLM.generate measure uses: every engine flag
    (the knobs that are not flags here keep the engine's defaults)."""
    return engine_kwargs_from_args(args)


class EngineSide:
    """Runner-level measures: each returns a callable running one unit of work."""

    def __init__(self, loaded, cfg: EngineConfig, per_seq: int, layers_per_call=None) -> None:
        self.per_seq, self.chunk = per_seq, cfg.max_prefill_tokens
        self.runner = ModelRunner(loaded.config, loaded.params, cfg, layers_per_call)

    def table(self, i: int) -> list[int]:
        return list(range(1 + i * self.per_seq, 1 + (i + 1) * self.per_seq))

    def decode_step(self, batch: int, context: int):
        plan = StepPlan(decodes=[DecodeItem(7, context - 1, self.table(i), greedy())
                                 for i in range(batch)])
        return lambda: self.runner.execute(plan)

    def prefill(self, n: int):
        c = self.chunk
        plans = [StepPlan(prefills=[PrefillItem([5] * min(c, n - s), s, self.table(0),
                                                greedy() if s + c >= n else None)])
                 for s in range(0, n, c)]

        def run():
            for p in plans:
                self.runner.execute(p)
        return run


def weight_bytes_per_decode_step(runner: ModelRunner) -> int:
    layers = sum(int(x.nbytes) for lp in runner.layers for x in jax.tree.leaves(lp))
    return layers + int(runner.head.nbytes) + int(runner.final_norm.nbytes)


def llm_generate_fns(llm, prompt_len: int, n: int, offline: bool):
    """(generate max_tokens=1, generate max_tokens=1+n) through the public API."""
    from conserve_jax import SamplingParams

    prompt = [5 + i % 100 for i in range(prompt_len)]
    sp = lambda m: SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
    one = lambda: llm.generate([prompt], sp(1), offline=offline)
    many = lambda: llm.generate([prompt], sp(1 + n), offline=offline)
    one()
    many()
    return one, many


SETTLE_S = 0.1  # idle before each timed block: the other process's threads go to sleep


def timed(fn, n: int, warm: int = 0) -> list[float]:
    """n durations of fn after `warm` untimed calls; a peer's measure (RemoteMeasure) is
    timed in its own process."""
    time.sleep(SETTLE_S)
    if hasattr(fn, "timed"):
        return fn.timed(n, warm)
    return timed_calls(fn, n, warm)


def stats(times: list[float], work: int) -> dict:
    return {"tokens_per_s_median": work / statistics.median(times),
            "tokens_per_s_best": work / min(times), "samples": len(times)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="", help="comma list: transformers, llama-cpp")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch/llama.cpp threads (XLA uses every core)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per round")
    ap.add_argument("--llm-tokens", type=int, default=None, help="N for the LLM.generate measure")
    ap.add_argument("--block-warmup", type=int, default=1,
                    help="untimed calls before each timed block (every side): the block then "
                         "measures the shape's steady state, not the cache misses left by the "
                         "measures before it")
    ap.add_argument("--compare-weight-dtype", default=None, metavar="DTYPE",
                    help="also measure the runner with --weight-dtype DTYPE (e.g. bfloat16) as a "
                         "second engine side, interleaved with the others")
    ap.add_argument("--json", default="out/bench_engine.json")
    add_engine_args(ap, defaults=ENGINE_DEFAULTS, exclude=NOT_FLAGS)
    return ap


def parse_args(argv=None):
    return script_io.parse_checked(build_parser(), argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    q = args.quick
    repeats = args.repeats or (2 if q else 4)
    steps = args.steps or (3 if q else 5)
    contexts = [128] if q else [128, 1024]
    batches = [1, 8, 32]
    prefills = [512] if q else [512, 2048]
    n_llm = args.llm_tokens or (24 if q else 48)
    enable_compilation_cache(args.compilation_cache_dir)

    loaded = load_model(args.model, seed=args.seed)
    gguf = default_model_path() if args.model == "default" else (
        args.model if args.model.endswith(".gguf") else None)
    peer_names = [p for p in args.peers.split(",") if p]
    t0 = time.perf_counter()
    eng = EngineSide(loaded, *runner_config(args, max(batches), max(contexts), max(prefills)))
    per_layer = EngineSide(loaded, *runner_config(args, 1, max(contexts), max(prefills)),
                           layers_per_call=1)
    variants = {}  # extra engine sides: name -> EngineSide
    if args.compare_weight_dtype:
        cfg, per_seq = runner_config(args, max(batches), max(contexts), max(prefills))
        cfg = dataclasses.replace(cfg, weight_dtype=args.compare_weight_dtype)
        variants[f"engine_w{args.compare_weight_dtype}"] = EngineSide(loaded, cfg, per_seq)
    peers = make_peers(peer_names, gguf, args.threads, max(max(contexts), max(prefills)) + 8)

    # every measure: name -> (work units, {side: callable})
    measures: dict = {}
    for b in batches:
        for c in contexts:
            sides = {"engine": eng.decode_step(b, c),
                     **{v: side.decode_step(b, c) for v, side in variants.items()}}
            for p in peers:
                f = p.decode_step(b, c)
                if f is not None:
                    sides[p.name] = f
            measures[f"decode_b{b}_ctx{c}"] = (b, sides)
    for n in prefills:
        measures[f"prefill{n}"] = (n, {"engine": eng.prefill(n),
                                       **{v: side.prefill(n) for v, side in variants.items()},
                                       **{p.name: p.prefill(n) for p in peers}})
    measures["decode_b1_ctx128_per_layer_calls"] = (1, {"engine": per_layer.decode_step(1, 128)})
    from conserve_jax import LLM

    llm = LLM(**llm_kwargs(args))
    llms = {offline: llm_generate_fns(llm, 127, n_llm, offline) for offline in (False, True)}
    gen_peer = [p for p in peers if p.has_generate]
    for f in [f for _, sides in measures.values() for f in sides.values()]:
        f()  # compile / warm every shape before timing
    print(f"set-up and warm-up {time.perf_counter() - t0:.0f} s")

    times = {name: {side: [] for side in sides} for name, (_, sides) in measures.items()}
    llm_t = {k: {"one": [], "many": []} for k in ("online", "offline")}
    gen_t = {p.name: {"one": [], "many": []} for p in gen_peer}
    gen_fns = {p.name: (p.generate([5 + i % 100 for i in range(127)], 1),
                        p.generate([5 + i % 100 for i in range(127)], 1 + n_llm)) for p in gen_peer}
    bws: dict = {}
    for r in range(repeats):  # interleave every variant round by round
        for name, (work, sides) in measures.items():
            order = list(sides.items())
            order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
            for side, fn in order:
                times[name][side] += timed(fn, 1 if name.startswith("prefill") else steps,
                                           args.block_warmup)
        for offline, (one, many) in llms.items():
            k = "offline" if offline else "online"
            llm_t[k]["one"] += timed(one, 1)
            llm_t[k]["many"] += timed(many, 1)
        for p in gen_peer:
            gen_t[p.name]["one"] += timed(gen_fns[p.name][0], 1)
            gen_t[p.name]["many"] += timed(gen_fns[p.name][1], 1)
        for k, v in matvec_bandwidth_isolated(weight_bytes_per_decode_step(eng.runner),
                                     loaded.config.hidden_size, args.threads, 2).items():
            bws[k] = max(bws.get(k, 0.0), v)
        print(f"round {r + 1}/{repeats} done", flush=True)
    llm.close()
    for p in peers:
        p.close()

    wbytes = weight_bytes_per_decode_step(eng.runner)
    bw = max(bws.values())
    roofline = bw / wbytes
    res: dict = {
        "model": args.model, "dtype": args.dtype, "quick": q, "rounds": repeats,
        "steps_per_block": steps, "untimed_calls_per_block": args.block_warmup,
        "weight_dtype": args.weight_dtype,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "platform": platform.platform(), "jax": jax.__version__,
                    "load_avg_at_end": os.getloadavg()},
        "peers": [p.name for p in peers], "threads": args.threads,
        "layers_per_call": eng.runner.layers_per_call,
        "matvec_bandwidth_gb_s": {k: v / 1e9 for k, v in bws.items()},
        "weight_bytes_per_step": wbytes, "decode_b1_roofline_tokens_per_s": roofline,
        "measures": {}, "ratios": {}}
    for name, (work, sides) in measures.items():
        res["measures"][name] = {side: stats(times[name][side], work) for side in sides}

    def gen_rate(t: dict) -> dict:  # decode time = generate(1+N) - generate(1)
        med = statistics.median(t["many"]) - statistics.median(t["one"])
        best = min(t["many"]) - min(t["one"])
        return {"tokens_per_s_median": n_llm / med if med > 0 else None,
                "tokens_per_s_best": n_llm / best if best > 0 else None,
                "samples": len(t["many"])}
    for k, t in llm_t.items():
        res["measures"][f"llm_generate_b1_{k}"] = {"engine": gen_rate(t)}
    for name, t in gen_t.items():
        res["measures"]["llm_generate_b1_online"][name] = gen_rate(t)
    med = lambda m, side="engine": res["measures"][m][side]["tokens_per_s_median"]
    ratio = lambda a, b: a / b if a is not None and b else None
    b1 = med("decode_b1_ctx128")
    res["decode_b1_roofline_fraction"] = ratio(b1, roofline)
    res["llm_api_vs_runner_b1"] = ratio(med("llm_generate_b1_online"), b1)
    res["llm_api_offline_vs_runner_b1"] = ratio(med("llm_generate_b1_offline"), b1)
    res["per_layer_calls_vs_default_b1"] = ratio(med("decode_b1_ctx128_per_layer_calls"), b1)
    for p in peers:
        for name, m in res["measures"].items():
            if p.name in m:
                res["ratios"][f"{name}_vs_{p.name}"] = ratio(med(name), med(name, p.name))
        for b in batches:  # the headline keys: decode at 128 tokens of context
            key = f"decode_b{b}_ctx128_vs_{p.name}"
            if key in res["ratios"]:
                res["ratios"][f"b{b}_vs_{p.name}"] = res["ratios"][key]
    for v in variants:  # the same ratios for each extra engine side, under its name
        vr = res.setdefault("variant_ratios", {}).setdefault(v, {})
        for p in peers:
            for name, m in res["measures"].items():
                if v in m and p.name in m:
                    vr[f"{name}_vs_{p.name}"] = ratio(med(name, v), med(name, p.name))
            for b in batches:
                if f"decode_b{b}_ctx128_vs_{p.name}" in vr:
                    vr[f"b{b}_vs_{p.name}"] = vr[f"decode_b{b}_ctx128_vs_{p.name}"]
        for name, m in res["measures"].items():
            if v in m:
                vr[f"{name}_vs_engine"] = ratio(med(name, v), med(name))

    print("matvec bandwidth GB/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bws.items()))
    print(f"weights {wbytes / 1e6:.0f} MB/step -> batch-1 roofline {roofline:.1f} tokens/s")
    sides = ["engine"] + list(variants) + [p.name for p in peers]
    print(f"{'tokens/s (median / best)':<34}" + "".join(f"{s:>24}" for s in sides))
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
    for name, m in res["measures"].items():
        cells = [f"{fmt(m[s]['tokens_per_s_median'])} / {fmt(m[s]['tokens_per_s_best'])}"
                 if s in m else "-" for s in sides]
        print(f"{name:<34}" + "".join(f"{c:>24}" for c in cells))
    fmt3 = lambda v: "n/a" if v is None else f"{v:.3f}"
    for k in ("decode_b1_roofline_fraction", "llm_api_vs_runner_b1", "llm_api_offline_vs_runner_b1",
              "per_layer_calls_vs_default_b1"):
        print(f"{k:<44}{fmt3(res[k]):>10}")
    for k, v in res["ratios"].items():
        print(f"{k:<44}{fmt3(v):>10}")
    for name, vr in res.get("variant_ratios", {}).items():
        for k, v in vr.items():
            print(f"{name + ': ' + k:<58}{fmt3(v):>10}")
    print(f"load average at end {os.getloadavg()}")
    script_io.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
