"""`ServerApp`: wires an engine, the batch store and runner, the CoServe servicer, health
and reflection into one gRPC server, and shuts it all down in order.

Used by `server.main.run` and, in-process, by tests. `start` and `stop` are called by one
controlling thread (the main thread in the CLI); everything else runs on gRPC worker
threads, the batch-runner thread and the engine's own thread.

Shutdown order (`stop`): health NOT_SERVING; the gRPC server refuses new calls and gives
open ones the drain timeout; meanwhile the batch runner stops claiming, lets in-flight
items finish within the same timeout and releases the rest (they run again after a
restart); then the engine shuts down and the store closes. Every committed result is
already on disk.
"""
from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass, field
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2_grpc as pb_grpc
from server.auth import Authenticator
from server.batch_runner import BatchRunner
from server.batch_store import BatchStore
from server.metrics import ObservedEngine, ServerMetrics, serve_metrics
from server.servicer import CoServeServicer, ServiceOptions

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CoServe"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


@dataclass
class ServerConfig:
    data_dir: str
    host: str = "127.0.0.1"
    port: int = 0
    auth_tokens: Optional[list[str]] = None  # None: auth off
    tls_cert: Optional[bytes] = None  # PEM; with tls_key turns TLS on
    tls_key: Optional[bytes] = None
    options: ServiceOptions = field(default_factory=ServiceOptions)
    batch_in_flight: int = 64  # batch items inside the engine at once
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_timeout_s: float = 5.0
    http_port: Optional[int] = None  # OpenAI-compatible HTTP front (+ /metrics); None: off
    metrics_port: Optional[int] = None  # Prometheus /metrics alone; None: off
    model_name: str = "default"  # the model id the HTTP front serves


class ServerApp:
    def __init__(self, engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.port: Optional[int] = None
        self.http_port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        # one set of counters for GetServerStats and /metrics; faces use the observed engine
        self.metrics = ServerMetrics(engine, config.options.max_online_queue,
                                     config.options.default_slo)
        observed = ObservedEngine(engine, self.metrics)
        self.store = BatchStore(config.data_dir)
        self.runner = BatchRunner(self.store, observed, config.batch_in_flight)
        self.metrics.attach(self.store, self.runner)
        auth = Authenticator(config.auth_tokens) if config.auth_tokens is not None else None
        self.servicer = CoServeServicer(observed, self.store, self.runner, auth, config.options,
                                        metrics=self.metrics)
        self.http = None
        if config.http_port is not None:
            from server.openai_api.front import HttpFront  # imported only when the front is on
            self.http = HttpFront(observed, self.store, self.runner, auth, self.metrics, config)
        self._metrics_server = None
        self.health = health.HealthServicer()
        workers = config.options.max_online_queue + 32  # each open stream holds a worker
        limit = config.max_message_bytes
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=workers,
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        pb_grpc.add_CoServeServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._stopped = False

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> int:
        """Bind, start serving and the batch runner; returns the bound port."""
        c = self.config
        bind = f"[{c.host}]:{c.port}" if ":" in c.host else f"{c.host}:{c.port}"
        if c.tls_cert is not None and c.tls_key is not None:
            creds = grpc.ssl_server_credentials([(c.tls_key, c.tls_cert)])
            self.port = self.server.add_secure_port(bind, creds)
        else:
            self.port = self.server.add_insecure_port(bind)
        if not self.port:
            raise RuntimeError(f"could not bind {bind}")
        self.server.start()
        self.runner.start()
        if self.http is not None:
            self.http_port = self.http.start()
        if c.metrics_port is not None:
            self._metrics_server, self.metrics_port = serve_metrics(
                self.metrics, c.host, c.metrics_port, c.tls_cert, c.tls_key)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s (tls=%s, auth=%s)", self.address, c.tls_cert is not None,
                 c.auth_tokens is not None)
        return self.port

    def stop(self, drain_timeout_s: Optional[float] = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.health.enter_graceful_shutdown()
        self.servicer.admitting = False
        if self.http is not None:
            self.http.admitting = False
        stopped = self.server.stop(grace)  # refuses new calls now; open ones get `grace`
        self.runner.stop(grace)
        stopped.wait(grace + 1.0)
        if self.http is not None:
            self.http.stop(grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        try:
            self.engine.shutdown(drain_timeout_s=0.0)
        except Exception:
            log.exception("engine shutdown failed")
        self.store.close()
        log.info("server stopped; batch state persisted in %s", self.store.path)
