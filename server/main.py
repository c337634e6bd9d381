"""`conserve-jax serve`: the gRPC server process entry point.

`add_arguments(parser)` declares the flags; `run(args)` builds the engine (the real
`conserve_jax.engine.Engine`, or `MockEngine` for `--model mock`), starts a `ServerApp`,
prints `listening on HOST:PORT` (the bound port, so `--port 0` works), and waits for
SIGTERM/SIGINT; then it stops admitting, drains or releases running work, persists batch
state and returns 0. Runs on the main thread (signal handlers need it); logging is
configured by the CLI, not here.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="model name or path; 'mock' selects the deterministic test engine")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one")
    parser.add_argument("--data-dir", default="conserve-data", help="batch database directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--policy", default="conserve", help="scheduling policy")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine running-set bound")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length")
    parser.add_argument("--auth-token-file", default=None,
                        help="one bearer token per line, each its own tenant; enables auth")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    parser.add_argument("--max-online-queue", type=int, default=256,
                        help="online requests in flight before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-batch-size", type=int, default=10000, help="requests per batch")
    parser.add_argument("--batch-in-flight", type=int, default=None,
                        help="batch items inside the engine at once (default 2 x max-num-seqs)")
    parser.add_argument("--default-ttft", type=float, default=None, help="default TTFT objective, s")
    parser.add_argument("--default-tpot", type=float, default=None, help="default TPOT objective, s")
    parser.add_argument("--max-message-mb", type=int, default=64, help="gRPC message size limit")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="seconds to let running work finish on SIGTERM")
    parser.add_argument("--latency-model", default=None,
                        help="latency model file from `conserve-jax profile` (default: profile at start)")
    parser.add_argument("--warmup", action="store_true", help="compile every shape bucket first")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="KV cache size in tokens (default: sized from KV memory)")
    parser.add_argument("--mock-token-delay", type=float, default=0.0,
                        help="with --model mock: seconds per generated token")


def build_engine(args):
    """The engine for `args`, and its max_num_seqs (to bound batch items in flight)."""
    from conserve_jax.config import EngineConfig

    defaults = EngineConfig()
    max_num_seqs = args.max_num_seqs or defaults.max_num_seqs
    max_model_len = args.max_model_len or defaults.max_model_len
    if args.model == "mock":
        from conserve_jax.mock_engine import MockEngine

        return MockEngine(token_delay_s=args.mock_token_delay, max_num_seqs=max_num_seqs,
                          max_model_len=max_model_len), max_num_seqs
    from conserve_jax.engine import Engine  # heavy (JAX); imported only when serving a model

    extra = {name: value for name, value in (
        ("default_ttft_s", args.default_ttft), ("default_tpot_s", args.default_tpot),
        ("latency_model_path", args.latency_model),
        ("kv_cache_tokens", getattr(args, "kv_cache_tokens", None))) if value is not None}
    config = EngineConfig(model=args.model, tp=args.tp, policy=args.policy,
                          max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                          warmup=bool(args.warmup), **extra)
    return Engine(config), max_num_seqs


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def run(args) -> int:
    from server.app import ServerApp, ServerConfig
    from server.auth import read_tokens
    from server.servicer import ServiceOptions
    from conserve_jax.engine_api import SLO

    if (args.tls_cert is None) != (args.tls_key is None):
        log.error("--tls-cert and --tls-key go together")
        return 2
    tokens = None
    if args.auth_token_file:
        try:
            tokens = read_tokens(args.auth_token_file)
        except (OSError, ValueError) as e:
            log.error("cannot use --auth-token-file: %s", e)
            return 2
    try:
        engine, max_num_seqs = build_engine(args)
    except (ImportError, ValueError, OSError) as e:
        log.error("cannot build the engine for --model %s: %s", args.model, e)
        print(f"cannot build the engine for --model {args.model}: {e}", file=sys.stderr)
        return 2
    config = ServerConfig(
        data_dir=args.data_dir, host=args.host, port=args.port, auth_tokens=tokens,
        tls_cert=_read(args.tls_cert) if args.tls_cert else None,
        tls_key=_read(args.tls_key) if args.tls_key else None,
        options=ServiceOptions(max_online_queue=args.max_online_queue,
                               max_batch_size=args.max_batch_size,
                               default_slo=SLO(args.default_ttft, args.default_tpot)),
        batch_in_flight=args.batch_in_flight or 2 * max_num_seqs,
        max_message_bytes=args.max_message_mb << 20, drain_timeout_s=args.drain_timeout)
    try:
        app = ServerApp(engine, config)
        app.start()
    except Exception:
        engine.shutdown()
        raise
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: shutting down", signum)
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    print(f"listening on {app.address}", flush=True)
    while not stop.wait(0.5):
        pass
    app.stop()
    print("stopped", flush=True)
    return 0
