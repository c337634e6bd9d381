"""`ServerApp`: wires an engine, the batch store and runner, the CoServe servicer, health
and reflection into one gRPC server, and shuts it all down in order.

Used by `server.main.run` and, in-process, by tests. `start` and `stop` are called by one
controlling thread (the main thread in the CLI); everything else runs on gRPC worker
threads, the HTTP front's thread, the batch-runner thread and the engine's own thread.

Configuration: a `ServerConfig` (`conserve_server.config`, where every setting and its
default is written once, and the `serve` flags come from) plus the `EngineConfig` the
engine was built with; the constructor fills the engine-dependent defaults
(`config.resolve`) and keeps the result as `self.config`. One `Admission` (online slots,
tenant shares, flex limit, default objectives) serves both faces; `ServerMetrics` reads it.

Shutdown order (`stop`): health NOT_SERVING; the gRPC server and the HTTP front (when on) refuse
new calls and give open ones the drain timeout; meanwhile the batch runner stops claiming, lets in-flight
items finish within the same timeout, saves the engine state of the rest (at most
`offline_kv_max_mb`; `server/batch/offline_resume.py`) and releases them (they run again
after a restart, resuming from the saved state); then the engine shuts down and the store
closes. Every committed result is
already on disk.

Resources: each open stream holds a gRPC worker thread, so every streaming RPC kind has
its own cap (Generate: the online queue; StreamBatchResults, Health.Watch, reflection:
`StreamLimiter`s) and the pool is sized for all caps plus `unary_workers`; idle and
over-age connections are closed (keepalive options below).

Engine death: a monitor thread (`_watch_engine`) sees `engine.failure`, turns health
NOT_SERVING and sets `engine_dead`; the servicer already refuses new work (UNAVAILABLE)
and open streams have ended with "engine stopped". The CLI then stops the server and
exits non-zero so a supervisor restarts it; batches resume from the database.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2_grpc

from conserve_jax.config import EngineConfig
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.admission import Admission
from conserve_server.auth import Authenticator
from conserve_server.batch.deadline_inputs import borrow_gain_of, engine_work_cost
from conserve_server.batch.deadlines import DeadlineTracker
from conserve_server.batch.offline_resume import OfflineResume
from conserve_server.batch.runner import BatchRunner
from conserve_server.batch.store import StoreBase, open_store
from conserve_server.config import ServerConfig, resolve
from conserve_server.grpc_api.handlers import coserve_handler
from conserve_server.grpc_api.limits import LimitedHealth, LimitedReflection, StreamLimiter
from conserve_server.grpc_api.servicer import CoServeServicer
from conserve_server.metrics import ObservedEngine, ServerMetrics, serve_metrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CoServe"].full_name
# health of the batch database, its own grpc.health.v1 service name: NOT_SERVING during a
# store outage while "" and CoServe stay SERVING (online traffic goes on)
STORE_HEALTH_NAME = "conserve.v1.BatchStore"

__all__ = ["ServerApp", "ServerConfig", "SERVICE_NAME"]


class ServerApp:
    def __init__(self, engine, config: ServerConfig, store: Optional[StoreBase] = None,
                 engine_config: Optional[EngineConfig] = None) -> None:
        """`store`: an already opened store (the CLI opens it before loading the model).
        `engine_config`: what `engine` was built with (default: `EngineConfig()`); it
        supplies the defaults `config` leaves to the engine (`conserve_server.config.resolve`)."""
        self.engine = engine
        self.config = config = resolve(config, engine_config or EngineConfig())
        self.port: Optional[int] = None
        self.http_port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        o = config.options
        auth = Authenticator(config.auth_tokens) if config.auth_tokens is not None else None
        # one gate for both faces, one set of counters for GetServerStats and /metrics
        self.admission = Admission(o, auth.num_tenants if auth is not None else 1)
        self.metrics = ServerMetrics(engine, self.admission, config.served_model_name)
        observed = ObservedEngine(engine, self.metrics)  # the faces and the runner use this
        self.store = store or open_store(config.batch_store, config.data_dir,
                                         busy_timeout_s=config.busy_timeout_s,
                                         replica_id=config.replica_id, lease_s=config.lease_s)
        self.runner = BatchRunner(self.store, observed, config.batch_in_flight,
                                  retention_s=config.retention_s, cache_salt=o.cache_salt)
        self.metrics.attach(self.store, self.runner)
        self.runner.offline = OfflineResume.create(observed, self.store, config.data_dir,
                                                   config.offline_kv_max_bytes)
        # the engine's own limits (a test's engine may be built smaller than the defaults)
        ecfg = engine_config or getattr(engine, "config", None) or EngineConfig()
        self.deadlines = DeadlineTracker(
            self.store, engine, config.deadlines,
            engine_work_cost(engine, ecfg.max_prefill_tokens, ecfg.max_num_seqs),
            borrow_gain=borrow_gain_of(ecfg))
        self.runner.deadlines = self.deadlines
        self.metrics.deadlines = self.deadlines
        self.servicer = CoServeServicer(observed, self.store, self.runner, auth, o,
                                        metrics=self.metrics, admission=self.admission,
                                        deadlines=self.deadlines)
        self.http = None
        if config.http_port is not None:
            from conserve_server.openai_api.front import HttpFront  # imported only when the front is on
            self.http = HttpFront(observed, self.store, self.runner, auth, self.metrics,
                                  self.admission, config, self.deadlines)
        self._metrics_server = None
        self.health = LimitedHealth(StreamLimiter("Health.Watch", config.max_health_watches))
        self.reflection = LimitedReflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            StreamLimiter("reflection", config.max_reflection_streams))
        workers = (o.max_online_queue + o.max_result_streams + config.max_reflection_streams
                   + config.max_health_watches + config.unary_workers)
        limit = o.max_message_bytes
        ms = lambda s: int(s * 1000)  # noqa: E731
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=workers,
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0),
                     ("grpc.keepalive_time_ms", ms(config.keepalive_time_s)),
                     ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_s)),
                     ("grpc.max_connection_idle_ms", ms(config.max_connection_idle_s)),
                     ("grpc.max_connection_age_ms", ms(config.max_connection_age_s)),
                     ("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_s)),
                     ("grpc.http2.min_ping_interval_without_data_ms", 10_000)])
        self.server.add_generic_rpc_handlers((coserve_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self.reflection, self.server)
        self.engine_dead = threading.Event()
        self._store_up: Optional[bool] = None
        self._stopped = False
        self._stop_watch = threading.Event()
        self._watcher = threading.Thread(target=self._watch_engine, name="engine-watch", daemon=True)

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
        self._watch_store()
        self._watcher.start()
        log.info("serving on %s (tls=%s, auth=%s)", self.address, c.tls_cert is not None,
                 c.auth_tokens is not None)
        return self.port

    def _watch_engine(self) -> None:
        """Monitor thread: engine death -> health NOT_SERVING and `engine_dead`."""
        while not self._stop_watch.wait(0.1):
            self._watch_store()
            failure = self.engine.failure
            if failure is not None:
                log.critical("engine failed (%s): health NOT_SERVING, refusing new work", failure)
                for name in ("", SERVICE_NAME):
                    self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
                self.engine_dead.set()
                return

    def _watch_store(self) -> None:
        """Mirror the store's reachability into health (`STORE_HEALTH_NAME`)."""
        up = bool(self.store.healthy)
        if up != self._store_up:
            self._store_up = up
            self.health.set(STORE_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING if up
                            else health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, drain_timeout_s: Optional[float] = None) -> None:
        """Shut down in the order the module docstring gives; open work gets
        `drain_timeout_s` (default: `config.drain_timeout`). Idempotent; called by the
        controlling thread."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_watch.set()
        grace = self.config.drain_timeout if drain_timeout_s is None else drain_timeout_s
        self.health.enter_graceful_shutdown()
        self.servicer.admitting = False
        if self.http is not None:
            self.http.admitting = False
        stopped = self.server.stop(grace)  # refuses new calls now; open ones get `grace`
        if self.http is not None:
            self.http.stop(grace, wait=False)  # the same, in parallel
        self.runner.stop(grace)
        stopped.wait(grace + 1.0)
        if self.http is not None:
            self.http.join(grace + 2.0)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.metrics.close()
        try:
            self.engine.shutdown(drain_timeout_s=0.0)
        except Exception:
            log.exception("engine shutdown failed")
        self.store.close()
        log.info("server stopped; batch state persisted in %s", self.store.path)
