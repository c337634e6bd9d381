"""Where the engine gets its latency model: a file from `conserve-jax profile`, or a quick
profiling sweep at start-up, remembered on disk per model shape, buckets and machine so
that later starts skip it. Called once by the engine constructor."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from typing import Callable, Optional

import jax

import conserve_jax.models.attention as attention
import conserve_jax.models.llama as llama
import conserve_jax.scheduling.latency_model as latency_model
from conserve_jax.config import EngineConfig
from conserve_jax.scheduling.latency_model import LatencyModel

log = logging.getLogger(__name__)


def _code_fingerprint(runner) -> str:
    """Hash of the source of the code that sets iteration times (the runner's module and
    the model's, its attention and the latency model's features), so that a changed
    engine re-profiles instead of trusting old timings."""
    h = hashlib.sha256()
    for mod in (inspect.getmodule(type(runner)), llama, attention, latency_model):
        try:
            h.update(inspect.getsource(mod).encode())
        except (OSError, TypeError):
            h.update(repr(mod).encode())
    return h.hexdigest()[:16]


def _cache_path(runner, cfg: EngineConfig) -> str:
    key = json.dumps({"model": repr(runner.cfg), "dtype": str(runner.dtype),
                      "weight_dtype": str(runner.weight_dtype), "tp": cfg.tp,
                      "pp": cfg.pp, "processes": cfg.num_processes,
                      "buckets": repr(runner.buckets), "block": runner.block_size,
                      "layers_per_call": runner.layers_per_call,
                      "code": _code_fingerprint(runner),
                      "backend": jax.default_backend(), "cpus": os.cpu_count(),
                      "jax": jax.__version__}, sort_keys=True)
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    base = cfg.compilation_cache_dir or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "conserve-jax")
    return os.path.join(base, "latency", f"{h}.json")


def load_or_profile(runner, cfg: EngineConfig,
                    progress: Optional[Callable[[int, int], None]] = None) -> LatencyModel:
    """The latency model of `cfg.latency_model_path`, else the cached one for this runner,
    else a quick profiling sweep (`progress(done, total)` follows its points), saved."""
    args = (runner.buckets, runner.block_size, runner.cfg.num_layers)
    if cfg.latency_model_path:
        return LatencyModel.load(cfg.latency_model_path, *args)
    path = _cache_path(runner, cfg)
    if os.path.exists(path):
        try:
            return LatencyModel.load(path, *args)
        except (ValueError, KeyError, json.JSONDecodeError):
            log.warning("ignoring unreadable latency model cache %s", path)
    from conserve_jax.scheduling.profiler import profile_and_fit

    log.info("no latency model given: profiling (quick sweep)")
    model = profile_and_fit(runner, quick=True, progress=progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.save(path)
    return model
