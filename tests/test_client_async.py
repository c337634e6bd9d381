"""The Python clients: AsyncClient against a live server, request building, error surfacing."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from conserve_jax.client import AsyncClient, Client, make_request
from conserve_jax.engine.mock_engine import MockEngine
from tests.conftest_server import echo_text, start_server, wait_until


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("client"), MockEngine(token_delay_s=0.001),
                     auth_tokens=["tok"])
    yield s
    s.stop()


def test_make_request_maps_every_field():
    req = make_request("hi", max_tokens=3, temperature=0.0, top_p=0.5, top_k=4, seed=7,
                       stop="x", stop_token_ids=[9], ignore_eos=True, logprobs=1, ttft=0.5,
                       tpot=0.05, request_id="r")
    sp = req.sampling
    assert req.prompt == "hi" and req.request_id == "r" and req.ttft_s == 0.5 and req.tpot_s == 0.05
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (3, 0.0, 0.5, 4, 7)
    assert list(sp.stop) == ["x"] and list(sp.stop_token_ids) == [9] and sp.ignore_eos
    assert sp.HasField("temperature") and sp.logprobs == 1
    assert not make_request("hi").sampling.HasField("temperature")  # unset stays unset
    assert make_request(token_ids=[1, 2]).WhichOneof("input") == "token_ids"
    assert make_request(messages=[]).WhichOneof("input") == "messages"
    with pytest.raises(ValueError):
        make_request("a", token_ids=[1])
    with pytest.raises(TypeError):
        make_request("a", max_token=3)


def test_async_client_end_to_end(srv):
    async def main():
        async with AsyncClient(srv.target, token="tok") as c:
            chunks = [ch async for ch in c.generate("async", max_tokens=7, temperature=0)]
            assert "".join(ch.text for ch in chunks) == echo_text("async", 7)
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 7
            bid = await c.submit_batch([{"prompt": f"b{i}", "max_tokens": 4} for i in range(5)])
            results = [r async for r in c.batch_results(bid)]
            assert [r.text for r in results] == [echo_text(f"b{i}", 4) for i in range(5)]
            assert [r.index async for r in c.batch_results(bid, start=3)] == [3, 4]
            assert (await c.get_batch(bid)).state == "completed"
            assert bid in [b.batch_id for b in await c.list_batches()]
            assert (await c.cancel_batch(bid)).state == "completed"
            assert (await c.stats())["kv_blocks_total"] > 0
            with pytest.raises(grpc.RpcError) as e:
                await c.get_batch("batch_missing")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                [ch async for ch in c.generate("a", top_p=2.0)]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
        async with AsyncClient(srv.target) as anon:
            with pytest.raises(grpc.RpcError) as e:
                await anon.stats()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    asyncio.run(main())


def test_async_generate_break_cancels_request(srv):
    srv.engine.token_delay_s = 0.02

    async def main():
        async with AsyncClient(srv.target, token="tok") as c:
            gen = c.generate("stop early", max_tokens=400)
            async for _ in gen:
                break
            await gen.aclose()  # leaving the loop early cancels the RPC
    try:
        asyncio.run(main())
        with Client(srv.target, token="tok") as c:
            assert wait_until(lambda: c.stats()["kv_blocks_online"] == 0, timeout=0.5)
    finally:
        srv.engine.token_delay_s = 0.001


def test_sync_client_closing_stream_cancels(srv):
    srv.engine.token_delay_s = 0.02
    try:
        with Client(srv.target, token="tok") as c:
            stream = c.generate("bye", max_tokens=400)
            first = next(stream)
            assert first.token_ids and not first.finished
            stream.close()
            assert wait_until(lambda: c.stats()["kv_blocks_online"] == 0, timeout=0.5)
    finally:
        srv.engine.token_delay_s = 0.001
