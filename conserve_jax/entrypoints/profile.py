"""`conserve-jax profile`: fit the iteration latency model for a model on this machine
and write it to a JSON file the engine loads with --latency-model-path."""
from __future__ import annotations

import argparse
import json

from conserve_jax.engine_args import add_engine_args, engine_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="fewer sweep points")
    add_engine_args(p)


def run(args) -> int:
    from conserve_jax.models.loader import load_model
    from conserve_jax.runtime.compile_cache import enable_compilation_cache
    from conserve_jax.runtime.model_runner import ModelRunner
    from conserve_jax.scheduling.latency_model import LatencyModel
    from conserve_jax.scheduling.profiler import profile

    cfg = engine_config_from_args(args)
    enable_compilation_cache(cfg.compilation_cache_dir)
    loaded = load_model(cfg.model, seed=cfg.seed)
    runner = ModelRunner(loaded.config, loaded.params, cfg)
    samples = profile(runner, quick=args.quick)
    model = LatencyModel.fit(samples, runner.buckets, runner.block_size, loaded.config.num_layers)
    model.save(args.out)
    print(f"{len(samples)} iterations profiled; coefficients "
          + ", ".join(f"{n}={c:.3g}" for n, c in zip(model.to_json()["features"], model.coef)))
    print("held-out relative error: " + json.dumps(model.fit_error))
    print(f"wrote {args.out}")
    return 0
