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

from conserve_jax.engine_args import add_engine_args, engine_config_from_args

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one")
    parser.add_argument("--data-dir", default="conserve-data", help="batch database directory")
    parser.add_argument("--auth-token-file", default=None,
                        help="one bearer token per line, each its own tenant; enables auth")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    parser.add_argument("--max-online-queue", type=int, default=256,
                        help="online requests in flight before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-batch-size", type=int, default=10000, help="requests per batch")
    parser.add_argument("--batch-in-flight", type=int, default=None,
                        help="batch items inside the engine at once (default 2 x max-num-seqs)")
    parser.add_argument("--max-message-mb", type=int, default=64, help="gRPC message size limit")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="seconds to let running work finish on SIGTERM")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API and /metrics on this port "
                             "(same host, TLS and tokens; 0 picks a free one; default off)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics alone on this port (default off)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id the HTTP API reports and accepts (default: --model)")
    parser.add_argument("--mock-token-delay", type=float, default=0.0,
                        help="with --model mock: seconds per generated token")
    add_engine_args(parser)  # --model (or 'mock': the deterministic test engine), --tp, ...


def build_engine(args):
    """The engine for `args`, and its max_num_seqs (to bound batch items in flight)."""
    if args.model == "mock":
        from conserve_jax.mock_engine import MockEngine

        return MockEngine(token_delay_s=args.mock_token_delay, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len), args.max_num_seqs
    from conserve_jax.engine import Engine  # heavy (JAX); imported only when serving a model

    config = engine_config_from_args(args)
    return Engine(config), config.max_num_seqs


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
                               default_slo=SLO(args.default_ttft_s, args.default_tpot_s)),
        batch_in_flight=args.batch_in_flight or 2 * max_num_seqs,
        max_message_bytes=args.max_message_mb << 20, drain_timeout_s=args.drain_timeout,
        http_port=args.http_port, metrics_port=args.metrics_port,
        model_name=args.served_model_name or args.model)
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
    if app.http_port is not None:
        print(f"http on {args.host}:{app.http_port}", flush=True)
    if app.metrics_port is not None:
        print(f"metrics on {args.host}:{app.metrics_port}", flush=True)
    print(f"listening on {app.address}", flush=True)
    while not stop.wait(0.5):
        pass
    app.stop()
    print("stopped", flush=True)
    return 0
