"""`Admission`: the one gate both faces pass a generation request through.

One instance per server (`ServerApp` builds it from `ServiceOptions`), shared by the gRPC
servicer and the HTTP front; `ServerMetrics` reads its counts for `GetServerStats` and
`/metrics`. It holds:

- the online counter: online requests in flight from every face (gRPC `Generate`, HTTP
  chat/completions), at most `max_online_queue`, so the limit is process-wide;
- the per-tenant share of it: with several tenants, one tenant may hold at most
  `online_per_tenant` of those slots (`max_online_per_tenant`, or by default half the
  queue), so one tenant cannot starve the others;
- the flex counter: HTTP service_tier=flex requests (offline class, but held open by
  their client), at most `max_flex_in_flight`, a limit of its own; flex requests never take
  an online slot;
- the default objectives: `fill_defaults(request)` gives a request that names no TTFT/TPOT
  objective the server's (`ServiceOptions.default_slo`). The faces call it on every request
  they submit, and nothing else fills objectives in (metrics judge `request.slo` as is).

Contract: a face calls `admit(cls, tenant)` before it submits (None: admitted, else the
reason to refuse with RESOURCE_EXHAUSTED / 429; nothing is counted then) and exactly one
`release(cls, tenant)` with the same arguments when the request is over, however it ends.
`tenant` is None when auth is off. Any thread may call any method (gRPC workers, the HTTP
event loop, metrics scrapes); the counters are under one lock that is never held while
calling out, so a call never blocks beyond it.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Optional

from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass
from conserve_server.config import ServiceOptions


class Admission:
    def __init__(self, options: ServiceOptions, tenants: int = 1) -> None:
        """`tenants`: how many tenants the server's tokens define (0 or 1: no sharing)."""
        self.max_online = options.max_online_queue
        per_tenant = options.max_online_per_tenant
        if per_tenant is None:
            per_tenant = max(1, self.max_online // 2) if tenants > 1 else self.max_online
        self.online_per_tenant = per_tenant
        self.max_flex = options.max_flex_in_flight
        self.default_slo = options.default_slo if options.default_slo is not None else SLO()
        self._lock = threading.Lock()
        self._online = 0
        self._online_by_tenant: dict[str, int] = {}
        self._flex = 0

    # ---- limits ------------------------------------------------------------------------
    def admit(self, request_class: RequestClass, tenant: Optional[str] = None,
              count: int = 1) -> Optional[str]:
        """Count `count` more requests of `request_class` in flight (all or none): ONLINE
        against the online queue (and the tenant's share, given a tenant), OFFLINE (HTTP
        flex) against the flex limit. None when admitted, else why not (nothing counted).
        An OpenAI request with `n` choices counts as n requests."""
        with self._lock:
            if request_class is not RequestClass.ONLINE:
                if self._flex + count > self.max_flex:
                    return f"the flex queue is full ({self.max_flex} requests); retry later"
                self._flex += count
                return None
            if self._online + count > self.max_online:
                return f"online queue is full ({self.max_online} requests); retry later"
            if tenant is not None:
                mine = self._online_by_tenant.get(tenant, 0)
                if mine + count > self.online_per_tenant:
                    return (f"this tenant has {mine} online requests in flight (its limit); "
                            "retry later")
                self._online_by_tenant[tenant] = mine + count
            self._online += count
            return None

    def release(self, request_class: RequestClass, tenant: Optional[str] = None,
                count: int = 1) -> None:
        """Give back the slots an `admit` with the same arguments took."""
        with self._lock:
            if request_class is not RequestClass.ONLINE:
                self._flex -= count
                return
            self._online -= count
            if tenant is not None:
                n = self._online_by_tenant.get(tenant, count) - count
                if n:
                    self._online_by_tenant[tenant] = n
                else:
                    self._online_by_tenant.pop(tenant, None)

    @property
    def online_in_flight(self) -> int:
        with self._lock:
            return self._online

    def online_in_flight_of(self, tenant: str) -> int:
        with self._lock:
            return self._online_by_tenant.get(tenant, 0)

    @property
    def flex_in_flight(self) -> int:
        with self._lock:
            return self._flex

    # ---- defaults ----------------------------------------------------------------------
    def fill_defaults(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with each objective it does not name (None) set to the server's
        default; returned for chaining (the request is changed in place)."""
        slo, d = request.slo, self.default_slo
        request.slo = dataclasses.replace(
            slo, ttft_s=slo.ttft_s if slo.ttft_s is not None else d.ttft_s,
            tpot_s=slo.tpot_s if slo.tpot_s is not None else d.tpot_s)
        return request
