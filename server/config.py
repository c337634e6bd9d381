"""Server settings: `ServerConfig` (the process: addresses, timeouts, stream caps, where
batch state lives) and its group `ServiceOptions` (the limits and defaults both faces,
gRPC and HTTP, enforce: one type, one instance per server).

Each setting is a dataclass field carrying its help text and its one default; the
`serve` command's flags are generated from these fields (`add_server_args`,
`server_config_from_args`, through `conserve_jax.engine_args.add_dataclass_args`), one
flag per field with the field's name and units: `drain_timeout` is `--drain-timeout`
(seconds), `offline_kv_max_mb` is `--offline-kv-max-mb` (MB). Fields marked plain are
not flags: the token list and PEM bytes (`server.main` reads them from the files its own
flags name) and the server-side logprobs cap.

Defaults that depend on the engine are None here and filled in one place,
`resolve(config, engine_config)`, which `ServerApp` calls: batch items in flight
(2 x the engine's max_num_seqs), the served model name (the engine's --model) and the
default latency objectives (the engine's --default-ttft-s / --default-tpot-s, so requests
are judged and scheduled against the same objectives).

Plain data: built on the main thread before the server starts, read-only afterwards.
Imports neither gRPC nor the HTTP stack, so the CLI declares flags without loading them.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from conserve_jax.config import EngineConfig
from conserve_jax.engine_api import SLO
from conserve_jax.engine_args import add_dataclass_args, build_dataclass, dataclass_values

_KEY = "server"


def flag_field(help_text: str, parse=None, **kw):
    """A dataclass field that is a `serve` flag with this help text; `parse` (text ->
    value) replaces the flag's default converter."""
    meta = {"help": help_text}
    if parse is not None:
        meta["parse"] = parse
    return field(metadata=meta, **kw)


def parse_http_port(text: str) -> Optional[int]:
    """`--http-port`'s value: 0, none or off -> None (HTTP off); free -> 0 (a free port,
    chosen at bind); otherwise a port number 1-65535 (ArgumentTypeError otherwise)."""
    t = text.strip().lower()
    if t in ("0", "none", "off", ""):
        return None
    if t == "free":
        return 0
    try:
        port = int(t)
    except ValueError:
        port = -1
    if not 0 < port < 65536:  # argparse prints the message after the flag's name
        raise argparse.ArgumentTypeError(
            f"expected a port number, 0 or none (HTTP off) or free, got {text!r}")
    return port


def plain_field(why: str, **kw):
    """A dataclass field that is not a flag (`why` says where its value comes from)."""
    return field(metadata={"plain": why}, **kw)


@dataclass
class ServiceOptions:
    """What both faces enforce and fill in. `conserve_server.admission.Admission` applies
    the online/flex limits and the default SLO; the faces read the rest."""

    max_online_queue: int = flag_field(
        "online requests in flight from every face (gRPC Generate, HTTP chat/completions) "
        "before RESOURCE_EXHAUSTED / HTTP 429", default=256)
    max_online_per_tenant: Optional[int] = flag_field(
        "one tenant's share of --max-online-queue (none: half of it when "
        "--auth-token-file has several tenants, all of it otherwise)", default=None)
    max_flex_in_flight: int = flag_field(
        "HTTP service_tier=flex requests (offline class) held open at once: a limit of "
        "their own; they never take an online slot", default=256)
    max_batch_size: int = flag_field("requests per batch", default=10000)
    max_tenant_items: int = flag_field("unfinished batch items one tenant may have stored",
                                       default=200_000)
    max_message_mb: float = flag_field(
        "gRPC message size limit in MB; also the HTTP request body and file upload limit",
        default=16)
    max_result_streams: int = flag_field("open StreamBatchResults calls, all tenants",
                                         default=64)
    max_result_streams_per_tenant: int = flag_field("open StreamBatchResults calls of one tenant",
                                                    default=8)
    share_prefix_cache_across_tenants: bool = flag_field(
        "let every tenant's requests (and batch items) reuse the cached KV of prompt prefixes "
        "other tenants computed; off: each tenant's requests share cached KV only with that "
        "tenant's own (the prefix cache salt is the tenant), so no tenant can learn from "
        "cache timing what another sent. Without --auth-token-file there are no tenants and "
        "all requests share", default=False)
    max_logprobs: int = plain_field(
        "the server's cap on logprobs, checked before tokenizing (the engine checks its "
        "own --max-logprobs)", default=20)
    default_slo: Optional[SLO] = plain_field(
        "objectives of requests that give none; None: the engine's --default-ttft-s / "
        "--default-tpot-s (filled by `resolve`)", default=None)

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * (1 << 20))

    def cache_salt(self, tenant: Optional[str]) -> Optional[str]:
        """The prefix-cache salt of a tenant's requests (`GenerationRequest.cache_salt`):
        the tenant id, so tenants never share cached KV, unless
        `share_prefix_cache_across_tenants`; None without a tenant (auth off; a batch
        stored without auth has tenant "")."""
        if self.share_prefix_cache_across_tenants or not tenant:
            return None
        return tenant


@dataclass(frozen=True)
class DeadlineOptions:
    """Completion windows of offline batches (issue 27; `conserve_server.batch.deadlines`):
    the harvest-rate meter, the at-risk threshold, and whether a batch predicted to miss
    its window is refused at submission or accepted to expire."""

    accept_infeasible: bool = flag_field(
        "accept a batch even when it is predicted to miss its completion window (it then "
        "expires at the deadline, as OpenAI's do); default: refuse it up front with gRPC "
        "RESOURCE_EXHAUSTED / HTTP 429 resource_unavailable naming the estimate",
        default=False)
    harvest_window_s: float = flag_field(
        "seconds of recent offline progress the harvest rate (offline work per wall second "
        "while offline work waits) is measured over", default=120.0)
    harvest_min_history_s: float = flag_field(
        "backlogged seconds the meter needs before it estimates anything; until then no "
        "estimate is given and every batch is accepted", default=5.0)
    at_risk_margin: float = flag_field(
        "a batch is at risk when its slack (deadline - estimated finish) is below this "
        "fraction of the time it still needs (or negative)", default=0.2)
    deadline_order: bool = flag_field(
        "serve at-risk batches' items first (claimed first, urgent in the engine); off: "
        "claim by deadline alone, the order before deadlines were tracked (for comparison)",
        default=True)
    flex_max_wait_s: Optional[float] = flag_field(
        "an HTTP service_tier=flex request that has not started (no first token) within "
        "this many seconds is cancelled with HTTP 429 resource_unavailable, OpenAI's flex "
        "contract (none: it waits as long as it takes)", default=600.0)

    def __post_init__(self) -> None:
        if not self.harvest_window_s > 0:
            raise ValueError(f"harvest_window_s must be > 0, got {self.harvest_window_s}")
        if not 0 <= self.harvest_min_history_s <= self.harvest_window_s:
            raise ValueError("harvest_min_history_s must be in [0, harvest_window_s], got "
                             f"{self.harvest_min_history_s}")
        if not self.at_risk_margin >= 0:
            raise ValueError(f"at_risk_margin must be >= 0, got {self.at_risk_margin}")
        if self.flex_max_wait_s is not None and not self.flex_max_wait_s > 0:
            raise ValueError(f"flex_max_wait_s must be > 0 or none, got {self.flex_max_wait_s}")


@dataclass
class ServerConfig:
    """Everything `ServerApp` is configured with (see the module docstring)."""

    host: str = flag_field("bind address (gRPC, HTTP and metrics)", default="127.0.0.1")
    port: int = flag_field("gRPC port; 0 picks a free one", default=50051)
    data_dir: str = flag_field("batch database directory (also uploaded files and saved "
                               "offline KV)", default="conserve-data")
    batch_store: Optional[str] = flag_field(
        "batch store URL: sqlite:///DIR (one server) or postgresql://user@host:port/db "
        "(a fleet of replicas sharing one queue; needs the postgres extra); none: sqlite "
        "in --data-dir", default=None)
    lease_s: float = flag_field(
        "PostgreSQL store: seconds a claimed batch item stays leased to this replica without "
        "a heartbeat (renewed every third of it); after that another replica may run it",
        default=30.0)
    replica_id: Optional[str] = flag_field(
        "PostgreSQL store: this replica's name in item leases (none: host-pid-random)",
        default=None)
    http_port: Optional[int] = flag_field(
        "port of the OpenAI-compatible HTTP API and /metrics (same host, TLS and tokens as "
        "gRPC); 0 or none: HTTP off; free: a free port, printed as `http on HOST:PORT`",
        parse=parse_http_port, default=8000)  # the field: None off, 0 a free port
    metrics_port: Optional[int] = flag_field(
        "serve Prometheus /metrics alone on this port (none: off)", default=None)
    served_model_name: Optional[str] = flag_field(
        "model id the HTTP API reports and accepts (none: --model)", default=None)
    batch_in_flight: Optional[int] = flag_field(
        "batch items inside the engine at once (none or 0: 2 x --max-num-seqs)", default=None)
    retention_days: float = flag_field(
        "finished batches (and their results) are deleted after this many days", default=7.0)
    drain_timeout: float = flag_field("seconds to let running work finish on SIGTERM",
                                      default=10.0)
    stats_interval: Optional[float] = flag_field(
        "seconds between the stats lines logged while busy (running/waiting by class, "
        "tokens/s, KV usage, preemptions, offline harvest; INFO on stderr; 0 or none: off)",
        default=10.0)
    offline_kv_max_mb: int = flag_field(
        "on SIGTERM, save unfinished batch items' KV and tokens to --data-dir (at most this "
        "many MB) so they resume after a restart; 0 turns it off", default=4096)
    busy_timeout_s: float = flag_field(
        "seconds to wait for a batch-database lock held by another process", default=5.0)
    max_reflection_streams: int = flag_field("open gRPC reflection streams", default=8)
    max_health_watches: int = flag_field("open grpc.health.v1 Watch streams", default=16)
    unary_workers: int = flag_field(
        "gRPC worker threads left for unary calls when every stream cap is full", default=32)
    keepalive_time_s: float = flag_field("ping idle-looking gRPC connections after this many "
                                         "seconds; drop dead peers", default=60.0)
    keepalive_timeout_s: float = flag_field("seconds to wait for a keepalive ping's answer",
                                            default=20.0)
    max_connection_idle_s: float = flag_field("close gRPC connections idle this many seconds",
                                              default=300.0)
    max_connection_age_s: float = flag_field(
        "send GOAWAY to gRPC connections older than this many seconds", default=3600.0)
    max_connection_age_grace_s: float = flag_field(
        "seconds open calls get after that GOAWAY", default=600.0)
    options: ServiceOptions = field(default_factory=ServiceOptions)
    deadlines: DeadlineOptions = field(default_factory=DeadlineOptions)
    auth_tokens: Optional[list[str]] = plain_field(
        "bearer tokens, each its own tenant (main reads --auth-token-file); None: auth off",
        default=None)
    tls_cert: Optional[bytes] = plain_field(
        "PEM certificate chain (main reads --tls-cert); with tls_key turns TLS on", default=None)
    tls_key: Optional[bytes] = plain_field("PEM private key (main reads --tls-key)", default=None)

    @property
    def retention_s(self) -> float:
        return self.retention_days * 86400.0

    @property
    def offline_kv_max_bytes(self) -> int:
        return self.offline_kv_max_mb << 20


def resolve(config: ServerConfig, engine: EngineConfig) -> ServerConfig:
    """A copy of `config` with the engine-dependent defaults filled in (the one place
    they are): `batch_in_flight` None (or 0) -> 2 x `engine.max_num_seqs`,
    `served_model_name` None -> `engine.model`, `options.default_slo` None -> the engine's
    default objectives."""
    o = config.options
    slo = o.default_slo if o.default_slo is not None else SLO(engine.default_ttft_s,
                                                              engine.default_tpot_s)
    return dataclasses.replace(
        config, batch_in_flight=config.batch_in_flight or 2 * engine.max_num_seqs,
        served_model_name=config.served_model_name or engine.model,
        options=dataclasses.replace(o, default_slo=slo))


def add_server_args(parser: argparse.ArgumentParser) -> list[str]:
    """Declare a flag for every non-plain field of `ServerConfig` and `ServiceOptions`."""
    return add_dataclass_args(parser, ServerConfig, "server", _KEY)


def server_config_from_args(args: argparse.Namespace, **plain) -> ServerConfig:
    """The `ServerConfig` the `add_server_args` flags in `args` describe; `plain` gives
    the plain fields (auth_tokens, tls_cert, tls_key)."""
    return build_dataclass(ServerConfig, {**dataclass_values(args, _KEY), **plain})
