"""Input and output shared by the benchmarks: engine flags checked when parsed, and the
result JSON written where the benchmark's --json / --out flag says.

Called by the benchmark modules of conserve_jax/bench/ and the scripts in scripts/
(soak.py, bench_http_vs_grpc.py, bench_offline_restart.py), from their main thread; holds
no state. Imports only the configuration modules (no JAX).
"""
from __future__ import annotations

import argparse
import json
import os

from conserve_jax.config import EngineConfig
from conserve_jax.engine_args import engine_config_from_args


def checked_engine_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                          **overrides) -> EngineConfig:
    """`engine_config_from_args(args, **overrides)`; a value EngineConfig rejects (an
    isolation below 1, a safepoint interval of 0, ...) becomes the parser's usage error,
    which names the field, instead of a traceback later."""
    try:
        return engine_config_from_args(args, **overrides)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
        raise  # parser.error exits; this is for type checkers


def parse_checked(parser: argparse.ArgumentParser, argv=None, **overrides) -> argparse.Namespace:
    """Parse `argv` and check the engine flags (see checked_engine_config)."""
    args = parser.parse_args(argv)
    checked_engine_config(parser, args, **overrides)
    return args


def write_json(path: str, data, indent: int = 2, announce: bool = True) -> str:
    """Create `path`'s directory, write `data` there as JSON (`indent`), print
    `wrote <path>` unless `announce` is False; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=indent)
    if announce:
        print(f"wrote {path}", flush=True)
    return path
