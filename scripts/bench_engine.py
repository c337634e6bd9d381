"""Engine micro-benchmark on one machine, all numbers from one run.

Prints a table and writes JSON:
  decode tokens/s at batch 1, 8, 32 (each sequence at --context tokens of KV);
  prefill tokens/s of one 512-token prompt;
  stream bandwidth (numpy copy of a buffer much larger than cache) and the batch-1 decode
  roofline = bandwidth / weight bytes read per step, with the achieved fraction;
  per-layer loop vs one whole-model jit of the same decode batch (overhead ratio).
Variants are interleaved over --repeats rounds; medians and minimums are reported.

    python scripts/bench_engine.py --model default --json out/bench_engine.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conserve_jax.config import CacheConfig, EngineConfig  # noqa: E402
from conserve_jax.models.loader import load_model  # noqa: E402
from conserve_jax.runtime.batch_arrays import build_batch  # noqa: E402
from conserve_jax.runtime.compile_cache import enable_compilation_cache  # noqa: E402
from conserve_jax.runtime.model_runner import ModelRunner  # noqa: E402
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan  # noqa: E402


def stream_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Memory bandwidth in bytes/s, best of `repeats`, by three methods: a numpy copy
    (read + write bytes, STREAM's convention), a jitted read-only reduction (all cores, as
    XLA uses them) and a jitted scale (read + write). The roofline uses the largest, so
    it is the most demanding bound."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    x = jnp.asarray(a)
    red = jax.jit(lambda v: jnp.sum(v))
    scale = jax.jit(lambda v: v * 1.0001)
    red(x).block_until_ready()
    scale(x).block_until_ready()
    best = {"numpy_copy": float("inf"), "jax_read": float("inf"), "jax_scale": float("inf")}
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best["numpy_copy"] = min(best["numpy_copy"], time.perf_counter() - t)
        t = time.perf_counter()
        red(x).block_until_ready()
        best["jax_read"] = min(best["jax_read"], time.perf_counter() - t)
        t = time.perf_counter()
        scale(x).block_until_ready()
        best["jax_scale"] = min(best["jax_scale"], time.perf_counter() - t)
    factor = {"numpy_copy": 2, "jax_read": 1, "jax_scale": 2}
    return {k: factor[k] * a.nbytes / v for k, v in best.items()}


def weight_bytes_per_decode_step(runner: ModelRunner) -> int:
    layers = sum(int(x.nbytes) for lp in runner.layers for x in jax.tree.leaves(lp))
    return layers + int(runner.head.nbytes) + int(runner.final_norm.nbytes)


def greedy() -> SampleSpec:
    return SampleSpec(0.0, 0, 1.0, 0, 0, None)


def decode_plan(batch: int, context: int, bs: int, tables: list[list[int]]) -> StepPlan:
    return StepPlan(decodes=[DecodeItem(7, context, tables[i], greedy()) for i in range(batch)])


def time_call(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def whole_model_fn(runner: ModelRunner):
    """One jit over every layer (unrolled), same math and donation as the per-layer loop."""
    module = runner._layer_module

    def fwd(layers, x, cos, sin, caches, meta):
        new = []
        for p, (kc, vc) in zip(layers, caches):
            x, kc, vc = module.apply({"params": p}, x, cos, sin, kc, vc, meta,
                                     meta.dec_tables.shape[0])
            new.append((kc, vc))
        return x, new

    return jax.jit(fwd, donate_argnums=(4,))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--context", type=int, default=256, help="KV tokens per decoding sequence")
    ap.add_argument("--steps", type=int, default=8, help="timed iterations per variant per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default="out/bench_engine.json")
    args = ap.parse_args()
    enable_compilation_cache(None)
    batches = [int(b) for b in args.batches.split(",")]
    loaded = load_model(args.model)
    cfg = EngineConfig(model=args.model, dtype=args.dtype, max_model_len=2048,
                       max_num_seqs=max(batches), max_prefill_tokens=args.prefill,
                       cache=CacheConfig(block_size=16, num_blocks=max(batches) * 80 + 64))
    runner = ModelRunner(loaded.config, loaded.params, cfg)
    bs = cfg.cache.block_size
    per_seq = -(-max(args.context + 8, args.prefill) // bs)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(max(batches))]

    # compile everything first
    plans = {b: decode_plan(b, args.context, bs, tables) for b in batches}
    pre_plan = StepPlan(prefills=[PrefillItem([5] * args.prefill, 0, tables[0], greedy())])
    for p in list(plans.values()) + [pre_plan]:
        runner.execute(p)
    whole = whole_model_fn(runner)
    b1 = build_batch(plans[1], runner.buckets, bs)
    meta = runner._meta(b1)

    def run_whole():
        x, cos, sin = runner._embed(runner.embed, b1.token_ids, b1.positions, runner.inv_freq)
        x, runner.caches = whole(runner.layers, x, cos, sin, runner.caches, meta)
        x.block_until_ready()

    def run_loop():
        x = runner._forward(b1, None)
        x.block_until_ready()

    run_whole()
    run_loop()

    decode_t = {b: [] for b in batches}
    prefill_t, loop_t, whole_t = [], [], []
    for _ in range(args.repeats):  # interleave the variants round by round
        for b in batches:
            decode_t[b] += time_call(lambda: runner.execute(plans[b]), args.steps)
        prefill_t += time_call(lambda: runner.execute(pre_plan), 2)
        loop_t += time_call(run_loop, args.steps)
        whole_t += time_call(run_whole, args.steps)
    bws = stream_bandwidth()
    bw = max(bws.values())
    wbytes = weight_bytes_per_decode_step(runner)
    roofline = bw / wbytes

    res = {"model": args.model, "dtype": args.dtype, "context": args.context,
           "devices": [str(d) for d in jax.devices()][:1],
           "stream_bandwidth_gb_s": bw / 1e9,
           "bandwidth_by_method_gb_s": {k: v / 1e9 for k, v in bws.items()}, "weight_bytes_per_step": wbytes,
           "decode_b1_roofline_tokens_per_s": roofline, "decode": {}}
    print("bandwidth GB/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bws.items()))
    print(f"stream bandwidth (max) {bw / 1e9:.1f} GB/s, weights {wbytes / 1e6:.0f} MB/step, "
          f"batch-1 roofline {roofline:.1f} tokens/s")
    print(f"{'measure':<28}{'median':>12}{'best':>12}")
    for b in batches:
        med, best = b / statistics.median(decode_t[b]), b / min(decode_t[b])
        res["decode"][str(b)] = {"tokens_per_s_median": med, "tokens_per_s_best": best}
        print(f"{f'decode batch {b} tok/s':<28}{med:>12.1f}{best:>12.1f}")
    pm, pb = args.prefill / statistics.median(prefill_t), args.prefill / min(prefill_t)
    res["prefill"] = {"tokens": args.prefill, "tokens_per_s_median": pm, "tokens_per_s_best": pb}
    print(f"{f'prefill {args.prefill} tok/s':<28}{pm:>12.1f}{pb:>12.1f}")
    ratio = statistics.median(loop_t) / statistics.median(whole_t)
    res["per_layer_loop_s_median"] = statistics.median(loop_t)
    res["whole_model_jit_s_median"] = statistics.median(whole_t)
    res["per_layer_overhead_ratio"] = ratio
    res["decode_b1_roofline_fraction"] = res["decode"]["1"]["tokens_per_s_median"] / roofline \
        if "1" in res["decode"] else None
    print(f"{'per-layer / whole-jit':<28}{ratio:>12.3f}")
    print(f"{'decode b1 / roofline':<28}{res['decode_b1_roofline_fraction']:>12.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
