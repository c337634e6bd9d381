"""`conserve-jax` command line: generate, serve, profile, loadtest.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`run(args) -> int`; this file only dispatches and configures logging (the entry point's
job, never done at import).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from absl import logging as absl_logging

SUBCOMMANDS = {
    "generate": ("conserve_jax.entrypoints.generate", "generate text for a prompt with a local model"),
    "serve": ("conserve_server.main", "serve a model: gRPC on :50051 and the OpenAI-compatible "
              "HTTP API on :8000 (--http-port 0 turns HTTP off)"),
    "run-batch": ("conserve_server.run_batch", "run an OpenAI batch input file (JSONL) through "
                  "a local engine, without a server (vLLM's run-batch)"),
    "profile": ("conserve_jax.entrypoints.profile", "fit the iteration latency model"),
    "loadtest": ("conserve_jax.loadtest.cli", "load-test a running server"),
    "demo": ("conserve_jax.entrypoints.demo", "serve the default model and show it working end to end"),
}

OWN_LOGGERS = ("conserve_jax", "conserve_server")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conserve-jax")
    parser.add_argument("--log-level", default="INFO",
                        help="level of conserve-jax's own log lines on stderr (default INFO: "
                             "start-up stages with progress bars, the ready line, stats "
                             "lines; warning quiets them)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: INFO also for libraries (jax, ...), -vv: DEBUG, also for "
                             "libraries that log through absl (orbax)")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:  # a subcommand whose module is missing should not break the rest
            p.set_defaults(_missing=f"{name} is unavailable: {e}")
            continue
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    level = logging.getLevelName(str(args.log_level).upper())
    if not isinstance(level, int):
        parser.error(f"--log-level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got "
                     f"{args.log_level!r}")
    if args.verbose:
        level = min(level, logging.INFO if args.verbose == 1 else logging.DEBUG)
    # our own loggers at `level`; libraries (jax, httpx, ...) only warn unless -v
    lib_level = level if args.verbose else max(level, logging.WARNING)
    logging.basicConfig(level=lib_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for own in OWN_LOGGERS:
        logging.getLogger(own).setLevel(level)
    # libraries that log through absl (orbax: dozens of INFO lines per checkpoint) speak
    # from -vv on
    absl_level = level if args.verbose >= 2 else max(level, logging.WARNING)
    absl_logging.set_verbosity(logging.getLevelName(absl_level).lower())
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
