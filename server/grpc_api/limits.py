"""Concurrency limits for RPCs that hold a gRPC worker thread while open (streams).

The sync gRPC server has one thread pool for every service. Without per-kind limits, idle
reflection or health-watch streams (no token needed) or long StreamBatchResults calls can
take every worker and starve Generate, Health.Check and the rest. `StreamLimiter` caps how
many calls of one kind are open, in total and per key (tenant); over the cap the new call
ends at once with RESOURCE_EXHAUSTED. `LimitedHealth` and `LimitedReflection` wrap the
stock grpc-health and grpc-reflection servicers' streaming methods with such a cap.

Thread-safe; `acquire`/`release` are called from gRPC worker threads.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection


class StreamLimiter:
    def __init__(self, name: str, max_total: int, max_per_key: Optional[int] = None) -> None:
        self.name = name
        self.max_total = max_total
        self.max_per_key = max_per_key
        self._lock = threading.Lock()
        self._total = 0
        self._by_key: dict[str, int] = {}

    @property
    def open(self) -> int:
        with self._lock:
            return self._total

    def acquire(self, key: Optional[str] = None) -> Optional[str]:
        """Take a slot; None on success, else why not (the caller aborts with it). Key None
        (e.g. auth off: no tenants) counts against the total cap only."""
        with self._lock:
            if self._total >= self.max_total:
                return f"too many open {self.name} streams ({self.max_total}); retry later"
            n = self._by_key.get(key, 0)
            if key is not None and self.max_per_key is not None and n >= self.max_per_key:
                return (f"too many open {self.name} streams for this caller "
                        f"({self.max_per_key}); close some first")
            self._total += 1
            self._by_key[key] = n + 1
        return None

    def release(self, key: Optional[str] = None) -> None:
        with self._lock:
            self._total -= 1
            n = self._by_key.get(key, 0) - 1
            if n > 0:
                self._by_key[key] = n
            else:
                self._by_key.pop(key, None)

    @contextmanager
    def slot(self, context, key: Optional[str] = None) -> Iterator[None]:
        """`with limiter.slot(context, key):` — aborts RESOURCE_EXHAUSTED when full."""
        why = self.acquire(key)
        if why is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        try:
            yield
        finally:
            self.release(key)


class LimitedHealth(health.HealthServicer):
    """grpc.health.v1 with at most `limiter.max_total` open Watch streams. (The stock
    servicer serves Watch non-blocking, without a worker thread; each watch still costs
    memory and a callback, so it is capped too.)"""

    def __init__(self, limiter: StreamLimiter) -> None:
        super().__init__()
        self.limiter = limiter
        self._send_lock = threading.Lock()

    def Watch(self, request, context, send_response_callback=None):
        why = self.limiter.acquire()
        if why is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        if not context.add_callback(self.limiter.release):  # released when the call ends
            self.limiter.release()
        return super().Watch(request, context, send_response_callback)

    # The stock `set` sends to every watcher while holding its lock. A send waits for the
    # gRPC serve thread, which may at that moment be running a closing watch's callback
    # that needs the same lock: a deadlock (seen in `ServerApp.stop` right after clients
    # cancelled their watches). Here the status changes under the lock and the responses
    # go out after it is released; `_send_lock` (never taken by close callbacks) keeps
    # the updates and their sends in one order.
    def set(self, service, status):
        with self._send_lock:
            with self._lock:
                if self._gracefully_shutting_down:
                    return
                self._server_status[service] = status
                sends = list(self._send_response_callbacks.get(service, ()))
            for send in sends:
                send(health_pb2.HealthCheckResponse(status=status))

    def enter_graceful_shutdown(self):
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        with self._send_lock:
            with self._lock:
                if self._gracefully_shutting_down:
                    return
                sends = []
                for service in self._server_status:
                    self._server_status[service] = not_serving
                    sends += self._send_response_callbacks.get(service, ())
                self._gracefully_shutting_down = True
            for send in sends:
                send(health_pb2.HealthCheckResponse(status=not_serving))


class LimitedReflection(reflection.ReflectionServicer):
    """Server reflection with at most `limiter.max_total` open streams."""

    def __init__(self, service_names, limiter: StreamLimiter) -> None:
        super().__init__(service_names)
        self.limiter = limiter

    def ServerReflectionInfo(self, request_iterator, context):
        with self.limiter.slot(context):
            yield from super().ServerReflectionInfo(request_iterator, context)
