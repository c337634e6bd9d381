"""Latency-model accuracy on this machine: predictions against measured iterations.

As the engine uses the model: fitted by the profiling sweep, corrected online from measured
iterations (the first 12 fresh points), then judged on 20 more fresh points off the
profiling grid. Iteration times are the median of 5 runs, as when profiling. Prints the
median / p90 relative error (targets: median <= 0.35, p90 <= 0.8 on the tiny random model,
whose millisecond iterations make timer and dispatch noise weigh most) and writes JSON.
This was a unit test; it depends on machine load, so it is a benchmark now (issue 9).

    python scripts/bench_latency_model.py --repeats 3 --json out/bench_latency_model.json

Engine knobs are the engine's own flags (--model, --dtype, --block-size, ...), defaulting
to the geometry the judged points need (max_model_len 512, 16 sequences, 256 prefill
tokens, 512 KV blocks).

Callers: scripts/bench_latency_model.py (the entry point; also `python -m
conserve_jax.bench.latency_model_accuracy`); tests/test_bench_scripts_args.py checks
`parse_args`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from conserve_jax.bench import script_io
from conserve_jax.engine_args import add_engine_args, engine_config_from_args
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.scheduling.latency_model import LatencyModel
from conserve_jax.scheduling.profiler import profile, synthetic_plan

# the script's own defaults for engine knobs (the engine's defaults otherwise)
ENGINE_DEFAULTS = {"model": "random:small", "max_model_len": 512, "max_num_seqs": 16,
                   "max_prefill_tokens": 256, "num_blocks": 512}


def one_round(runner, loaded, seed: int) -> list[float]:
    model = LatencyModel.fit(profile(runner, quick=False, repeats=5), runner.buckets,
                             runner.block_size, loaded.config.num_layers)
    rng = np.random.default_rng(seed)
    errs = []
    for i in range(32):
        d = int(rng.integers(0, 17))
        t = int(rng.choice([0, int(rng.integers(8, 257))])) if d else int(rng.integers(8, 257))
        c = int(rng.integers(max(t, 1), 512))
        plan, w = synthetic_plan(runner, d, t, c)
        runner.execute(plan)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            runner.execute(plan)
            times.append(time.perf_counter() - t0)
        measured = statistics.median(times)
        if i < 12:
            for _ in range(5):
                model.observe(w, measured)
        else:
            errs.append(abs(model.predict(w) - measured) / measured)
    return errs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="out/bench_latency_model.json")
    add_engine_args(ap, defaults=ENGINE_DEFAULTS)
    return ap


def parse_args(argv=None):
    return script_io.parse_checked(build_parser(), argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    loaded = load_model(args.model, seed=args.seed)
    runner = ModelRunner(loaded.config, loaded.params, engine_config_from_args(args))
    rounds = []
    for r in range(args.repeats):
        errs = one_round(runner, loaded, seed=1 + r)
        rounds.append({"median": statistics.median(errs), "p90": float(np.percentile(errs, 90))})
        print(f"round {r}: median relative error {rounds[-1]['median']:.3f}, "
              f"p90 {rounds[-1]['p90']:.3f}", flush=True)
    med = statistics.median(x["median"] for x in rounds)
    p90 = statistics.median(x["p90"] for x in rounds)
    out = {"model": args.model, "rounds": rounds, "median_of_medians": med,
           "median_of_p90": p90, "min_median": min(x["median"] for x in rounds),
           "targets": {"median": 0.35, "p90": 0.8}, "met": med <= 0.35 and p90 <= 0.8}
    print(f"median of medians {med:.3f} (target <= 0.35), median p90 {p90:.3f} (target <= 0.8)")
    script_io.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
