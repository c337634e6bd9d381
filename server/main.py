"""`conserve-jax serve`: the gRPC server process entry point.

`add_arguments(parser)` declares the flags; `run(args)` builds the engine (the real
`conserve_jax.engine.Engine`, or `MockEngine` for `--model mock`), starts a `ServerApp`,
prints `listening on HOST:PORT` (the bound port, so `--port 0` works), and waits for
SIGTERM/SIGINT; then it stops admitting, drains or releases running work, persists batch
state and returns 0. Runs on the main thread (signal handlers need it); logging is
configured by the CLI, not here.

Everything that can be checked cheaply is checked before the model loads: the token file,
the TLS pair (parsed with `ssl`), and the batch database (opened and locked; a second
server on the same data dir is refused). A second SIGTERM/SIGINT while draining exits at
once (code 130). If the engine's step loop dies, the server stops and `run` returns
`EXIT_ENGINE_FAILED`, so a supervisor restarts it; batches resume from the database.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import ssl
import sys
import threading

from conserve_jax.engine_args import add_engine_args, engine_config_from_args

EXIT_ENGINE_FAILED = 3
EXIT_FORCED = 130

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
    parser.add_argument("--max-message-mb", type=int, default=16, help="gRPC message size limit")
    parser.add_argument("--retention-days", type=float, default=7.0,
                        help="finished batches (and their results) are deleted after this")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="seconds to let running work finish on SIGTERM")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API and /metrics on this port "
                             "(same host, TLS and tokens; 0 picks a free one; default off)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics alone on this port (default off)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id the HTTP API reports and accepts (default: --model)")
    parser.add_argument("--offline-kv-max-mb", type=int, default=4096,
                        help="on SIGTERM, save unfinished batch items' KV and tokens to "
                             "--data-dir (at most this many MB) so they resume after a "
                             "restart; 0 turns it off")
    parser.add_argument("--mock-token-delay", type=float, default=0.0,
                        help="with --model mock: seconds per generated token")
    parser.add_argument("--mock-fail-after-steps", type=int, default=None,
                        help="with --model mock: fault injection for tests; every step after "
                             "the first N raises, so the engine dies")
    add_engine_args(parser)  # --model (or 'mock': the deterministic test engine), --tp, ...


def build_engine(args):
    """The engine for `args`, and its max_num_seqs (to bound batch items in flight)."""
    if args.model == "mock":
        from conserve_jax.mock_engine import MockEngine

        return MockEngine(token_delay_s=args.mock_token_delay, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len,
                          fail_after_steps=args.mock_fail_after_steps), args.max_num_seqs
    from conserve_jax.engine import Engine  # heavy (JAX); imported only when serving a model

    config = engine_config_from_args(args)
    return Engine(config), config.max_num_seqs


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _fail(msg: str) -> int:
    log.error("%s", msg)
    print(msg, file=sys.stderr)
    return 2


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_tls(cert: str, key: str) -> None:
    """Raise (OSError/ssl.SSLError) unless cert and key are readable, PEM, and match."""
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)


def _warn_about_exposure(args, tokens) -> None:
    if tokens is not None and args.tls_cert is None and not _is_loopback(args.host):
        log.warning("auth is on without TLS on %s: bearer tokens and prompts travel in "
                    "cleartext; pass --tls-cert/--tls-key", args.host)
    if tokens is None and not _is_loopback(args.host):
        log.warning("binding %s without --auth-token-file: anyone who can reach it can use "
                    "the server and read every batch", args.host)


def run(args) -> int:
    from server.app import ServerApp, ServerConfig
    from server.auth import read_tokens
    from server.batch_store import BatchStore, DataDirInUse
    from server.servicer import ServiceOptions
    from conserve_jax.engine_api import SLO

    if (args.tls_cert is None) != (args.tls_key is None):
        return _fail("--tls-cert and --tls-key go together")
    tokens = None
    if args.auth_token_file:
        try:
            tokens = read_tokens(args.auth_token_file)
        except (OSError, ValueError) as e:
            return _fail(f"cannot use --auth-token-file: {e}")
    if args.tls_cert is not None:
        try:
            _check_tls(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            return _fail(f"cannot use --tls-cert/--tls-key: {e}")
    _warn_about_exposure(args, tokens)
    try:  # before the (slow) model load: a bad or busy data dir fails at once
        store = BatchStore(args.data_dir)
    except DataDirInUse as e:
        return _fail(str(e))
    except Exception as e:  # OSError, sqlite3.Error (not a database, unreadable, ...)
        return _fail(f"cannot open the batch database in {args.data_dir}: {e}")
    try:
        engine, max_num_seqs = build_engine(args)
    except (ImportError, ValueError, OSError) as e:
        store.close()
        return _fail(f"cannot build the engine for --model {args.model}: {e}")
    config = ServerConfig(
        data_dir=args.data_dir, host=args.host, port=args.port, auth_tokens=tokens,
        tls_cert=_read(args.tls_cert) if args.tls_cert else None,
        tls_key=_read(args.tls_key) if args.tls_key else None,
        options=ServiceOptions(max_online_queue=args.max_online_queue,
                               max_batch_size=args.max_batch_size,
                               default_slo=SLO(args.default_ttft_s, args.default_tpot_s)),
        batch_in_flight=args.batch_in_flight or 2 * max_num_seqs,
        max_message_bytes=args.max_message_mb << 20, drain_timeout_s=args.drain_timeout,
        retention_s=args.retention_days * 86400.0,
        http_port=args.http_port, metrics_port=args.metrics_port,
        model_name=args.served_model_name or args.model,
        offline_kv_max_bytes=args.offline_kv_max_mb << 20)
    try:
        app = ServerApp(engine, config, store=store)
        app.start()
    except Exception:
        engine.shutdown()
        store.close()
        raise
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():  # a second signal: do not wait for the drain
            print("second signal: exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_FORCED)
        log.info("signal %d: shutting down", signum)
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if app.http_port is not None:
        print(f"http on {args.host}:{app.http_port}", flush=True)
    if app.metrics_port is not None:
        print(f"metrics on {args.host}:{app.metrics_port}", flush=True)
    print(f"listening on {app.address}", flush=True)
    while not stop.wait(0.2):
        if app.engine_dead.is_set():
            break
    dead = app.engine_dead.is_set()
    app.stop()
    if dead:
        print(f"engine failed ({engine.failure}); exiting for a restart", file=sys.stderr, flush=True)
        return EXIT_ENGINE_FAILED
    print("stopped", flush=True)
    return 0
