"""`conserve-jax serve`: the gRPC server process entry point.

`add_arguments(parser)` declares the flags, all generated from dataclass fields (each with
its help text and its one default): the server's from `conserve_server.config.ServerConfig`
(and its `ServiceOptions`), the files read at start from `ServeFiles`, the test engine's
from `MockOptions`, the engine's from `EngineConfig` (`add_engine_args`). `run(args)`
builds the engine (the real
`conserve_jax.engine.Engine`, or `MockEngine` for `--model mock`), starts a `ServerApp`,
prints `listening on HOST:PORT` (the bound port, so `--port 0` works; before it `http on
HOST:PORT` and `metrics on HOST:PORT` for the faces that are on) on stdout, logs one
"ready in N s" line with every address (stderr, INFO), and waits for
SIGTERM/SIGINT; then it stops admitting, drains or releases running work, persists batch
state and returns 0. Runs on the main thread (signal handlers need it); logging is
configured by the CLI, not here.

Everything that can be checked cheaply is checked before the model loads: the token file,
the TLS pair (parsed with `ssl`), and the batch database (opened and locked; a second
server on the same data dir is refused). A second SIGTERM/SIGINT while draining exits at
once (code 130). If the engine's step loop dies, the server stops and `run` returns
`EXIT_ENGINE_FAILED`, so a supervisor restarts it; batches resume from the database (a
multi-process run's process 0 exits with that code after at most `STOP_GRACE_S` of server
shutdown, without jax.distributed's exit barrier, which would wait for a dead or hung
follower and then abort; a hung follower is noticed by the engine's step watchdog).
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
import time
from dataclasses import dataclass
from typing import Optional

from conserve_jax.engine_args import add_dataclass_args, add_engine_args, engine_config_from_args
from conserve_server.config import add_server_args, flag_field, server_config_from_args

EXIT_ENGINE_FAILED = 3
EXIT_FORCED = 130
# a multi-process process 0 whose engine failed stops its server for at most this long
# before it exits (the step watchdog fires at step_timeout_s after a peer hung, JAX's
# heartbeat abort comes at ~0.8 x process_timeout_s: this must fit in between)
STOP_GRACE_S = 1.5

log = logging.getLogger(__name__)


@dataclass
class ServeFiles:
    """Files `run` reads (and checks) before the model loads; their contents become
    `ServerConfig.auth_tokens` / `tls_cert` / `tls_key`."""

    auth_token_file: Optional[str] = flag_field(
        "one bearer token per line, each its own tenant; enables auth", default=None)
    tls_cert: Optional[str] = flag_field("PEM certificate chain file (with --tls-key)",
                                         default=None)
    tls_key: Optional[str] = flag_field("PEM private key file (with --tls-cert)", default=None)


@dataclass
class MockOptions:
    """The deterministic test engine (`--model mock`)."""

    mock_token_delay: float = flag_field("with --model mock: seconds per generated token",
                                         default=0.0)
    mock_fail_after_steps: Optional[int] = flag_field(
        "with --model mock: fault injection for tests; every step after the first N "
        "raises, so the engine dies", default=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_args(parser)
    add_dataclass_args(parser, ServeFiles, "files", "files")
    add_dataclass_args(parser, MockOptions, "mock engine", "mock")
    add_engine_args(parser)  # --model (or 'mock': the deterministic test engine), --tp, ...


def build_engine(args):
    """The engine for `args`, and the `EngineConfig` its flags describe (its max_num_seqs
    bounds batch items in flight, its model names the served model, its default
    objectives are the server's)."""
    config = engine_config_from_args(args)
    if args.model == "mock":
        from conserve_jax.engine.mock_engine import MockEngine

        return MockEngine(token_delay_s=args.mock_token_delay, max_num_seqs=config.max_num_seqs,
                          max_model_len=config.max_model_len, block_size=config.cache.block_size,
                          fail_after_steps=args.mock_fail_after_steps,
                          enable_prefix_caching=config.enable_prefix_caching), config
    from conserve_jax.engine.engine import Engine  # heavy (JAX); imported only when serving a model
    from conserve_jax.engine.startup import StartupProgress

    # progress bars on stderr whenever the start-up lines show (INFO, the CLI's default)
    bars = logging.getLogger("conserve_jax.startup").isEnabledFor(logging.INFO)
    return Engine(config, startup=StartupProgress(bars=bars)), config


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


def _addresses(app) -> list[str]:
    """Where the started `app` answers, for the ready line."""
    c = app.config
    scheme = "https" if c.tls_cert is not None else "http"
    host = f"[{c.host}]" if ":" in c.host else c.host
    out = [f"gRPC on {app.address}"]
    if app.http_port is not None:
        out.append(f"OpenAI-compatible HTTP on {scheme}://{host}:{app.http_port}/v1")
    if app.metrics_port is not None:
        out.append(f"metrics on {scheme}://{host}:{app.metrics_port}/metrics")
    return out


def _follow(args) -> Optional[int]:
    """On a follower process of a multi-process run (`--num-processes`, `--process-id` > 0):
    no faces, no batch store; run process 0's step plans until it shuts down and return the
    exit code (runtime/follower.py). None on process 0 or a single process. Refused at
    start-up (flags, devices, code differ): 2. The run broken while following (process 0
    vanished, a collective failed): exits at once with EXIT_ENGINE_FAILED, without
    jax.distributed's exit barrier (it would wait for the missing process, then abort)."""
    if args.model == "mock" or args.num_processes <= 1:
        return None
    from conserve_jax.runtime.follower import follow_if_follower

    try:
        return follow_if_follower(engine_config_from_args(args))
    except ValueError as e:
        return _fail(f"cannot follow process 0: {e}")
    except Exception as e:
        log.critical("following process 0 failed", exc_info=True)
        print(f"following process 0 failed ({type(e).__name__}: {e}); exiting for a restart",
              file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_ENGINE_FAILED)


def _exit_engine_failed(app, engine) -> None:
    """Process 0 of a multi-process run whose engine failed: exit with EXIT_ENGINE_FAILED
    now, without jax.distributed's exit barrier (it would wait for a dead or hung peer, then
    abort) and without waiting for the step thread, which may be stuck for good in a
    collective with a hung peer (runtime/step_watchdog.py). Health is NOT_SERVING and the
    open streams have their error already; the server stops on a helper thread for at most
    `STOP_GRACE_S` so that those last messages leave, then the process ends."""
    print(f"engine failed ({engine.failure}); exiting for a restart", file=sys.stderr, flush=True)
    log.info("stopping the server for at most %.1f s, then exiting", STOP_GRACE_S)
    drain = min(app.config.drain_timeout, 0.5)
    t = threading.Thread(target=app.stop, args=(drain,), name="stop-failed", daemon=True)
    t.start()
    t.join(STOP_GRACE_S)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(EXIT_ENGINE_FAILED)


def run(args) -> int:
    started = time.monotonic()
    code = _follow(args)
    if code is not None:
        return code
    from conserve_server.app import ServerApp
    from conserve_server.auth import read_tokens
    from conserve_server.batch.store import DataDirInUse, open_store, redact_url

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
    config = server_config_from_args(
        args, auth_tokens=tokens, tls_cert=_read(args.tls_cert) if args.tls_cert else None,
        tls_key=_read(args.tls_key) if args.tls_key else None)
    if config.stats_interval is not None and config.stats_interval < 0:
        return _fail(f"--stats-interval must be >= 0 seconds (0: off), got {config.stats_interval}")
    try:  # before the (slow) model load: a bad or busy data dir fails at once
        store = open_store(config.batch_store, config.data_dir,
                           busy_timeout_s=config.busy_timeout_s, replica_id=config.replica_id,
                           lease_s=config.lease_s)
    except (DataDirInUse, ValueError) as e:
        return _fail(str(e))
    except Exception as e:  # OSError, sqlite3.Error, psycopg errors (unreachable, ...)
        where = redact_url(config.batch_store) if config.batch_store else config.data_dir
        return _fail(f"cannot open the batch database in {where}: {e}")
    try:
        engine, engine_config = build_engine(args)
    except (ImportError, ValueError, OSError) as e:
        store.close()
        return _fail(f"cannot build the engine for --model {args.model}: {e}")
    try:
        app = ServerApp(engine, config, store=store, engine_config=engine_config)
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
        print(f"http on {config.host}:{app.http_port}", flush=True)
    if app.metrics_port is not None:
        print(f"metrics on {config.host}:{app.metrics_port}", flush=True)
    print(f"listening on {app.address}", flush=True)
    log.info("ready in %.1f s: %s", time.monotonic() - started, ", ".join(_addresses(app)))
    stats_log = None
    if config.stats_interval:
        from conserve_server.stats_log import StatsLog

        stats_log = StatsLog(engine.stats, config.stats_interval).start()
    while not stop.wait(0.2):
        if app.engine_dead.is_set():
            break
    dead = app.engine_dead.is_set()
    if stats_log is not None:
        stats_log.stop()
    if dead and args.num_processes > 1:
        _exit_engine_failed(app, engine)
    app.stop()
    if dead:
        print(f"engine failed ({engine.failure}); exiting for a restart", file=sys.stderr, flush=True)
        return EXIT_ENGINE_FAILED
    print("stopped", flush=True)
    return 0
