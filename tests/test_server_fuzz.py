"""Fuzzing the gRPC surface (issue 9): random bytes, mutated valid messages and random
well-formed messages go to every CoServe method; each call must end with a status from
the documented set (never UNKNOWN, never INTERNAL, never a hang), and the server must keep
serving afterwards. Hypothesis runs derandomized with bounded examples, so CI is
deterministic and the file takes a few seconds."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conserve_jax.client import Client
from conserve_jax.engine.mock_engine import MockEngine
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.config import ServiceOptions
from tests.conftest_server import start_server

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
SERVICE = pb.DESCRIPTOR.services_by_name["CoServe"]
METHODS = [(m.name, m.server_streaming) for m in SERVICE.methods]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("fuzz"), MockEngine(max_model_len=128),
                     options=ServiceOptions(max_online_queue=8, max_batch_size=8))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(srv):
    with grpc.insecure_channel(srv.target) as ch:
        yield ch


def _call(channel, method: str, streaming: bool, payload: bytes) -> grpc.StatusCode:
    path = f"/{SERVICE.full_name}/{method}"
    try:
        if streaming:
            for _ in channel.unary_stream(path)(payload, timeout=10):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _seeds() -> list[bytes]:
    gen = pb.GenerateRequest(prompt="hello", request_id="r", sampling=pb.SamplingParams(
        max_tokens=4, temperature=0.5, stop=["x"], logprobs=2))
    return [gen.SerializeToString(),
            pb.SubmitBatchRequest(requests=[gen], idempotency_key="k").SerializeToString(),
            pb.GetBatchRequest(batch_id="batch_" + "0" * 32).SerializeToString(),
            pb.ListBatchesRequest(page_size=3).SerializeToString(),
            pb.StreamBatchResultsRequest(batch_id="batch_x", start_index=1).SerializeToString()]


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in edits:
        if not b:
            b.append(val)
            continue
        pos %= len(b)
        if kind == 0:
            b[pos] = val
        elif kind == 1:
            b.insert(pos, val)
        else:
            del b[pos]
    return bytes(b)


def _assert_serving(srv):
    with grpc.insecure_channel(srv.target) as ch:
        st_ = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert st_.status == health_pb2.HealthCheckResponse.SERVING
    with Client(srv.target) as c:
        assert list(c.generate("ok", max_tokens=2, timeout=10))[-1].finished
        assert c.stats(timeout=5)["online_in_flight"] <= 1


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=200))
def test_random_bytes(channel, method, payload):
    assert _call(channel, method[0], method[1], payload) in DOCUMENTED


@FUZZ
@given(method=st.sampled_from(METHODS), seed=st.sampled_from(_seeds()),
       edits=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)),
                      min_size=1, max_size=6))
def test_mutated_messages(channel, method, seed, edits):
    assert _call(channel, method[0], method[1], _mutate(seed, edits)) in DOCUMENTED


_text = st.text(max_size=40)
_sampling = st.builds(
    pb.SamplingParams,
    max_tokens=st.integers(-5, 300), temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_p=st.floats(allow_nan=True), top_k=st.integers(-5, 1000), seed=st.integers(-2**63, 2**63 - 1),
    stop=st.lists(_text, max_size=4), stop_token_ids=st.lists(st.integers(-2**31, 2**31 - 1), max_size=4),
    ignore_eos=st.booleans(), logprobs=st.integers(-3, 30))
_messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "", "x"]),
                               content=_text), max_size=3)


@st.composite
def _generate_request(draw):
    req = pb.GenerateRequest(request_id=draw(_text), sampling=draw(_sampling))
    kind = draw(st.sampled_from(["prompt", "token_ids", "messages", None]))
    if kind == "prompt":
        req.prompt = draw(_text)
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=8)))
    elif kind == "messages":
        req.messages.messages.extend(draw(_messages))
        req.messages.SetInParent()
    if draw(st.booleans()):
        req.ttft_s = draw(st.floats(allow_nan=True, allow_infinity=True))
    return req


@FUZZ
@given(req=_generate_request())
def test_random_generate_requests(channel, req):
    assert _call(channel, "Generate", True, req.SerializeToString()) in DOCUMENTED


@FUZZ
@given(reqs=st.lists(_generate_request(), max_size=10), key=_text,
       deadline=st.one_of(st.none(), st.integers(-2**40, 2**40)))
def test_random_batches(channel, reqs, key, deadline):
    msg = pb.SubmitBatchRequest(requests=reqs, idempotency_key=key)
    if deadline is not None:
        msg.deadline.seconds = deadline
    assert _call(channel, "SubmitBatch", False, msg.SerializeToString()) in DOCUMENTED


def test_still_serving_after_fuzzing(srv, channel):
    _assert_serving(srv)
