"""Every error status of the CoServe service, and cancellation freeing KV (engine stats)."""
from __future__ import annotations

import grpc
import pytest

from conserve_jax.client import Client
from conserve_jax.engine.mock_engine import MockEngine
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2_grpc as pb_grpc
from conserve_server.config import ServiceOptions
from tests.conftest_server import start_server, wait_until

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    engine = MockEngine(max_model_len=MAX_MODEL_LEN)
    s = start_server(tmp_path_factory.mktemp("errors"), engine,
                     options=ServiceOptions(max_online_queue=2, max_batch_size=5))
    yield s
    s.stop()


@pytest.fixture
def client(srv):
    srv.engine.token_delay_s = 0.0
    with Client(srv.target) as c:
        yield c
    srv.engine.token_delay_s = 0.0


def code_and_message(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(), "prompt"),
    (dict(prompt="x" * MAX_MODEL_LEN), "prompt"),
    (dict(token_ids=[]), "token_ids"),
    (dict(token_ids=[5, 100000]), "token_ids"),
    (dict(token_ids=[5, -1]), "token_ids"),
    (dict(messages=[]), "messages"),
    (dict(prompt="a", max_tokens=0), "max_tokens"),
    (dict(prompt="a", max_tokens=MAX_MODEL_LEN + 1), "max_tokens"),
    (dict(prompt="a", temperature=-0.5), "temperature"),
    (dict(prompt="a", top_p=0.0), "top_p"),
    (dict(prompt="a", top_p=1.5), "top_p"),
    (dict(prompt="a", top_k=-2), "top_k"),
    (dict(prompt="a", logprobs=21), "logprobs"),
    (dict(prompt="a", stop_token_ids=[99999]), "stop_token_ids"),
    (dict(prompt="a", ttft=-1.0), "ttft_s"),
])
def test_generate_invalid_argument_names_field(client, kwargs, field):
    code, msg = code_and_message(lambda: list(client.generate(**kwargs)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in msg


def test_batch_invalid_arguments(client):
    code, msg = code_and_message(lambda: client.submit_batch([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "requests is empty" in msg
    code, msg = code_and_message(lambda: client.submit_batch([{"prompt": "a"}] * 6))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit is 5" in msg
    code, msg = code_and_message(lambda: client.submit_batch(
        [{"prompt": "a"}, {"prompt": "b", "temperature": -1}]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "requests[1].temperature" in msg
    code, msg = code_and_message(lambda: client.submit_batch([{"prompt": ""}]))
    assert "requests[0].prompt" in msg
    code, msg = code_and_message(lambda: client.submit_batch([{"prompt": "a"}], deadline=-5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "deadline" in msg
    bid = client.submit_batch([{"prompt": "a"}])
    code, msg = code_and_message(lambda: list(client.batch_results(bid, start=7)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "start_index" in msg


def test_not_found(client):
    for call in (lambda: client.get_batch("batch_nope"), lambda: client.cancel_batch("batch_nope"),
                 lambda: list(client.batch_results("batch_nope"))):
        code, msg = code_and_message(call)
        assert code == grpc.StatusCode.NOT_FOUND and "batch_nope" in msg


def test_resource_exhausted_when_online_queue_full(client, srv):
    srv.engine.token_delay_s = 0.02
    streams = [client.generate("slow", max_tokens=200) for _ in range(2)]
    for s in streams:
        next(s)  # both admitted and streaming
    code, msg = code_and_message(lambda: list(client.generate("one too many")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in msg
    for s in streams:
        s.cancel()
    assert wait_until(lambda: client.stats()["online_in_flight"] == 0)
    assert list(client.generate("ok", max_tokens=1))[-1].finished  # admitted again


def _kv_online_freed(client) -> bool:
    s = client.stats()
    return s["kv_blocks_online"] == 0 and s["online_running"] == 0 and s["online_waiting"] == 0


def test_client_cancel_frees_kv(client, srv):
    srv.engine.token_delay_s = 0.02  # 200 tokens would take 4 s; freed must be much sooner
    stream = client.generate("cancel me", max_tokens=200)
    next(stream)
    assert client.stats()["kv_blocks_online"] > 0
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert wait_until(lambda: _kv_online_freed(client), timeout=1.5)


def test_disconnect_frees_kv(srv):
    srv.engine.token_delay_s = 0.02
    other = Client(srv.target)
    stream = other.generate("gone", max_tokens=200)
    next(stream)
    other.close()  # the connection goes away mid-stream
    with Client(srv.target) as c:
        assert wait_until(lambda: _kv_online_freed(c), timeout=1.5)


def test_deadline_exceeded_cancels_engine_request(client, srv):
    srv.engine.token_delay_s = 0.02
    code, _ = code_and_message(lambda: list(client.generate("late", max_tokens=200, timeout=0.2)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _kv_online_freed(client), timeout=1.5)


def test_message_size_limit(srv):
    # the client may send more than the server accepts (default 16 MB): the server refuses it
    big = 65 << 20
    with grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", big)]) as ch:
        stub = pb_grpc.CoServeStub(ch)
        req = pb.GenerateRequest(prompt="x" * (17 << 20))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req, timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unavailable_while_shutting_down(tmp_path):
    s = start_server(tmp_path)
    with Client(s.target) as c:
        s.app.servicer.admitting = False
        code, _ = code_and_message(lambda: list(c.generate("a")))
        assert code == grpc.StatusCode.UNAVAILABLE
        code, _ = code_and_message(lambda: c.submit_batch([{"prompt": "a"}]))
        assert code == grpc.StatusCode.UNAVAILABLE
    s.stop()
