"""`OpenAIRoutes`: the endpoints of the OpenAI-compatible front, and `build_app` (Starlette).

    GET  /v1/models, /v1/models/{model}
    POST /v1/chat/completions, /v1/completions        (stream or not; service_tier flex = offline)
    POST /v1/files; GET /v1/files, /v1/files/{id}, /v1/files/{id}/content; DELETE /v1/files/{id}
    POST /v1/batches; GET /v1/batches, /v1/batches/{id}; POST /v1/batches/{id}/cancel
    GET  /metrics (Prometheus, no auth), /health
    GET  /version; POST /tokenize, /detokenize (vLLM's shapes; tokenize.py)

Handlers run on the uvicorn event-loop thread; anything that may block (tokenizing, the
sqlite store, file I/O, waiting for engine output) runs in worker threads bounded by
`limiter`. Shared state: the engine, batch store and runner (thread-safe by contract), the
server's `Admission` (online slots and tenant shares shared with gRPC, the flex limit, the
default objectives), `ServerMetrics` and the `admitting` flag that `ServerApp.stop` clears.
Limits are the server's `ServiceOptions`, the same object the gRPC face reads. Auth:
`Authorization: Bearer <token>`, each token a tenant; a tenant sees only its own files and
batches (others' are 404), and its requests reuse only its own cached prompt prefixes
(`ServiceOptions.cache_salt`).

Deadlines (`DeadlineTracker`): POST /v1/batches refuses a batch that cannot finish inside
its completion_window (429 resource_unavailable, unless --accept-infeasible); a flex
request that has not started within `flex_max_wait_s` is cancelled with 429
resource_unavailable instead of waiting on.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from typing import Optional

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conserve_jax.engine_api import RequestClass
from conserve_server.admission import Admission
from conserve_server.auth import Authenticator
from conserve_server.batch.store import IdempotencyConflict, QuotaExceeded, StoreUnavailable
from conserve_server.config import ServiceOptions
from conserve_server.metrics import CONTENT_TYPE, ServerMetrics
from conserve_server.openai_api import batches as B
from conserve_server.openai_api import render
from conserve_server.openai_api.errors import ApiError, bad_request, invalid_value, not_found
from conserve_server.openai_api.files import FileStore
from conserve_server.openai_api.schemas import CHAT, COMPLETION, ENDPOINTS, parse_body, to_generation
from conserve_server.openai_api.samples import Fanout, sample_requests
from conserve_server.openai_api.streaming import ClientGone, SSEResponse, sse
from conserve_server.openai_api.tokenize import TokenizeRoutes

log = logging.getLogger(__name__)


class OpenAIRoutes:
    def __init__(self, engine, store, runner, auth: Optional[Authenticator],
                 metrics: ServerMetrics, admission: Admission, files: FileStore,
                 options: ServiceOptions, model_name: str, deadlines=None) -> None:
        """`model_name`: the model id this front reports and accepts. `deadlines`: the
        server's `DeadlineTracker` (completion-window admission and estimates; None: every
        batch accepted, no estimates)."""
        self.engine, self.store, self.runner, self.auth = engine, store, runner, auth
        self.deadlines = deadlines
        self.metrics, self.admission, self.files = metrics, admission, files
        self.options, self.model_name = options, model_name
        self.max_body_bytes = options.max_message_bytes  # request bodies and file uploads
        self.admitting = True
        self.created = int(time.time())
        workers = options.max_online_queue + options.max_flex_in_flight + 16
        self.limiter = anyio.CapacityLimiter(workers)

    # ---- helpers -----------------------------------------------------------------------
    def tenant(self, request: Request) -> Optional[str]:
        if self.auth is None:
            return None
        header = request.headers.get("authorization")
        tenant = self.auth.tenant([("authorization", header)] if header else [])
        if tenant is None:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <token>'",
                           code="invalid_api_key")
        return tenant

    async def run(self, fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def json_body(self, request: Request):
        limit = self.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes")
        raw = bytearray()
        async for part in request.stream():  # bounded even without a content-length
            raw += part
            if len(raw) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None

    def require_admitting(self) -> None:
        if not self.admitting:
            raise ApiError(503, "server is shutting down")

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")

    # ---- models ------------------------------------------------------------------------
    def _model(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "conserve-jax", "max_model_len": self.engine.max_model_len}

    async def list_models(self, request: Request):
        self.tenant(request)
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def get_model(self, request: Request):
        self.tenant(request)
        model = request.path_params["model"]
        self.check_model(model)
        return JSONResponse(self._model())

    # ---- chat / completions ------------------------------------------------------------
    async def chat(self, request: Request):
        return await self._generate(request, CHAT)

    async def completions(self, request: Request):
        return await self._generate(request, COMPLETION)

    async def _generate(self, request: Request, kind: str):
        tenant = self.tenant(request)
        self.require_admitting()
        parsed = parse_body(kind, await self.json_body(request))
        self.check_model(parsed.model)
        cls = parsed.request_class
        rid = f"{'on' if cls is RequestClass.ONLINE else 'flex'}:{uuid.uuid4().hex}"
        gen = await self.run(to_generation, parsed, self.engine, rid, self.options.max_logprobs)
        gen.cache_salt = self.options.cache_salt(tenant)  # no cached KV across tenants
        self.admission.fill_defaults(gen)
        fan = Fanout(self.engine, sample_requests(gen, parsed.n))
        why = self.admission.admit(cls, tenant, fan.n)  # online: shared with gRPC; flex: its own
        if why is not None:
            raise ApiError(429, why, code="rate_limit_exceeded")
        state = {"open": True}

        def close() -> None:  # idempotent: release the slots, stop unfinished samples
            if state["open"]:
                state["open"] = False
                self.admission.release(cls, tenant, fan.n)
                fan.cancel()
        try:
            fan.submit()
        except ValueError as e:
            close()
            raise bad_request(str(e)) from None
        except RuntimeError as e:
            close()
            raise ApiError(503, f"engine is not accepting work: {e}") from None
        except BaseException:
            close()
            raise
        meta = render.Meta(kind, render.new_id(kind), parsed.model, parsed.service_tier,
                           parsed.logprobs, parsed.top_logprobs)
        # (a stream's disconnects are the SSE response's to notice)
        source = fan.deltas(None if parsed.stream else request.is_disconnected)
        bound = self.deadlines.options.flex_max_wait_s if self.deadlines is not None else None
        if cls is RequestClass.OFFLINE and bound is not None:
            try:
                source = await self._flex_start(source, bound)
            except ClientGone:
                close()
                return Response(status_code=499)
            except BaseException:
                close()
                raise
        if parsed.stream:
            return SSEResponse(self._events(source, meta, fan.n, parsed.include_usage), close)
        try:
            answers = [render.Answer() for _ in range(fan.n)]
            async for i, out in source:
                answers[i].add(out)
            for ans in answers:
                self._raise_for(ans.finish_reason, ans.error)
            return JSONResponse(render.full_response(meta, self.engine.tokenizer, answers))
        except ClientGone:
            return Response(status_code=499)
        finally:
            close()

    async def _flex_start(self, source, bound: float):
        """A flex request's deltas, once it has started (its first delta came within
        `bound` seconds); ApiError 429 resource_unavailable if it did not (the caller
        cancels it)."""
        try:
            first = await asyncio.wait_for(source.__anext__(), bound)
        except asyncio.TimeoutError:
            self.deadlines.note_flex(False)
            raise ApiError(429, f"service_tier flex: the request could not start within "
                                f"{bound:g} s (flex_max_wait_s): offline capacity is taken; "
                                f"retry later, or use service_tier default",
                           "service_tier", "resource_unavailable") from None
        self.deadlines.note_flex(True)

        async def rest():
            yield first
            async for out in source:  # (ends at once if `first` was the last delta)
                yield out
        return rest()

    def _raise_for(self, finish_reason: Optional[str], error: str) -> None:
        if finish_reason == "error":
            raise ApiError(500, error or "engine error")
        if finish_reason == "cancelled":
            raise ApiError(503, "server is shutting down" if not self.admitting
                           else "the request was cancelled by the server")

    async def _events(self, source, meta: render.Meta, n: int, include_usage: bool):
        """SSE events of `source` (`(index, delta)` of `n` choices): each choice's chunks
        (its first carries the role), then with `include_usage` one usage chunk (prompt
        once, every choice's completion tokens), then [DONE]; an engine error ends the
        stream with an error event."""
        tok = self.engine.tokenizer
        first, sent = [True] * n, [0] * n
        done: dict[int, object] = {}
        try:
            async for i, out in source:
                if out.finished:
                    self._raise_for(out.finish_reason, out.error or "")
                    yield sse(render.chunk(meta, tok, out.text, out.logprobs, out.finish_reason,
                                           first[i], sent[i], i))
                    done[i] = out
                elif out.text or out.logprobs or first[i]:
                    yield sse(render.chunk(meta, tok, out.text, out.logprobs, None, first[i],
                                           sent[i], i))
                    first[i] = False
                sent[i] += len(out.text)
            if include_usage and done:
                o = done.get(0) or next(iter(done.values()))
                yield sse(render.usage_chunk(meta, o.prompt_tokens,
                                             sum(d.completion_tokens for d in done.values()),
                                             o.num_cached_tokens or 0))
        except ApiError as e:
            yield sse(e.body())
        yield sse("[DONE]")

    # ---- files -------------------------------------------------------------------------
    async def upload_file(self, request: Request):
        tenant = self.tenant(request)
        self.require_admitting()
        if int(request.headers.get("content-length") or 0) > self.max_body_bytes + (1 << 20):
            raise ApiError(413, f"file exceeds {self.max_body_bytes} bytes", "file")
        try:
            form = await request.form(max_part_size=self.max_body_bytes)
        except Exception as e:  # malformed multipart
            raise bad_request(f"the body must be multipart/form-data with file and purpose: {e}",
                              "file") from None
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise invalid_value("purpose", f"purpose must be 'batch', got {purpose!r}")
        if upload is None or isinstance(upload, str):
            raise invalid_value("file", "file is required (a JSONL upload)")
        data = await upload.read()
        await self.run(B.parse_jsonl, data, self.options.max_batch_size)
        row = await self.run(self.files.create, tenant or "", upload.filename or "input.jsonl",
                             purpose, data)
        return JSONResponse(row.to_openai())

    async def _owned_file(self, tenant: Optional[str], file_id: str):
        """(FileRow-like dict, content getter) for an uploaded or a result file."""
        target = B.batch_of_file(file_id)
        if target is not None:
            row = await self.run(self.store.get, target[0])
            if row is None or (tenant is not None and row.tenant != tenant) or not B.finished(row):
                raise not_found("file", file_id, "file_id")
            data = await self.run(B.result_file, self.files, self.store, row, target[1],
                                  self.model_name, self.engine.tokenizer)
            frow = await self.run(self.files.get, file_id)
            return frow, data
        frow = await self.run(self.files.get, file_id)
        if frow is None or (tenant is not None and frow.tenant != tenant):
            raise not_found("file", file_id, "file_id")
        return frow, None

    async def get_file(self, request: Request):
        frow, _ = await self._owned_file(self.tenant(request), request.path_params["file_id"])
        return JSONResponse(frow.to_openai())

    async def file_content(self, request: Request):
        frow, data = await self._owned_file(self.tenant(request), request.path_params["file_id"])
        if data is None:
            data = await self.run(self.files.content, frow.id)
        return Response(data, media_type="application/jsonl")

    async def list_files(self, request: Request):
        tenant = self.tenant(request)
        rows = await self.run(self.files.list, tenant, request.query_params.get("purpose"))
        return JSONResponse({"object": "list", "data": [r.to_openai() for r in rows],
                             "has_more": False})

    async def delete_file(self, request: Request):
        tenant = self.tenant(request)
        file_id = request.path_params["file_id"]
        frow, _ = await self._owned_file(tenant, file_id)
        await self.run(self.files.delete, frow.id)
        return JSONResponse({"id": frow.id, "object": "file", "deleted": True})

    # ---- batches -----------------------------------------------------------------------
    async def create_batch(self, request: Request):
        tenant = self.tenant(request)
        self.require_admitting()
        body = await self.json_body(request)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
            raise invalid_value("endpoint", f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
        window = B.parse_window(body.get("completion_window"))
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise invalid_value("metadata", "metadata must be an object of string values")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise invalid_value("input_file_id", "input_file_id is required")
        frow = await self.run(self.files.get, file_id)
        if frow is None or (tenant is not None and frow.tenant != tenant) or frow.purpose != "batch":
            raise not_found("file", file_id, "input_file_id")
        data = await self.run(self.files.content, file_id)
        lines = await self.run(B.parse_jsonl, data, self.options.max_batch_size)
        items = await self.run(B.build_items, lines, endpoint, self.engine,
                               self.model_name, self.options.max_logprobs)
        deadline = time.time() + window
        key = request.headers.get("idempotency-key") or ""
        asked = {"endpoint": endpoint, "input_file_id": file_id, "metadata": metadata,
                 "completion_window": body.get("completion_window")}
        if key and (prior := await self._idempotent(tenant, key, asked)) is not None:
            return JSONResponse(await self._batch_json(prior))
        work = None
        if self.deadlines is not None:
            work, refusal = await self.run(self.deadlines.judge, items, tenant or "", deadline,
                                           "completion_window")
            if refusal is not None:
                raise ApiError(429, refusal, "completion_window", "resource_unavailable")
        try:
            batch_id, created = await self.run(self.store.create_batch, tenant or "", items,
                                               deadline, key, self.options.max_tenant_items,
                                               work)
        except IdempotencyConflict as e:
            # a concurrent retry with this key may have created it a moment ago
            if (prior := await self._idempotent(tenant, key, asked)) is not None:
                return JSONResponse(await self._batch_json(prior))
            raise ApiError(409, str(e), "Idempotency-Key", "idempotency_conflict") from None
        except QuotaExceeded as e:
            raise ApiError(429, str(e), code="batch_quota_exceeded") from None
        if created:
            await self.run(self.files.put_doc, batch_id, asked)
            if key:
                await self.run(self.files.put_doc, self._key_doc(tenant, key), {**asked, "batch_id": batch_id})
            self.runner.wake()
            log.info("batch %s: %d requests from %s", batch_id, len(items), file_id)
        return JSONResponse(await self._batch_json(batch_id))

    @staticmethod
    def _key_doc(tenant: Optional[str], key: str) -> str:
        return "idem-" + hashlib.sha256(f"{tenant or ''}\0{key}".encode()).hexdigest()[:40]

    async def _idempotent(self, tenant: Optional[str], key: str, asked: dict) -> Optional[str]:
        """The batch an earlier create with this Idempotency-Key made, if it asked for the
        same thing (the deadline is computed per call, so the store's own payload check
        cannot tell a retry from new work here); ApiError 409 if it asked for other work."""
        doc = await self.run(self.files.get_doc, self._key_doc(tenant, key))
        if doc is None:
            return None
        if {k: doc.get(k) for k in asked} != asked:
            raise ApiError(409, f"Idempotency-Key {key!r} was used for a different batch "
                                f"({doc['batch_id']}); use a new key for new work",
                           "Idempotency-Key", "idempotency_conflict")
        return doc["batch_id"]

    def _estimate(self, batch_id: str):
        return self.deadlines.estimate_of(batch_id) if self.deadlines is not None else None

    async def _batch_json(self, batch_id: str) -> dict:
        row = await self.run(self.store.get, batch_id)
        return B.batch_object(row, await self.run(self.files.get_doc, batch_id),
                              self._estimate(batch_id))

    async def _owned_batch(self, request: Request):
        tenant = self.tenant(request)
        batch_id = request.path_params["batch_id"]
        row = await self.run(self.store.get, batch_id)
        if row is None or (tenant is not None and row.tenant != tenant):
            raise not_found("batch", batch_id, "batch_id")
        return row

    async def get_batch(self, request: Request):
        row = await self._owned_batch(request)
        return JSONResponse(B.batch_object(row, await self.run(self.files.get_doc, row.id),
                                           self._estimate(row.id)))

    async def cancel_batch(self, request: Request):
        row = await self._owned_batch(request)
        if await self.run(self.store.terminate, row.id, "cancelled", "batch cancelled"):
            self.runner.cancel_batch(row.id, "cancelled")
            log.info("batch %s cancelled", row.id)
        return JSONResponse(await self._batch_json(row.id))

    async def list_batches(self, request: Request):
        tenant = self.tenant(request)
        try:
            limit = int(request.query_params.get("limit", 20))
        except ValueError:
            limit = -1
        if not 1 <= limit <= 100:
            raise invalid_value("limit", "limit must be an integer in [1, 100]")
        after = request.query_params.get("after") or None
        if after:
            cursor = await self.run(self.store.get, after)
            if cursor is None or (tenant is not None and cursor.tenant != tenant):
                raise invalid_value("after", f"after: no such batch {after!r}")
        rows = await self.run(self.store.list, tenant, limit + 1, after)
        data = [B.batch_object(r, await self.run(self.files.get_doc, r.id), self._estimate(r.id))
                for r in rows[:limit]]
        return JSONResponse({"object": "list", "data": data, "has_more": len(rows) > limit,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})

    # ---- operations --------------------------------------------------------------------
    async def metrics_endpoint(self, request: Request):
        return Response(await self.run(self.metrics.exposition), media_type=CONTENT_TYPE)

    async def health(self, request: Request):
        return JSONResponse({"status": "ok" if self.admitting else "shutting_down"},
                            status_code=200 if self.admitting else 503)


async def _api_error(request: Request, exc: ApiError):
    return exc.response()


async def _http_error(request: Request, exc: HTTPException):
    msg = {404: f"no route {request.method} {request.url.path}",
           405: f"method {request.method} not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))
    return ApiError(exc.status_code, msg).response()


async def _store_down(request: Request, exc: StoreUnavailable):
    log.warning("%s %s: batch store unreachable: %s", request.method, request.url.path, exc)
    return ApiError(503, "the batch database cannot be reached; retry later").response()


async def _server_error(request: Request, exc: Exception):
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return ApiError(500, f"internal server error: {type(exc).__name__}").response()


def build_app(routes: OpenAIRoutes) -> Starlette:
    r = routes
    t = TokenizeRoutes(r)
    table = [
        Route("/v1/models", r.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", r.get_model, methods=["GET"]),
        Route("/v1/chat/completions", r.chat, methods=["POST"]),
        Route("/v1/completions", r.completions, methods=["POST"]),
        Route("/v1/files", r.upload_file, methods=["POST"]),
        Route("/v1/files", r.list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", r.get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", r.delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", r.file_content, methods=["GET"]),
        Route("/v1/batches", r.create_batch, methods=["POST"]),
        Route("/v1/batches", r.list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", r.get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", r.cancel_batch, methods=["POST"]),
        Route("/metrics", r.metrics_endpoint, methods=["GET"]),
        Route("/health", r.health, methods=["GET"]),
        Route("/version", t.version, methods=["GET"]),
        Route("/tokenize", t.tokenize, methods=["POST"]),
        Route("/detokenize", t.detokenize, methods=["POST"]),
    ]
    return Starlette(routes=table, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, StoreUnavailable: _store_down,
        Exception: _server_error})

