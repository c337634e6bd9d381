"""`conserve-jax loadtest`: replay a trace or a synthetic workload against a server.

`add_arguments(parser)` declares the options; `run(args, client_factory=None) -> int`
runs the test, prints the report table to stdout, and writes `--json` / `--plot` if asked.
`client_factory(target, token, tls_ca)` builds the client (default:
`conserve_jax.entrypoints.client.Client`); tests pass `fake.FakeClient` here. Only `--target` is ever
contacted, and the run ends by itself (see `runner`).

Exit status: 0 when the run completed at least one request (online or offline) or had
nothing to do, 1 when nothing completed (e.g. the server is unreachable), 2 for bad options.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Optional

from conserve_jax.loadtest.adapter import ClientAdapter
from conserve_jax.loadtest.arrivals import synthetic_workload
from conserve_jax.loadtest.report import (PLOT_HINT, build_report, format_table,
                                         plotting_available, write_json, write_plot)
from conserve_jax.loadtest.run_config import RunConfig
from conserve_jax.loadtest.runner import Runner
from conserve_jax.loadtest.trace import load_trace

log = logging.getLogger(__name__)

ClientFactory = Callable[[str, Optional[str], Optional[str]], Any]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Load-test a conserve-jax server with online requests (trace replay or "
                     "a gamma process) and, optionally, offline batches at the same time.")
    g = p.add_argument_group("server")
    g.add_argument("--target", required=True,
                   help="server address HOST:PORT; grpc backend: several replicas as "
                   "HOST:PORT,HOST:PORT or dns:///NAME:PORT (round robin over the healthy ones)")
    g.add_argument("--token", help="auth token (prefer --token-file)")
    g.add_argument("--token-file", help="file whose first non-empty line is the auth token")
    g.add_argument("--tls-ca", help="PEM file of the CA that signed the server certificate")
    g.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="grpc: this server's CoServe API; openai: any OpenAI-compatible HTTP "
                   "server (--target HOST:PORT or a base URL) (default grpc)")
    g.add_argument("--model", help="openai backend: model id (default: the first of /v1/models)")
    g.add_argument("--offline-via", choices=("batch", "flex"), default="batch",
                   help="openai backend: offline load through the Batch API or as "
                   "service_tier=flex requests (default batch)")

    g = p.add_argument_group("trace workload (Azure LLM trace CSV)")
    g.add_argument("--trace", help="CSV with TIMESTAMP, ContextTokens, GeneratedTokens")
    g.add_argument("--trace-start", type=float, default=0.0,
                   help="offset into the trace, in trace seconds (default 0)")
    g.add_argument("--trace-window", type=float, default=None,
                   help="length of the trace slice, in trace seconds (default: all)")
    g.add_argument("--rate-scale", type=float, default=1.0,
                   help="multiply the trace's arrival rate by this (default 1)")
    g.add_argument("--token-scale", type=float, default=1.0,
                   help="multiply prompt and output lengths by this, e.g. 0.125 (default 1)")

    g = p.add_argument_group("synthetic workload (as vLLM's benchmark_serving)")
    g.add_argument("--rate", type=float, help="requests per second (inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape; 1 = Poisson, < 1 burstier (default 1)")
    g.add_argument("--input-len", type=int, default=256, help="prompt tokens (default 256)")
    g.add_argument("--output-len", type=int, default=64, help="output tokens (default 64)")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)] (default 0)")
    g.add_argument("--num-requests", type=int, help="number of requests (default: until --duration)")

    g = p.add_argument_group("both workloads")
    g.add_argument("--max-context", type=int, default=2048,
                   help="clamp prompt + output to this many tokens (default 2048)")
    g.add_argument("--prompt-token-range", type=int, nargs=2, default=(100, 250),
                   metavar=("LOW", "HIGH"), help="synthetic prompt ids in [LOW, HIGH) "
                   "(default 100 250)")
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and prompts")

    g = p.add_argument_group("run")
    g.add_argument("--duration", type=float, help="stop issuing online requests after S seconds")
    g.add_argument("--grace", type=float, default=30.0,
                   help="seconds to wait for in-flight requests after issuing stops (default 30)")
    g.add_argument("--max-concurrency", type=int, default=64,
                   help="online requests in flight at most (default 64)")

    g = p.add_argument_group("offline load")
    g.add_argument("--offline-requests", type=int, default=0,
                   help="offline requests submitted as batches at the start (default 0)")
    g.add_argument("--offline-input-len", type=int, default=128, help="default 128")
    g.add_argument("--offline-output-len", type=int, default=64, help="default 64")
    g.add_argument("--offline-batches", type=int, default=1,
                   help="split the offline requests into this many batches (default 1)")
    g.add_argument("--keep-offline", action="store_true",
                   help="do not cancel unfinished offline batches at the end")

    g = p.add_argument_group("objectives and output")
    g.add_argument("--slo-ttft", type=float, help="TTFT objective in seconds (goodput)")
    g.add_argument("--slo-tpot", type=float, help="TPOT objective in seconds (goodput)")
    g.add_argument("--no-send-slo", action="store_true",
                   help="do not send the objectives with the requests (report only)")
    g.add_argument("--json", metavar="OUT", help="write the JSON report here")
    g.add_argument("--plot", metavar="PNG", help="write latency plots here (needs the bench "
                   "extra: pip install 'conserve-jax[bench]')")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _check(args: argparse.Namespace) -> Optional[str]:
    """An error message for inconsistent options, or None."""
    if args.trace and args.rate is not None:
        return "give either --trace or --rate, not both"
    if args.rate is not None and args.num_requests is None and args.duration is None:
        return "--rate needs --num-requests or --duration"
    if not args.trace and args.rate is None and not args.offline_requests:
        return "nothing to do: give --trace, --rate or --offline-requests"
    if not args.trace and args.rate is None and args.duration is None:
        return "offline-only runs need --duration"
    if args.duration is not None and args.duration <= 0:
        return "--duration must be > 0"
    if args.grace < 0 or args.max_concurrency < 1 or args.offline_requests < 0:
        return "--grace must be >= 0, --max-concurrency >= 1, --offline-requests >= 0"
    if args.offline_batches < 1 or args.offline_input_len < 1 or args.offline_output_len < 1:
        return "--offline-batches, --offline-input-len and --offline-output-len must be >= 1"
    if args.offline_input_len + args.offline_output_len > args.max_context:
        return "--offline-input-len + --offline-output-len exceeds --max-context"
    if args.token and args.token_file:
        return "give either --token or --token-file"
    return None


def _read_token(args: argparse.Namespace) -> Optional[str]:
    if args.token_file:
        with open(args.token_file) as f:
            for line in f:
                if line.strip():
                    return line.strip()
        raise ValueError(f"{args.token_file}: no token in file")
    return args.token


def _workload(args: argparse.Namespace) -> list:
    if args.trace:
        return load_trace(args.trace, start_s=args.trace_start, window_s=args.trace_window,
                          rate_scale=args.rate_scale, token_scale=args.token_scale,
                          max_context=args.max_context)
    if args.rate is not None:
        return synthetic_workload(rate=args.rate, burstiness=args.burstiness,
                                  input_len=args.input_len, output_len=args.output_len,
                                  range_ratio=args.range_ratio, num_requests=args.num_requests,
                                  duration_s=args.duration, max_context=args.max_context,
                                  seed=args.seed)
    return []


def _default_factory(target: str, token: Optional[str], tls_ca: Optional[str]) -> Any:
    from conserve_jax.entrypoints.client import Client
    return Client(target, token=token, tls_ca=tls_ca)


def _openai_factory(args: argparse.Namespace) -> ClientFactory:
    from conserve_jax.loadtest.openai_backend import OpenAIClient
    return lambda target, token, tls_ca: OpenAIClient(
        target, token, tls_ca, model=args.model, offline_via=args.offline_via)


def _config_dict(args: argparse.Namespace, n_online: int) -> dict:
    skip = {"token", "func", "command", "log_level"}
    out = {k: v for k, v in vars(args).items()
           if not k.startswith("_") and k not in skip
           and isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    out["online_requests_in_workload"] = n_online
    return out


def run(args: argparse.Namespace, client_factory: Optional[ClientFactory] = None) -> int:
    """Run the load test described by `args` (see module doc for the exit status)."""
    problem = _check(args)
    if problem:
        print(f"loadtest: {problem}", file=sys.stderr)
        return 2
    try:
        token = _read_token(args)
        workload = _workload(args)
    except (OSError, ValueError) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    if args.trace and not workload and not args.offline_requests:
        print("loadtest: the trace window holds no requests", file=sys.stderr)
        return 2
    log.info("workload: %d online requests over %.1f s", len(workload),
             workload[-1].arrival_s if workload else 0.0)
    config = RunConfig(
        duration_s=args.duration, grace_s=args.grace, max_concurrency=args.max_concurrency,
        slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, send_slo=not args.no_send_slo,
        seed=args.seed, token_range=tuple(args.prompt_token_range),
        offline_requests=args.offline_requests, offline_input_len=args.offline_input_len,
        offline_output_len=args.offline_output_len, offline_batches=args.offline_batches,
        cancel_offline_at_end=not args.keep_offline, progress=not args.no_progress)
    if client_factory is None and getattr(args, "backend", "grpc") == "openai":
        client_factory = _openai_factory(args)
    try:
        client = (client_factory or _default_factory)(args.target, token, args.tls_ca)
    except (ImportError, ValueError) as e:  # a missing extra (aiohttp), a bad --target
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    adapter = ClientAdapter(client)
    try:
        result = Runner(adapter, workload, config).run()
    finally:
        adapter.close()
    report = build_report(result, _config_dict(args, len(workload)), args.slo_ttft, args.slo_tpot)
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
    if args.plot and plotting_available():
        write_plot(report, args.plot)
    elif args.plot:  # the table above is the report; the plot is optional
        print(f"--plot {args.plot} not written: {PLOT_HINT}", file=sys.stderr)
    completed = report["online"]["completed"] + (report["offline"] or {}).get("results_collected", 0)
    nothing_to_do = not workload and not args.offline_requests
    return 0 if completed or nothing_to_do else 1
