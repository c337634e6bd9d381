"""`CoServeServicer`: the conserve.v1.CoServe RPCs over an `EngineAPI` and a `BatchStore`.

Every method runs on a gRPC worker thread (sync server), many at once. Shared mutable
state here is the server's `Admission` (online slots and per-tenant shares, shared with the
HTTP front; its own lock), the result-stream limiter and the `admitting` flag, which
`ServerApp` clears on shutdown. Engine calls are thread-safe by contract; batch work is
handed to the `BatchRunner` thread through the store and `wake`/`cancel_batch`.

Errors: bad input -> INVALID_ARGUMENT naming the field; online queue full (globally or
for the caller's tenant), too many open result streams, or the tenant's batch-item quota
-> RESOURCE_EXHAUSTED; unknown batch, or another tenant's (indistinguishable on purpose)
-> NOT_FOUND; a batch predicted to miss its deadline (completion window) at the
current harvest rate, unless --accept-infeasible -> RESOURCE_EXHAUSTED naming the deadline
and the estimate (`conserve_server.batch.deadlines`); missing/bad token -> UNAUTHENTICATED; an idempotency key reused for a
different payload, or deleting an active batch -> FAILED_PRECONDITION; shutting down or
the engine stopped -> UNAVAILABLE; an engine failure during a Generate -> INTERNAL with a
fixed message. Store and unexpected failures are mapped by
`conserve_server.grpc_api.handlers`. A Generate call whose client cancels, disconnects or
passes its deadline cancels its engine request at once (gRPC termination callback), which
frees its KV.

Work before limits: size bounds and sampling options (`convert.precheck`) and the online
queue are checked before a prompt is tokenized. A Generate request that names no TTFT/TPOT
objective gets the server's default (`Admission.fill_defaults`, as on the HTTP face); its
prefix-cache salt is the caller's tenant (`ServiceOptions.cache_salt`). With
auth on, GetServerStats' batch fields count only the caller's batches, and list page
tokens are batch ids (they reveal nothing global).
"""
from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
import uuid
from typing import Optional

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from conserve_jax.engine_api import RequestClass
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2_grpc as pb_grpc
from conserve_jax.scheduling.slack import Estimate
from conserve_server import convert
from conserve_server.admission import Admission
from conserve_server.auth import Authenticator
from conserve_server.batch.deadlines import DEADLINE_ERROR, DeadlineTracker
from conserve_server.batch.runner import BatchRunner
from conserve_server.batch.store import (BatchRow, IdempotencyConflict, QuotaExceeded, StoreBase,
                                         StoreUnavailable)
from conserve_server.config import ServiceOptions
from conserve_server.grpc_api.limits import StreamLimiter
from conserve_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

_STATES = {"queued": pb.BATCH_STATE_QUEUED, "running": pb.BATCH_STATE_RUNNING,
           "completed": pb.BATCH_STATE_COMPLETED, "cancelled": pb.BATCH_STATE_CANCELLED,
           "failed": pb.BATCH_STATE_FAILED}


_BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


def _ts(t: Optional[float]) -> Optional[Timestamp]:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def batch_to_proto(row: BatchRow, est: Optional[Estimate] = None) -> pb.Batch:
    """`est`: the batch's current deadline estimate (None: unknown or not active)."""
    state = _STATES[row.state]
    if row.state == "failed" and row.error == DEADLINE_ERROR:
        state = pb.BATCH_STATE_EXPIRED
    b = pb.Batch(batch_id=row.id, state=state, total=row.total, done=row.done,
                 failed=row.failed, cancelled=row.cancelled, created_at=_ts(row.created_at),
                 started_at=_ts(row.started_at), finished_at=_ts(row.finished_at),
                 deadline=_ts(row.deadline), error=row.error,
                 estimated_completion_at_submit=_ts(row.estimate_at))
    if est is not None and est.finish_at is not None and row.state in ("queued", "running"):
        b.estimated_completion_at.CopyFrom(_ts(est.finish_at))
        b.slack_s = est.slack_s if est.slack_s is not None else 0.0
        b.at_risk = est.at_risk
    return b


class CoServeServicer(pb_grpc.CoServeServicer):
    def __init__(self, engine, store: StoreBase, runner: BatchRunner,
                 auth: Optional[Authenticator], options: ServiceOptions,
                 metrics: Optional[ServerMetrics] = None,
                 admission: Optional[Admission] = None,
                 deadlines: Optional[DeadlineTracker] = None) -> None:
        """`admission` and `metrics` are the server's, shared with the HTTP front; given
        neither (standalone use), the servicer makes its own. `deadlines`: completion-window
        admission and estimates (None: every batch accepted, no estimates)."""
        if admission is None:
            admission = Admission(options, auth.num_tenants if auth is not None else 1)
        if metrics is None:
            metrics = ServerMetrics(engine, admission)
            metrics.attach(store, runner)
        self.admission = admission
        self.metrics = metrics
        self.engine = engine
        self.store = store
        self.runner = runner
        self.auth = auth
        self.options = options
        self.deadlines = deadlines
        self.admitting = True
        self.result_streams = StreamLimiter("StreamBatchResults", options.max_result_streams,
                                            options.max_result_streams_per_tenant)

    # ---- helpers -----------------------------------------------------------------------
    def _tenant(self, context) -> Optional[str]:
        """The caller's tenant; None when auth is off (no isolation)."""
        if self.auth is None:
            return None
        tenant = self.auth.tenant(context.invocation_metadata())
        if tenant is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or invalid token: send metadata 'authorization: Bearer <token>'")
        return tenant

    def _require_admitting(self, context) -> None:
        if not self.admitting:
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if self.engine.failure is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "engine stopped; the server is restarting")

    def _owned_batch(self, batch_id: str, tenant: Optional[str], context) -> BatchRow:
        if not batch_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch_id is empty")
        if len(batch_id) > 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch_id is too long")
        row = self.store.get(batch_id)
        if row is None or (tenant is not None and row.tenant != tenant):
            context.abort(grpc.StatusCode.NOT_FOUND, f"batch {batch_id!r} not found")
        return row

    # ---- online ------------------------------------------------------------------------
    def Generate(self, request, context):
        tenant = self._tenant(context)
        self._require_admitting(context)
        rid = f"on:{uuid.uuid4().hex}"
        try:  # everything that needs no tokenizing, so bad input is refused even when busy
            convert.precheck(request, self.engine, self.options.max_logprobs)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        why = self.admission.admit(RequestClass.ONLINE, tenant)
        if why is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        try:
            try:  # tokenizing is work: it happens only inside an admitted slot
                req = convert.build_request(request, self.engine, rid, RequestClass.ONLINE,
                                            max_logprobs=self.options.max_logprobs)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            req.cache_salt = self.options.cache_salt(tenant)  # no cached KV across tenants
            yield from self._stream(self.admission.fill_defaults(req), request.request_id, context)
        finally:
            self.admission.release(RequestClass.ONLINE, tenant)

    def _stream(self, req, client_id: str, context):
        try:
            stream = self.engine.submit(req)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"engine is not accepting work: {e}")
        finished = threading.Event()

        def on_termination():  # client cancel, disconnect, deadline, or normal end
            if not finished.is_set():
                self.engine.cancel(req.request_id)
        if not context.add_callback(on_termination):
            on_termination()  # the RPC already ended
        try:
            while True:
                try:  # cancellation arrives as a final delta; the timeout is a safety net
                    out = stream.get(timeout=0.5)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if out.finished:
                    finished.set()
                    if out.finish_reason == "error":
                        context.abort(grpc.StatusCode.INTERNAL, out.error or "engine error")
                    if out.finish_reason == "cancelled" and self.engine.failure is not None:
                        context.abort(grpc.StatusCode.INTERNAL, "engine stopped")
                    if out.finish_reason == "cancelled" and not self.admitting:
                        context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
                    yield convert.output_to_response(out, client_id)
                    return
                if out.token_ids or out.text:
                    yield convert.output_to_response(out, client_id)
        finally:
            if not finished.is_set():
                self.engine.cancel(req.request_id)

    # ---- batches -----------------------------------------------------------------------
    def SubmitBatch(self, request, context):
        tenant = self._tenant(context)
        self._require_admitting(context)
        n = len(request.requests)
        if n == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "requests is empty")
        if n > self.options.max_batch_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"requests has {n} items; the limit is {self.options.max_batch_size}")
        if len(request.idempotency_key) > convert.MAX_ID_CHARS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"idempotency_key is longer than {convert.MAX_ID_CHARS} characters")
        try:
            for i, r in enumerate(request.requests):  # cheap bounds before any tokenizing
                convert.precheck(r, self.engine, self.options.max_logprobs, prefix=f"requests[{i}].")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        items = []
        try:
            for i, r in enumerate(request.requests):
                g = convert.build_request(r, self.engine, "-", RequestClass.OFFLINE,
                                          max_logprobs=self.options.max_logprobs,
                                          prefix=f"requests[{i}].")
                items.append((r, g.prompt_token_ids))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        deadline = None
        if request.HasField("deadline"):
            deadline = request.deadline.ToNanoseconds() / 1e9
            if not math.isfinite(deadline) or deadline <= time.time():
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "deadline is in the past")
        work = None
        key = request.idempotency_key
        # a retry of a stored batch is not judged again (the store answers it)
        if self.deadlines is not None and not (key and self.store.find_by_key(tenant or "", key)):
            work, refusal = self.deadlines.judge(items, tenant or "", deadline,
                                                 "deadline (completion window)")
            if refusal is not None:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            batch_id, created = self.store.create_batch(
                tenant or "", items, deadline, key,
                max_tenant_items=self.options.max_tenant_items, work=work)
        except IdempotencyConflict as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except QuotaExceeded as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        if created:
            log.info("batch %s: %d requests", batch_id, n)
            self.runner.wake()
            estimate_at = work.estimate_at if work is not None else None
        else:
            row = self.store.get(batch_id)
            estimate_at = row.estimate_at if row is not None else None
        return pb.SubmitBatchResponse(batch_id=batch_id, estimated_completion_at=_ts(estimate_at))

    def _batch(self, row: BatchRow) -> pb.Batch:
        est = self.deadlines.estimate_of(row.id) if self.deadlines is not None else None
        return batch_to_proto(row, est)

    def GetBatch(self, request, context):
        tenant = self._tenant(context)
        return self._batch(self._owned_batch(request.batch_id, tenant, context))

    def ListBatches(self, request, context):
        tenant = self._tenant(context)
        size = request.page_size or 100
        if not 0 < size <= 1000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must be in [0, 1000]")
        after = None
        if request.page_token:
            after = request.page_token
            if not _BATCH_ID.fullmatch(after):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token is invalid")
        rows = self.store.list(tenant, size, after)
        token = rows[-1].id if len(rows) == size else ""
        return pb.ListBatchesResponse(batches=[self._batch(r) for r in rows], next_page_token=token)

    def CancelBatch(self, request, context):
        tenant = self._tenant(context)
        row = self._owned_batch(request.batch_id, tenant, context)
        if self.store.terminate(row.id, "cancelled", "batch cancelled"):
            log.info("batch %s cancelled", row.id)
            self.runner.cancel_batch(row.id, "cancelled")
        return self._batch(self.store.get(row.id))

    def DeleteBatch(self, request, context):
        tenant = self._tenant(context)
        row = self._owned_batch(request.batch_id, tenant, context)
        if not self.store.delete(row.id):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"batch {row.id!r} is still {row.state}; cancel it first")
        log.info("batch %s deleted", row.id)
        return pb.DeleteBatchResponse()

    def StreamBatchResults(self, request, context):
        tenant = self._tenant(context)
        row = self._owned_batch(request.batch_id, tenant, context)
        if not 0 <= request.start_index <= row.total:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"start_index must be in [0, {row.total}], got {request.start_index}")
        with self.result_streams.slot(context, tenant):
            yield from self._results(row, request.start_index, context)

    def _results(self, row: BatchRow, start: int, context):
        nxt = start
        while nxt < row.total:
            version = self.store.version
            progressed = False
            try:
                got = self.store.results(row.id, nxt)
            except StoreUnavailable:  # the database is restarting: the stream waits it out
                got = []
            for idx, blob in got:
                if idx != nxt:
                    break  # a gap: that item is not finished yet
                yield pb.BatchResult.FromString(blob)
                nxt, progressed = nxt + 1, True
            if progressed:
                continue
            self.store.wait_for_change(version, 0.5)
            if not context.is_active():
                return
            if self.store.closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            try:
                gone = self.store.get(row.id) is None
            except StoreUnavailable:
                continue
            if gone:
                context.abort(grpc.StatusCode.NOT_FOUND, f"batch {row.id!r} was deleted")

    # ---- stats -------------------------------------------------------------------------
    def GetServerStats(self, request, context):
        tenant = self._tenant(context)
        snap = self.metrics.snapshot(tenant)  # the same values /metrics exposes (all tenants)
        return convert.stats_to_proto(snap.engine, **snap.server)
