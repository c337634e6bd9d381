"""Decode attention read in chunks vs the whole context bucket at once, A/B in one process.

Builds one runner per `--chunks` value (`attention_chunk`; 0 = the whole bucket at
once) over the same weights and times decode iterations of the real runner for every
`--cases` entry BxC (B sequences, each at C tokens of context: 1024 fills a 64-block
bucket exactly, 1032 leaves a 128-block bucket half empty), the runners interleaved round by
round with their order alternating. Prints ms per step (median, min) and each chunk's
speed-up over the first.

    python scripts/probe_decode_chunk.py --cases 1x1032,8x1032,32x1032,32x1024 --chunks 0,16

Engine knobs are the engine's own flags (--dtype, --block-size, ...); batch, KV blocks and
the chunk are set here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import bench_io  # noqa: E402
from conserve_jax.engine_args import add_engine_args, engine_config_from_args  # noqa: E402
from conserve_jax.models.loader import load_model  # noqa: E402
from conserve_jax.runtime.model_runner import ModelRunner  # noqa: E402
from conserve_jax.runtime.step_plan import DecodeItem, SampleSpec, StepPlan  # noqa: E402

ENGINE_DEFAULTS = {"max_model_len": 2048, "block_size": 16}
NOT_FLAGS = ("max_num_seqs", "num_blocks", "kv_cache_tokens", "attention_chunk")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1x1032,8x1032,32x1032,1x1024,8x1024,32x1024",
                    help="comma list of BxC: B sequences at C tokens of context")
    ap.add_argument("--chunks", default="0,16", help="attention_chunk values")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="out/probe_decode_chunk.json")
    add_engine_args(ap, defaults=ENGINE_DEFAULTS, exclude=NOT_FLAGS)
    return ap


def parse_args(argv=None):
    args = bench_io.parse_checked(build_parser(), argv)
    args.cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    args.chunks = [int(c) for c in args.chunks.split(",")]
    return args


def time_case(runners: dict, plan: StepPlan, rounds: int, steps: int) -> dict:
    """Seconds per step of each runner, `rounds` interleaved blocks of `steps` steps."""
    out = {c: [] for c in runners}
    order = list(runners)
    for r in range(rounds):
        for c in (order if r % 2 == 0 else order[::-1]):
            runners[c].execute(plan)  # untimed
            t = time.perf_counter()
            for _ in range(steps):
                runners[c].execute(plan)
            out[c].append((time.perf_counter() - t) / steps)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    loaded = load_model(args.model, seed=args.seed)
    batch = max(b for b, _ in args.cases)
    per_seq = -(-(max(c for _, c in args.cases) + 1) // args.block_size)
    cfg = engine_config_from_args(args, max_num_seqs=batch, num_blocks=batch * per_seq + 8)
    runners = {c: ModelRunner(loaded.config, loaded.params,
                              dataclasses.replace(cfg, attention_chunk=c))
               for c in args.chunks}
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, None)
    res = {"model": args.model, "chunks": args.chunks, "cases": {}}
    for b, ctx in args.cases:
        plan = StepPlan(decodes=[DecodeItem(7, ctx - 1, list(range(1 + i * per_seq,
                                                                   1 + (i + 1) * per_seq)), spec)
                                 for i in range(b)])
        times = time_case(runners, plan, args.rounds, 3 if b * ctx > 8000 else 8)
        base = statistics.median(times[args.chunks[0]])
        row = {str(c): {"ms_median": statistics.median(v) * 1e3, "ms_min": min(v) * 1e3,
                        "speedup": base / statistics.median(v)} for c, v in times.items()}
        res["cases"][f"{b}x{ctx}"] = row
        print(f"{b} seqs x {ctx} tokens: " + "  ".join(
            f"chunk {c}: {r['ms_median']:.1f} ms (min {r['ms_min']:.1f}) x{r['speedup']:.2f}"
            for c, r in row.items()), flush=True)
    bench_io.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
