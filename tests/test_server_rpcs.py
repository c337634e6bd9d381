"""Every CoServe RPC against a real in-process server (loopback, port 0, MockEngine),
plus the health service and server reflection."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase

from conserve_jax.client import Client
from conserve_jax.engine_api import RequestClass
from conserve_jax.engine.mock_engine import MockEngine
from tests.conftest_server import echo_text, start_server, wait_until


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("rpcs"), MockEngine(token_delay_s=0.001))
    yield s
    s.stop()


@pytest.fixture
def client(srv):
    with Client(srv.target) as c:
        yield c


def test_generate_prompt_streams_deltas_then_final(client):
    chunks = list(client.generate("hello", max_tokens=8, temperature=0, request_id="r1"))
    assert len(chunks) == 8 and all(len(c.token_ids) == 1 for c in chunks)
    assert "".join(c.text for c in chunks) == echo_text("hello", 8)
    final = chunks[-1]
    assert final.finished and final.finish_reason == "length" and final.request_id == "r1"
    assert not any(c.finished for c in chunks[:-1])
    assert final.usage.prompt_tokens == 5 and final.usage.completion_tokens == 8
    assert final.usage.ttft_s is not None and final.usage.tpot_s is not None


def test_generate_token_ids_messages_stop_and_logprobs(client, srv):
    tok = srv.engine.tokenizer
    ids = tok.encode("abc")
    out = list(client.generate(token_ids=ids, max_tokens=6, logprobs=2))
    assert sum((c.token_ids for c in out), []) == (ids * 2)
    lp = out[0].logprobs[0]
    assert lp.token_id == ids[0] and len(lp.top) == 2
    # chat messages go through the tokenizer's chat template
    msgs = [{"role": "user", "content": "hi"}]
    out = list(client.generate(messages=msgs, max_tokens=4))
    assert out[-1].usage.prompt_tokens == len(tok.apply_chat_template(msgs))
    # stop token id and stop string end the request with "stop"
    out = list(client.generate("xyz", max_tokens=10, stop_token_ids=tok.encode("z")))
    assert out[-1].finish_reason == "stop" and out[-1].usage.completion_tokens == 3
    out = list(client.generate("abcdef", max_tokens=10, stop=["cd"]))
    assert out[-1].finish_reason == "stop" and out[-1].usage.completion_tokens == 4


def test_online_requests_are_online_class(client, srv):
    before = srv.engine.submitted[RequestClass.ONLINE]
    list(client.generate("x", max_tokens=1))
    assert srv.engine.submitted[RequestClass.ONLINE] == before + 1


def test_batch_lifecycle(client, srv):
    reqs = [{"prompt": f"p{i}-", "max_tokens": 5} for i in range(7)]
    reqs.append({"messages": [("user", "hey")], "max_tokens": 2, "request_id": "chat"})
    bid = client.submit_batch(reqs, deadline=600)
    info = client.get_batch(bid)
    assert info.batch_id == bid and info.total == 8 and info.deadline is not None
    results = list(client.batch_results(bid))
    assert [r.index for r in results] == list(range(8))
    for i, r in enumerate(results[:7]):
        assert r.text == echo_text(f"p{i}-", 5) and r.finish_reason == "length" and r.error is None
    assert results[7].request_id == "chat" and results[7].usage.completion_tokens == 2
    info = client.get_batch(bid)
    assert (info.state, info.done, info.failed, info.cancelled) == ("completed", 8, 0, 0)
    assert info.created_at <= info.started_at <= info.finished_at
    # resume from an index
    assert [r.index for r in client.batch_results(bid, start=5)] == [5, 6, 7]
    assert list(client.batch_results(bid, start=8)) == []
    assert bid in [b.batch_id for b in client.list_batches()]
    # cancelling a finished batch changes nothing
    assert client.cancel_batch(bid).state == "completed"


def test_list_batches_pages(client):
    ids = [client.submit_batch([{"prompt": "a", "max_tokens": 1}]) for _ in range(3)]
    from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
    page = client._stub.ListBatches(pb.ListBatchesRequest(page_size=2))
    assert [b.batch_id for b in page.batches] == ids[::-1][:2] and page.next_page_token
    page2 = client._stub.ListBatches(pb.ListBatchesRequest(page_size=2, page_token=page.next_page_token))
    assert page2.batches[0].batch_id == ids[0]
    listed = [b.batch_id for b in client.list_batches()]
    assert listed[:3] == ids[::-1] and len(listed) == len(set(listed))


def test_idempotent_submit(client):
    a = client.submit_batch([{"prompt": "a"}], idempotency_key="k1")
    b = client.submit_batch([{"prompt": "a"}], idempotency_key="k1")
    assert a == b and client.submit_batch([{"prompt": "a"}], idempotency_key="k2") != a


def test_cancel_batch_rpc(client, srv):
    srv.engine.token_delay_s = 0.01
    try:
        bid = client.submit_batch([{"prompt": "z", "max_tokens": 200}] * 10)
        assert wait_until(lambda: client.get_batch(bid).state == "running")
        info = client.cancel_batch(bid)
        assert info.state == "cancelled"
        results = list(client.batch_results(bid, timeout=5))
        assert len(results) == 10 and all(r.finish_reason == "cancelled" for r in results)
        assert client.get_batch(bid).cancelled == 10
        assert wait_until(lambda: client.stats()["kv_blocks_offline"] == 0)
    finally:
        srv.engine.token_delay_s = 0.001


def test_server_stats(client):
    s = client.stats()
    for key in ("online_waiting", "offline_running", "kv_blocks_total", "kv_blocks_online",
                "kv_blocks_offline", "host_pool_slots_used", "online_tokens_per_s",
                "offline_tokens_per_s", "preemptions", "online_in_flight", "batches_active",
                "batch_items_in_flight", "uptime_s"):
        assert key in s
    assert s["kv_blocks_total"] == 4096 and s["online_queue_limit"] == 256
    assert s["online_tokens_total"] > 0


def test_health(srv):
    with grpc.insecure_channel(srv.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "conserve.v1.CoServe"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection(srv):
    with grpc.insecure_channel(srv.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"conserve.v1.CoServe", "grpc.health.v1.Health"} <= names
        # full descriptors are served too (what grpcurl needs without a proto file)
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        svc = pool.FindServiceByName("conserve.v1.CoServe")
        assert {m.name for m in svc.methods} == {
            "Generate", "SubmitBatch", "GetBatch", "ListBatches", "CancelBatch",
            "StreamBatchResults", "GetServerStats", "DeleteBatch"}
        assert pool.FindMessageTypeByName("conserve.v1.SamplingParams").fields_by_name["top_p"]
