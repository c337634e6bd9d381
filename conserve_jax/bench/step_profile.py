"""Where one engine iteration's time goes: a jax.profiler trace of decode steps, aggregated.

Runs `--steps` decode iterations of the real runner at each batch size under
`jax.profiler.trace`, reads the Perfetto JSON it writes, and sums the XLA:CPU thunk events
(one per fused op, dot or scatter) per step, grouped into matmul / attention / cache write /
norms+RoPE+elementwise / other, beside the step's wall time; the remainder is dispatch and
host work (batch building, sampler, device->host copies), measured separately too.

    python scripts/profile_engine.py --batches 1,32 --context 256 --json out/profile_engine.json

Engine knobs are the engine's own flags (--dtype, --block-size, --layers-per-call, ...);
the batch (largest of --batches) and the KV blocks (room for --context) are set here.

Callers: scripts/profile_engine.py (the entry point; also `python -m
conserve_jax.bench.step_profile`); tests/test_bench_scripts_args.py checks `parse_args` and
`runner_config`.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

from conserve_jax.bench import script_io
from conserve_jax.config import EngineConfig
from conserve_jax.engine_args import add_engine_args, engine_config_from_args
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.batch_arrays import build_batch
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.step_plan import DecodeItem, SampleSpec, StepPlan

# thunk-name patterns -> category (first match wins); names come from XLA's HLO op names
CATEGORIES = [
    ("matmul", re.compile(r"ynn|xnn|dot|gemm|matmul|custom-call|convolution", re.I)),
    ("cache_write", re.compile(r"scatter|dynamic-update|dynamic_update", re.I)),
    ("attention_gather", re.compile(r"gather", re.I)),
    ("softmax_reduce", re.compile(r"reduce|exponential|softmax|max", re.I)),
    ("elementwise", re.compile(r"fusion|add|multiply|rsqrt|concatenate|select|convert|"
                               r"broadcast|transpose|copy|slice|cos|sin|iota|compare", re.I)),
]
# the script's own defaults for engine knobs; knobs it sets from --batches / --context
ENGINE_DEFAULTS = {"max_model_len": 2048, "max_prefill_tokens": 512, "block_size": 16}
NOT_FLAGS = ("max_num_seqs", "num_blocks", "kv_cache_tokens")
HOST_PREFIXES = ("PjitFunction", "ParseArguments", "ExecuteHelper", "Handle inputs")


def categorize(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def read_trace(logdir: str) -> list[dict]:
    path = sorted(glob.glob(os.path.join(logdir, "plugins/profile/*/perfetto_trace.json.gz")))[-1]
    with gzip.open(path) as f:
        d = json.load(f)
    ev = d["traceEvents"] if isinstance(d, dict) else d
    return [e for e in ev if e.get("ph") == "X"]


def thunk_events(events: list[dict]) -> list[dict]:
    """Events of XLA ops: on executor threads, not wrappers, not python frames."""
    skip = ("Threadpool", "ThunkExecutor", "SlinkyThreadPool", "end: ", "$", "Pjrt", "PjRt",
            "Pjit", "Await", "Parse", "Handle", "Allocate", "Wait for", "PythonRef", "Execute")
    return [e for e in events if not any(str(e.get("name", "")).startswith(s) or s in
                                         str(e.get("name", "")) for s in skip)]


def profile_batch(runner: ModelRunner, plan: StepPlan, steps: int) -> dict:
    for _ in range(2):
        runner.execute(plan)
    t_build = []
    for _ in range(steps):
        t = time.perf_counter()
        build_batch(plan, runner.buckets, runner.block_size)
        t_build.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as logdir:
        walls = []
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(steps):
                t = time.perf_counter()
                runner.execute(plan)
                walls.append(time.perf_counter() - t)
        events = read_trace(logdir)
    ops = thunk_events(events)
    by_cat: dict = collections.defaultdict(float)
    by_name: dict = collections.defaultdict(float)
    for e in ops:
        by_cat[categorize(e["name"])] += e["dur"] / 1e3 / steps
        by_name[e["name"]] += e["dur"] / 1e3 / steps
    calls = sum(1 for e in events if str(e.get("name", "")).startswith("PjitFunction")) / steps
    wall = float(np.median(walls)) * 1e3
    device = sum(by_cat.values())
    return {"wall_ms_median": wall, "wall_ms_min": min(walls) * 1e3,
            "op_ms_per_step": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "op_ms_sum": device, "not_in_ops_ms": wall - device,
            "jit_calls_per_step": calls,
            "build_batch_ms": float(np.median(t_build)) * 1e3,
            "top_ops_ms": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:15])}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", default="out/profile_engine.json")
    add_engine_args(ap, defaults=ENGINE_DEFAULTS, exclude=NOT_FLAGS)
    return ap


def parse_args(argv=None):
    args = script_io.parse_checked(build_parser(), argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def runner_config(args) -> tuple[EngineConfig, int]:
    """(config, KV blocks per sequence): the engine flags, with the largest batch of
    --batches and KV blocks for each sequence to hold --context + 8 tokens."""
    per_seq = -(-(args.context + 8) // args.block_size)
    cfg = engine_config_from_args(args, max_num_seqs=max(args.batches),
                                  num_blocks=max(args.batches) * per_seq + 8)
    return cfg, per_seq


def main(argv=None) -> int:
    args = parse_args(argv)
    batches = args.batches
    loaded = load_model(args.model, seed=args.seed)
    cfg, per_seq = runner_config(args)
    runner = ModelRunner(loaded.config, loaded.params, cfg)
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, None)
    res = {"model": args.model, "context": args.context, "batches": {}}
    for b in batches:
        plan = StepPlan(decodes=[DecodeItem(7, args.context, list(range(1 + i * per_seq,
                                                                      1 + (i + 1) * per_seq)), spec)
                                 for i in range(b)])
        r = profile_batch(runner, plan, args.steps)
        res["batches"][str(b)] = r
        print(f"batch {b}: wall {r['wall_ms_median']:.2f} ms (min {r['wall_ms_min']:.2f}), "
              f"ops {r['op_ms_sum']:.2f} ms, outside ops {r['not_in_ops_ms']:.2f} ms, "
              f"{r['jit_calls_per_step']:.0f} jit calls, build_batch {r['build_batch_ms']:.3f} ms")
        for k, v in r["op_ms_per_step"].items():
            print(f"    {k:<18}{v:8.2f} ms")
        for k, v in list(r["top_ops_ms"].items())[:10]:
            print(f"      {k[:40]:<42}{v:8.3f} ms")
    script_io.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
