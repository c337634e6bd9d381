"""`conserve-jax profile`: fit the iteration latency model for a model on this machine
and write it to a JSON file the engine loads with --latency-model."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="fewer sweep points")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-prefill-tokens", type=int, default=512)


def run(args) -> int:
    from conserve_jax.config import EngineConfig
    from conserve_jax.models.loader import load_model
    from conserve_jax.runtime.compile_cache import enable_compilation_cache
    from conserve_jax.runtime.model_runner import ModelRunner
    from conserve_jax.scheduling.latency_model import LatencyModel
    from conserve_jax.scheduling.profiler import profile

    cfg = EngineConfig(model=args.model, tp=args.tp, dtype=args.dtype,
                       max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       max_prefill_tokens=args.max_prefill_tokens)
    enable_compilation_cache(cfg.compilation_cache_dir)
    loaded = load_model(args.model)
    runner = ModelRunner(loaded.config, loaded.params, cfg)
    samples = profile(runner, quick=args.quick)
    model = LatencyModel.fit(samples, runner.buckets, runner.block_size, loaded.config.num_layers)
    model.save(args.out)
    print(f"{len(samples)} iterations profiled; coefficients "
          + ", ".join(f"{n}={c:.3g}" for n, c in zip(model.to_json()["features"], model.coef)))
    print("held-out relative error: " + json.dumps(model.fit_error))
    print(f"wrote {args.out}")
    return 0
