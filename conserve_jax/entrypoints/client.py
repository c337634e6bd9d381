"""Python client for the conserve.v1.CoServe gRPC service: `Client` (blocking) and
`AsyncClient` (grpc.aio), with the same methods.

    with Client("127.0.0.1:50051", token="...") as c:
        for chunk in c.generate("Hello", max_tokens=32, temperature=0):
            print(chunk.text, end="")
        bid = c.submit_batch([{"prompt": "a", "max_tokens": 8}, {"messages": [...]}])
        for r in c.batch_results(bid):
            print(r.index, r.text)

`generate` takes the prompt as text (or a list of token ids), `messages=[{"role": ...,
"content": ...}]` or `token_ids=[...]`, optional `ttft`/`tpot` objectives in seconds, a `timeout` (the RPC
deadline) and the `SamplingParams` fields as keywords. Server errors surface as
`grpc.RpcError` with the server's status code; bad keyword arguments raise TypeError or
ValueError locally. `submit_batch` gives every submission a fresh idempotency key (unless
you pass one) and retries UNAVAILABLE / DEADLINE_EXCEEDED with that same key, so a retry
never creates a second batch. `target` may name several replicas (`Client(["h1:50051", "h2:50051"])`, "h1:50051,h2:50051"
or "dns:///name:50051"): calls are spread round robin over the healthy ones
(`conserve_jax.entrypoints.targets`); every replica answers for every batch when they
share a PostgreSQL batch store. A client object may be shared between threads (gRPC channels are
thread-safe); an `AsyncClient` belongs to the event loop that created it.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from conserve_jax.engine_api import TokenLogprob
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2_grpc as pb_grpc
from conserve_jax.entrypoints.targets import TargetsT, channel_target

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                   "stop_token_ids", "ignore_eos", "logprobs")
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_ERROR: "error"}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_STATE = {pb.BATCH_STATE_QUEUED: "queued", pb.BATCH_STATE_RUNNING: "running",
          pb.BATCH_STATE_COMPLETED: "completed", pb.BATCH_STATE_CANCELLED: "cancelled",
          pb.BATCH_STATE_FAILED: "failed", pb.BATCH_STATE_EXPIRED: "expired"}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None
    # prompt tokens whose KV came from the server's prefix cache (vLLM's num_cached_tokens)
    num_cached_tokens: int = 0


@dataclass
class Chunk:
    """One streamed delta of `generate`; the last has finished=True, finish_reason, usage
    (token counts, TTFT/TPOT, and `num_cached_tokens`: prompt tokens served from the
    server's prefix cache)."""

    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"
    usage: Optional[Usage] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    request_id: str = ""


@dataclass
class BatchInfo:
    batch_id: str
    state: str  # queued | running | completed | cancelled | failed
    total: int
    done: int
    failed: int
    cancelled: int
    created_at: Optional[float]  # unix seconds
    started_at: Optional[float]
    finished_at: Optional[float]
    deadline: Optional[float]
    error: str = ""


@dataclass
class BatchResult:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: Optional[str]
    error: Optional[str] = None
    usage: Optional[Usage] = None
    request_id: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


# ---- conversions ---------------------------------------------------------------------------
def make_request(prompt: Optional[str] = None, *, messages=None, token_ids=None,
                 ttft: Optional[float] = None, tpot: Optional[float] = None,
                 request_id: str = "", expected_output_tokens: Optional[int] = None,
                 **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from `generate`'s keyword arguments. A list of ints as `prompt`
    is taken as token ids. `expected_output_tokens`: a guess of the response length, a
    hint for the server's KV planning (not a limit)."""
    if prompt is not None and not isinstance(prompt, str):
        if token_ids is None and isinstance(prompt, (list, tuple)) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt, token_ids = None, prompt
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got "
                            f"{type(prompt).__name__}; pass ids as token_ids=[...]")
    given = [n for n, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of prompt, messages, token_ids (got {', '.join(given)})")
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown generate arguments: {sorted(unknown)}")
    req = pb.GenerateRequest(request_id=request_id)
    if prompt is not None:
        req.prompt = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(int(t) for t in token_ids)
    elif messages is not None:
        req.messages.SetInParent()
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
            req.messages.messages.add(role=role, content=content)
    sp = req.sampling
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop":
            sp.stop.extend([value] if isinstance(value, str) else value)
        elif name == "stop_token_ids":
            sp.stop_token_ids.extend(int(t) for t in value)
        else:
            setattr(sp, name, value)
    if ttft is not None:
        req.ttft_s = ttft
    if tpot is not None:
        req.tpot_s = tpot
    if expected_output_tokens is not None:
        req.expected_output_tokens = int(expected_output_tokens)
    return req


def _usage(u: pb.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens,
                 u.ttft_s if u.HasField("ttft_s") else None, u.tpot_s if u.HasField("tpot_s") else None,
                 u.num_cached_tokens)


def _logprobs(items) -> list[TokenLogprob]:
    return [TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
            for lp in items]


def _chunk(m: pb.GenerateResponse) -> Chunk:
    return Chunk(list(m.token_ids), m.text, m.finished, _FINISH.get(m.finish_reason),
                 _usage(m.usage) if m.finished else None, _logprobs(m.logprobs), m.request_id)


def _time(msg, name: str) -> Optional[float]:
    return getattr(msg, name).ToNanoseconds() / 1e9 if msg.HasField(name) else None


def _batch(b: pb.Batch) -> BatchInfo:
    return BatchInfo(b.batch_id, _STATE.get(b.state, "unknown"), b.total, b.done, b.failed,
                     b.cancelled, _time(b, "created_at"), _time(b, "started_at"),
                     _time(b, "finished_at"), _time(b, "deadline"), b.error)


def _result(r: pb.BatchResult) -> BatchResult:
    return BatchResult(r.index, list(r.token_ids), r.text, _FINISH.get(r.finish_reason),
                       r.error or None, _usage(r.usage) if r.HasField("usage") else None,
                       r.request_id, _logprobs(r.logprobs))


def _stats(s: pb.ServerStats) -> dict[str, Any]:
    return {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}


def _submit_request(requests: Iterable[dict], deadline, idempotency_key: Optional[str]) -> pb.SubmitBatchRequest:
    if idempotency_key is None:
        idempotency_key = uuid.uuid4().hex
    msg = pb.SubmitBatchRequest(requests=[make_request(**r) for r in requests],
                                idempotency_key=idempotency_key)
    if deadline is not None:
        if isinstance(deadline, _dt.datetime):
            t = deadline.timestamp()
        else:  # seconds from now
            t = time.time() + float(deadline)
        ts = Timestamp()
        ts.FromNanoseconds(int(t * 1e9))
        msg.deadline.CopyFrom(ts)
    return msg


def _channel_args(target: TargetsT, token: Optional[str], tls_ca, tls: bool, max_message_bytes: int):
    """(gRPC target, options, credentials, metadata) for `target` (one address, several,
    or dns:///: see `conserve_jax.entrypoints.targets`)."""
    target, balanced = channel_target(target)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes), *balanced]
    creds = None
    if tls_ca is not None or tls:
        ca = tls_ca
        if isinstance(ca, str):
            with open(ca, "rb") as f:
                ca = f.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return target, options, creds, metadata


DeadlineT = Union[None, float, _dt.datetime]


class GenerateStream:
    """Iterator of `Chunk`s for one Generate call; `cancel()` (or `close()`) ends the call
    and makes the server free the request's KV at once."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> Chunk:
        return _chunk(next(self._call))

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel


class Client:
    """Blocking client; see the module docstring."""

    def __init__(self, target: TargetsT, token: Optional[str] = None, tls_ca=None, *,
                 tls: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        target, options, creds, self._md = _channel_args(target, token, tls_ca, tls,
                                                         max_message_bytes)
        self._channel = (grpc.secure_channel(target, creds, options) if creds is not None
                         else grpc.insecure_channel(target, options))
        self._stub = pb_grpc.CoServeStub(self._channel)

    def generate(self, prompt: Optional[str] = None, *, messages=None, token_ids=None,
                 ttft: Optional[float] = None, tpot: Optional[float] = None,
                 timeout: Optional[float] = None, request_id: str = "", **sampling) -> GenerateStream:
        req = make_request(prompt, messages=messages, token_ids=token_ids, ttft=ttft, tpot=tpot,
                           request_id=request_id, **sampling)
        return GenerateStream(self._stub.Generate(req, timeout=timeout, metadata=self._md))

    def submit_batch(self, requests: Iterable[dict], deadline: DeadlineT = None, *,
                     idempotency_key: Optional[str] = None, timeout: Optional[float] = None,
                     retries: int = 2) -> str:
        """`deadline`: seconds from now, or an aware datetime. Returns the batch id.
        `idempotency_key` None: a fresh random key (pass "" for none); UNAVAILABLE and
        DEADLINE_EXCEEDED are retried `retries` times with the same key."""
        msg = _submit_request(requests, deadline, idempotency_key)
        for attempt in range(retries + 1):
            try:
                return self._stub.SubmitBatch(msg, timeout=timeout, metadata=self._md).batch_id
            except grpc.RpcError as e:
                if attempt == retries or not msg.idempotency_key or e.code() not in RETRYABLE:
                    raise
                time.sleep(0.2 * 2 ** attempt)

    def get_batch(self, batch_id: str, timeout: Optional[float] = None) -> BatchInfo:
        return _batch(self._stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id),
                                          timeout=timeout, metadata=self._md))

    def list_batches(self, timeout: Optional[float] = None) -> list[BatchInfo]:
        out, token = [], ""
        while True:
            resp = self._stub.ListBatches(pb.ListBatchesRequest(page_token=token),
                                          timeout=timeout, metadata=self._md)
            out.extend(_batch(b) for b in resp.batches)
            token = resp.next_page_token
            if not token:
                return out

    def cancel_batch(self, batch_id: str, timeout: Optional[float] = None) -> BatchInfo:
        return _batch(self._stub.CancelBatch(pb.CancelBatchRequest(batch_id=batch_id),
                                             timeout=timeout, metadata=self._md))

    def batch_results(self, batch_id: str, start: int = 0,
                      timeout: Optional[float] = None) -> Iterator[BatchResult]:
        """Results in index order from `start`, waiting for unfinished items."""
        call = self._stub.StreamBatchResults(
            pb.StreamBatchResultsRequest(batch_id=batch_id, start_index=start),
            timeout=timeout, metadata=self._md)
        try:
            for r in call:
                yield _result(r)
        finally:
            call.cancel()

    def delete_batch(self, batch_id: str, timeout: Optional[float] = None) -> None:
        """Delete a finished batch and its results (FAILED_PRECONDITION while active)."""
        self._stub.DeleteBatch(pb.DeleteBatchRequest(batch_id=batch_id), timeout=timeout,
                               metadata=self._md)

    def stats(self, timeout: Optional[float] = None) -> dict[str, Any]:
        return _stats(self._stub.GetServerStats(pb.GetServerStatsRequest(), timeout=timeout,
                                                metadata=self._md))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """grpc.aio client with the same methods as `Client`; `generate` and `batch_results`
    are async iterators, the rest are coroutines."""

    def __init__(self, target: TargetsT, token: Optional[str] = None, tls_ca=None, *,
                 tls: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        target, options, creds, self._md = _channel_args(target, token, tls_ca, tls,
                                                         max_message_bytes)
        self._channel = (grpc.aio.secure_channel(target, creds, options) if creds is not None
                         else grpc.aio.insecure_channel(target, options))
        self._stub = pb_grpc.CoServeStub(self._channel)

    async def generate(self, prompt: Optional[str] = None, *, messages=None, token_ids=None,
                       ttft: Optional[float] = None, tpot: Optional[float] = None,
                       timeout: Optional[float] = None, request_id: str = "", **sampling):
        req = make_request(prompt, messages=messages, token_ids=token_ids, ttft=ttft, tpot=tpot,
                           request_id=request_id, **sampling)
        call = self._stub.Generate(req, timeout=timeout, metadata=self._md)
        try:
            async for m in call:
                yield _chunk(m)
        finally:
            call.cancel()

    async def submit_batch(self, requests: Iterable[dict], deadline: DeadlineT = None, *,
                           idempotency_key: Optional[str] = None, timeout: Optional[float] = None,
                           retries: int = 2) -> str:
        msg = _submit_request(requests, deadline, idempotency_key)
        for attempt in range(retries + 1):
            try:
                return (await self._stub.SubmitBatch(msg, timeout=timeout, metadata=self._md)).batch_id
            except grpc.RpcError as e:
                if attempt == retries or not msg.idempotency_key or e.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(0.2 * 2 ** attempt)

    async def delete_batch(self, batch_id: str, timeout: Optional[float] = None) -> None:
        await self._stub.DeleteBatch(pb.DeleteBatchRequest(batch_id=batch_id), timeout=timeout,
                                     metadata=self._md)

    async def get_batch(self, batch_id: str, timeout: Optional[float] = None) -> BatchInfo:
        return _batch(await self._stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id),
                                                timeout=timeout, metadata=self._md))

    async def list_batches(self, timeout: Optional[float] = None) -> list[BatchInfo]:
        out, token = [], ""
        while True:
            resp = await self._stub.ListBatches(pb.ListBatchesRequest(page_token=token),
                                                timeout=timeout, metadata=self._md)
            out.extend(_batch(b) for b in resp.batches)
            token = resp.next_page_token
            if not token:
                return out

    async def cancel_batch(self, batch_id: str, timeout: Optional[float] = None) -> BatchInfo:
        return _batch(await self._stub.CancelBatch(pb.CancelBatchRequest(batch_id=batch_id),
                                                   timeout=timeout, metadata=self._md))

    async def batch_results(self, batch_id: str, start: int = 0, timeout: Optional[float] = None):
        call = self._stub.StreamBatchResults(
            pb.StreamBatchResultsRequest(batch_id=batch_id, start_index=start),
            timeout=timeout, metadata=self._md)
        try:
            async for r in call:
                yield _result(r)
        finally:
            call.cancel()

    async def stats(self, timeout: Optional[float] = None) -> dict[str, Any]:
        return _stats(await self._stub.GetServerStats(pb.GetServerStatsRequest(), timeout=timeout,
                                                      metadata=self._md))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
