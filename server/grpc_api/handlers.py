"""gRPC method handlers for conserve.v1.CoServe that never answer with UNKNOWN or leak
internals.

Built from the proto's service descriptor instead of the generated
`add_CoServeServicer_to_server`, to add two things around every servicer method:

- a request that does not parse (e.g. a string field holding invalid UTF-8) ends with
  INVALID_ARGUMENT naming the message type, not INTERNAL "Exception deserializing";
- an exception that escapes a method is mapped: the batch database being locked by
  another process or unreachable (PostgreSQL down) -> UNAVAILABLE, full -> RESOURCE_EXHAUSTED, anything else -> INTERNAL
  "internal error" (the traceback goes to the log, never to the client). Aborts raised
  through `context.abort` pass unchanged.

Stateless; the wrappers run on gRPC worker threads.
"""
from __future__ import annotations

import logging
import sqlite3

import grpc
from google.protobuf.message import DecodeError

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.store import StoreUnavailable, is_full_error, is_locked_error

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request message that failed to parse."""

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name, self.error = type_name, error


def _deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as e:
            return Undecodable(cls.DESCRIPTOR.full_name, str(e) or type(e).__name__)
    return parse


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status for an exception that escaped a servicer method."""
    if is_locked_error(exc):
        return (grpc.StatusCode.UNAVAILABLE,
                "the batch database is locked by another process; retry later")
    if is_full_error(exc):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the batch database cannot grow (disk full); retry later")
    if isinstance(exc, StoreUnavailable):
        return (grpc.StatusCode.UNAVAILABLE,
                "the batch database cannot be reached; retry later")
    if isinstance(exc, sqlite3.Error):
        return grpc.StatusCode.UNAVAILABLE, "the batch database failed; retry later"
    return grpc.StatusCode.INTERNAL, "internal error (details are in the server log)"


def _aborted(context) -> bool:
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


def _fail(context, method: str, exc: Exception):
    if _aborted(context):
        raise exc  # context.abort: already has its status
    code, msg = status_for(exc)
    log.error("%s failed: %s", method, msg, exc_info=exc)
    context.abort(code, msg)


def _bad_request(context, req: Undecodable):
    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                  f"request is not a valid {req.type_name} message ({req.error}); "
                  "string fields must be valid UTF-8")


def _wrap_unary(method: str, fn):
    def handler(request, context):
        if isinstance(request, Undecodable):
            _bad_request(context, request)
        try:
            return fn(request, context)
        except Exception as e:
            _fail(context, method, e)
    return handler


def _wrap_stream(method: str, fn):
    def handler(request, context):
        if isinstance(request, Undecodable):
            _bad_request(context, request)
        try:
            yield from fn(request, context)
        except Exception as e:  # (GeneratorExit, a cancelled call, is not an Exception)
            _fail(context, method, e)
    return handler


def coserve_handler(servicer) -> grpc.GenericRpcHandler:
    """A generic handler serving every CoServe method of `servicer`."""
    service = pb.DESCRIPTOR.services_by_name["CoServe"]
    handlers = {}
    for m in service.methods:
        req_cls = getattr(pb, m.input_type.name)
        resp_cls = getattr(pb, m.output_type.name)
        fn = getattr(servicer, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(m.name, fn), request_deserializer=_deserializer(req_cls),
                response_serializer=resp_cls.SerializeToString)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(m.name, fn), request_deserializer=_deserializer(req_cls),
                response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
