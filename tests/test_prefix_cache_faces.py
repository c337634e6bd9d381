"""Prefix caching at the serving faces (issue 25, item 6), over `MockEngine`'s deterministic
stand-in for the cache (a repeated prompt prefix of the same salt reports its leading full
16-token blocks, at most all but the last prompt token, as cached):

- gRPC: `Usage.num_cached_tokens` on the final Generate chunk and in batch results, and the
  Python client's `Usage.num_cached_tokens`;
- OpenAI: `usage.prompt_tokens_details.cached_tokens` in completions and chat responses,
  the streamed usage chunk and batch output lines;
- tenant salt: with auth on, every engine request (gRPC, HTTP, batch items) carries its
  tenant as `cache_salt`, so one tenant never reuses another's blocks;
  `--share-prefix-cache-across-tenants` leaves it None; with auth off it is None;
- GetServerStats and /metrics: prefix-cache queries and hits by class, cached-free blocks,
  evictions;
- the flags (`--share-prefix-cache-across-tenants`, `--enable-prefix-caching` for the mock).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import uuid

import grpc
import pytest

from conserve_jax.client import AsyncClient, Client
from conserve_jax.engine.mock_engine import MockEngine, MockTokenizer
from conserve_jax.engine_api import GenerationRequest, RequestClass, RequestOutput
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2_grpc as pb_grpc
from conserve_jax.sampling_params import SamplingParams
from conserve_server import main as server_main
from conserve_server.auth import tenant_id
from conserve_server.config import ServerConfig, ServiceOptions, server_config_from_args
from conserve_server.openai_api import render
from tests.conftest_server import wait_until
from tests.metrics_helpers import metric
from tests.openai_helpers import MODEL, TOKEN_A, TOKEN_B, client, raw, start_http_server

BLOCK = 16  # MockEngine's default block size


def fresh(n: int = 40) -> str:
    """A prompt of n ASCII characters (n tokens for MockTokenizer) nobody sent before."""
    text = "".join(uuid.uuid4().hex for _ in range(n // 32 + 1))
    return text[:n]


def expected_cached(n_tokens: int) -> int:
    """What a repeat of an n-token prompt reports: full blocks up to all but its last token."""
    return (n_tokens - 1) // BLOCK * BLOCK


def capture(monkeypatch, engine) -> list[GenerationRequest]:
    """Record every request the server hands `engine` (all faces and the batch runner)."""
    seen: list[GenerationRequest] = []
    inner = engine.submit

    def submit(request, **kw):
        seen.append(request)
        return inner(request, **kw)
    monkeypatch.setattr(engine, "submit", submit)
    return seen


def cached(chunks) -> int:
    return chunks[-1].usage.num_cached_tokens


@pytest.fixture(scope="module")
def open_srv(tmp_path_factory):
    """Auth off: no tenants, every request in one cache group."""
    s = start_http_server(tmp_path_factory.mktemp("open"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def auth_srv(tmp_path_factory):
    s = start_http_server(tmp_path_factory.mktemp("auth"), auth_tokens=[TOKEN_A, TOKEN_B])
    yield s
    s.stop()


# ---- the mock's deterministic cache ---------------------------------------------------------
def _final(eng: MockEngine, ids, salt=None, cls=RequestClass.ONLINE) -> RequestOutput:
    req = GenerationRequest(f"r-{uuid.uuid4().hex}", list(ids), SamplingParams(max_tokens=2),
                            cls, cache_salt=salt)
    return list(eng.submit(req))[-1]


def test_mock_engine_reports_whole_cached_blocks_per_salt():
    eng = MockEngine()
    try:
        ids = list(range(3, 43))  # 40 tokens: two full blocks
        assert _final(eng, ids).num_cached_tokens == 0
        assert _final(eng, ids).num_cached_tokens == 32
        assert _final(eng, ids, salt="t1").num_cached_tokens == 0  # another salt: no hit
        assert _final(eng, ids, salt="t1").num_cached_tokens == 32
        assert _final(eng, ids[:32]).num_cached_tokens == 16  # never the last prompt token
        assert _final(eng, ids + [50] * 8).num_cached_tokens == 32  # a longer prompt: its prefix
        assert _final(eng, [7] + ids[1:]).num_cached_tokens == 0  # differs in the first block
        off = _final(eng, ids, cls=RequestClass.OFFLINE)
        assert off.num_cached_tokens == 32
        s = eng.stats()
        assert s.prefix_cache_queries_online == 40 * 5 + 32 + 48
        assert s.prefix_cache_hits_online == 32 + 32 + 16 + 32
        assert (s.prefix_cache_queries_offline, s.prefix_cache_hits_offline) == (40, 32)
        # salt None: ids' two blocks, the longer prompt's third, [7]+...'s two; "t1": two
        assert s.kv_blocks_cached_free == 2 + 1 + 2 + 2
        assert s.prefix_cache_evictions == 0
    finally:
        eng.shutdown()


def test_mock_engine_cache_off_and_eviction():
    off = MockEngine(enable_prefix_caching=False)
    try:
        ids = list(range(3, 43))
        assert [_final(off, ids).num_cached_tokens for _ in range(2)] == [0, 0]
        s = off.stats()
        assert (s.prefix_cache_queries_online, s.prefix_cache_hits_online,
                s.kv_blocks_cached_free) == (0, 0, 0)
    finally:
        off.shutdown()
    small = MockEngine(num_blocks=4)  # remembers at most 4 blocks
    try:
        a, b, c = ([base + i for i in range(40)] for base in (3, 60, 120))
        for ids in (a, b, c):
            assert _final(small, ids).num_cached_tokens == 0
        s = small.stats()
        assert s.kv_blocks_cached_free == 4 and s.prefix_cache_evictions == 2
        assert _final(small, a).num_cached_tokens == 0  # a's blocks were the least recent
        assert _final(small, c).num_cached_tokens == 32
    finally:
        small.shutdown()


# ---- gRPC -----------------------------------------------------------------------------------
def test_grpc_final_chunk_carries_num_cached_tokens(open_srv):
    p = fresh(40)
    with Client(open_srv.target) as c:
        first = list(c.generate(p, max_tokens=3))
        again = list(c.generate(p + "-more", max_tokens=3))
    assert cached(first) == 0 and cached(again) == 32
    assert all(ch.usage is None for ch in again[:-1])
    # on the wire: the final message's Usage
    with grpc.insecure_channel(open_srv.target) as ch:
        msgs = list(pb_grpc.CoServeStub(ch).Generate(
            pb.GenerateRequest(prompt=p, sampling=pb.SamplingParams(max_tokens=2)), timeout=10))
    assert msgs[-1].finished and msgs[-1].usage.num_cached_tokens == 32
    assert all(not m.HasField("usage") for m in msgs[:-1])


def test_grpc_batch_results_carry_num_cached_tokens(open_srv, monkeypatch):
    seen = capture(monkeypatch, open_srv.engine)
    p = fresh(40)
    with Client(open_srv.target) as c:
        list(c.generate(p, max_tokens=1))  # computes p's two full blocks
        bid = c.submit_batch([{"prompt": p + f"-{i}", "max_tokens": 2} for i in range(3)]
                             + [{"prompt": fresh(40), "max_tokens": 2}])
        results = list(c.batch_results(bid, timeout=20))
        assert [r.usage.num_cached_tokens for r in results] == [32, 32, 32, 0]
        # stored results: read again from the store, the same numbers
        assert [r.usage.num_cached_tokens for r in c.batch_results(bid, timeout=20)] == [32, 32, 32, 0]
    # auth off: no tenant, no salt, on either path
    assert len(seen) == 5 and all(g.cache_salt is None for g in seen)
    assert [g.request_class for g in seen].count(RequestClass.OFFLINE) == 4


def test_async_client_usage_has_num_cached_tokens(open_srv):
    p = fresh(48)

    async def go():
        async with AsyncClient(open_srv.target) as c:
            out = []
            for _ in range(2):
                chunks = [ch async for ch in c.generate(p, max_tokens=2)]
                out.append(chunks[-1].usage.num_cached_tokens)
            return out
    assert asyncio.run(go()) == [0, expected_cached(48)]


# ---- tenant salt ----------------------------------------------------------------------------
def test_each_tenant_is_its_own_cache_salt_on_every_face(auth_srv, monkeypatch):
    seen = capture(monkeypatch, auth_srv.engine)
    p = fresh(40)
    with Client(auth_srv.target, token=TOKEN_A) as a, Client(auth_srv.target, token=TOKEN_B) as b:
        assert cached(list(a.generate(p, max_tokens=2))) == 0
        assert cached(list(b.generate(p, max_tokens=2))) == 0  # A's blocks are not B's
        assert cached(list(a.generate(p, max_tokens=2))) == 32
        bid = b.submit_batch([{"prompt": p, "max_tokens": 2}])  # B's own online blocks
        assert [r.usage.num_cached_tokens for r in b.batch_results(bid, timeout=20)] == [32]
    r = client(auth_srv, TOKEN_A).completions.create(model=MODEL, prompt=p, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens == 32
    r = client(auth_srv, TOKEN_B).completions.create(model=MODEL, prompt=p, max_tokens=2,
                                                     extra_body={"service_tier": "flex"})
    assert r.usage.prompt_tokens_details.cached_tokens == 32
    ta, tb = tenant_id(TOKEN_A), tenant_id(TOKEN_B)
    assert [g.cache_salt for g in seen] == [ta, tb, ta, tb, ta, tb]
    assert [g.request_class for g in seen][3:] == [RequestClass.OFFLINE, RequestClass.ONLINE,
                                                   RequestClass.OFFLINE]


def test_sharing_across_tenants_leaves_the_salt_unset(tmp_path, monkeypatch):
    s = start_http_server(tmp_path, auth_tokens=[TOKEN_A, TOKEN_B],
                          options=ServiceOptions(share_prefix_cache_across_tenants=True))
    try:
        seen = capture(monkeypatch, s.engine)
        p = fresh(40)
        with Client(s.target, token=TOKEN_A) as a, Client(s.target, token=TOKEN_B) as b:
            assert cached(list(a.generate(p, max_tokens=2))) == 0
            assert cached(list(b.generate(p, max_tokens=2))) == 32  # A's blocks, shared
            bid = b.submit_batch([{"prompt": p, "max_tokens": 2}])
            assert [r.usage.num_cached_tokens for r in b.batch_results(bid, timeout=20)] == [32]
        r = client(s, TOKEN_B).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=2)
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # another prompt (the template)
        assert len(seen) == 4 and all(g.cache_salt is None for g in seen)
    finally:
        s.stop()


def test_cache_salt_rule():
    o = ServiceOptions()
    assert o.share_prefix_cache_across_tenants is False
    assert o.cache_salt("t_abc") == "t_abc"
    assert o.cache_salt(None) is None and o.cache_salt("") is None  # auth off / batch without
    shared = ServiceOptions(share_prefix_cache_across_tenants=True)
    assert shared.cache_salt("t_abc") is None


# ---- OpenAI face ----------------------------------------------------------------------------
def test_openai_usage_reports_cached_tokens(auth_srv):
    c = client(auth_srv)
    p = fresh(40)
    r1 = c.completions.create(model=MODEL, prompt=p, max_tokens=3)
    r2 = c.completions.create(model=MODEL, prompt=p, max_tokens=3)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.usage.prompt_tokens_details.cached_tokens == 32
    assert r2.usage.prompt_tokens == 40 and r2.usage.total_tokens == 43
    # chat: the rendered template is the prompt
    msgs = [{"role": "system", "content": fresh(30)}, {"role": "user", "content": "hello"}]
    n = len(MockTokenizer().apply_chat_template(msgs))
    r1 = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    r2 = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.usage.prompt_tokens_details.cached_tokens == expected_cached(n) > 0
    # a next turn resends the conversation: its prefix is cached
    turn2 = msgs + [{"role": "assistant", "content": r2.choices[0].message.content},
                    {"role": "user", "content": "and then?"}]
    r3 = c.chat.completions.create(model=MODEL, messages=turn2, max_tokens=2)
    assert r3.usage.prompt_tokens_details.cached_tokens == expected_cached(n)
    # on the wire
    status, body, _ = raw(auth_srv, "POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": p, "max_tokens": 1}).encode())
    assert status == 200
    assert json.loads(body)["usage"] == {"prompt_tokens": 40, "completion_tokens": 1,
                                         "total_tokens": 41,
                                         "prompt_tokens_details": {"cached_tokens": 32}}


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_openai_streamed_usage_chunk_reports_cached_tokens(auth_srv, kind):
    c = client(auth_srv)
    p = fresh(40)
    for want in (0, None):
        if kind == "chat":
            msgs = [{"role": "user", "content": p}]
            n = len(MockTokenizer().apply_chat_template(msgs))
            chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                                    stream=True,
                                                    stream_options={"include_usage": True}))
        else:
            n = 40
            chunks = list(c.completions.create(model=MODEL, prompt=p, max_tokens=4, stream=True,
                                               stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and all(ch.usage is None for ch in chunks[:-1])
        got = chunks[-1].usage.prompt_tokens_details.cached_tokens
        assert got == (expected_cached(n) if want is None else want)


def _jsonl(lines) -> io.BytesIO:
    f = io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())
    f.name = "input.jsonl"
    return f


def test_openai_batch_output_lines_carry_cached_tokens(auth_srv):
    c = client(auth_srv)
    p = fresh(40)
    c.completions.create(model=MODEL, prompt=p, max_tokens=1)  # tenant A computes p
    prompts = [p + "-0", p + "-1", fresh(40)]
    lines = [{"custom_id": f"c-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": q, "max_tokens": 2}} for i, q in enumerate(prompts)]
    f = c.files.create(file=_jsonl(lines), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
    assert wait_until(lambda: c.batches.retrieve(b.id).status == "completed", timeout=20,
                      interval=0.05)
    b = c.batches.retrieve(b.id)
    out = [json.loads(ln) for ln in c.files.content(b.output_file_id).text.splitlines()]
    usage = {ln["custom_id"]: ln["response"]["body"]["usage"] for ln in out}
    assert [usage[f"c-{i}"]["prompt_tokens_details"]["cached_tokens"] for i in range(3)] == [32, 32, 0]
    # tenant B's identical batch hits nothing of A's
    cb = client(auth_srv, TOKEN_B)
    f = cb.files.create(file=_jsonl(lines[:1]), purpose="batch")
    b = cb.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
    assert wait_until(lambda: cb.batches.retrieve(b.id).status == "completed", timeout=20,
                      interval=0.05)
    b = cb.batches.retrieve(b.id)
    [ln] = [json.loads(x) for x in cb.files.content(b.output_file_id).text.splitlines()]
    assert ln["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_render_usage_and_stored_results():
    assert render.usage(10, 2, 8) == {"prompt_tokens": 10, "completion_tokens": 2,
                                      "total_tokens": 12,
                                      "prompt_tokens_details": {"cached_tokens": 8}}
    r = pb.BatchResult(index=0, text="x", finish_reason=pb.FINISH_REASON_STOP,
                       usage=pb.Usage(prompt_tokens=40, completion_tokens=1, num_cached_tokens=32))
    assert render.Answer.from_result(r).cached_tokens == 32
    old = pb.BatchResult(index=0, finish_reason=pb.FINISH_REASON_STOP,
                         usage=pb.Usage(prompt_tokens=4, completion_tokens=1))
    assert render.Answer.from_result(old).cached_tokens == 0  # stored before the field existed


# ---- stats and /metrics ---------------------------------------------------------------------
_metric = metric  # tests/metrics_helpers.py: labels matched whatever else (model_name)


def test_stats_and_metrics_count_prefix_cache_use(tmp_path):
    s = start_http_server(tmp_path, engine=MockEngine(num_blocks=4))  # remembers 4 blocks
    try:
        p = fresh(40)
        with Client(s.target) as g:
            list(g.generate(p, max_tokens=2))
            list(g.generate(p, max_tokens=2))  # 32 hit
            r = client(s).completions.create(model=MODEL, prompt=p, max_tokens=2,
                                             extra_body={"service_tier": "flex"})
            assert r.usage.prompt_tokens_details.cached_tokens == 32
            list(g.generate(fresh(40), max_tokens=2))
            list(g.generate(fresh(40), max_tokens=2))  # six blocks for four places: 2 evicted
            assert wait_until(lambda: g.stats()["online_in_flight"] == 0)
            stats = g.stats()
        assert stats["prefix_cache_queries_online"] == 160
        assert stats["prefix_cache_hits_online"] == 32
        assert stats["prefix_cache_queries_offline"] == 40
        assert stats["prefix_cache_hits_offline"] == 32
        assert stats["kv_blocks_cached_free"] == 4 and stats["prefix_cache_evictions"] == 2
        text = raw(s, "GET", "/metrics", token=None)[1].decode()
        for cls in ("online", "offline"):
            lab = f'{{class="{cls}"}}'
            assert _metric(text, "conserve_prefix_cache_queries_total", lab) == \
                stats[f"prefix_cache_queries_{cls}"]
            assert _metric(text, "conserve_prefix_cache_hits_total", lab) == \
                stats[f"prefix_cache_hits_{cls}"]
        assert _metric(text, "conserve_kv_blocks_cached_free") == 4
        assert _metric(text, "conserve_prefix_cache_evictions_total") == 2
        assert "# TYPE conserve_prefix_cache_hits_total counter" in text
        assert "# TYPE conserve_kv_blocks_cached_free gauge" in text
    finally:
        s.stop()


# ---- flags ----------------------------------------------------------------------------------
def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    server_main.add_arguments(p)
    return p


def test_serve_flags_for_prefix_caching():
    p = _serve_parser()
    text = " ".join(p.format_help().split())  # what `serve --help` prints
    for flag in ("--share-prefix-cache-across-tenants", "--no-share-prefix-cache-across-tenants",
                 "--enable-prefix-caching", "--no-enable-prefix-caching"):
        assert flag in text
    assert server_config_from_args(p.parse_args([])).options.share_prefix_cache_across_tenants is False
    cfg = server_config_from_args(p.parse_args(["--share-prefix-cache-across-tenants"]))
    assert cfg.options.share_prefix_cache_across_tenants is True
    assert ServerConfig().options.share_prefix_cache_across_tenants is False


@pytest.mark.parametrize("flags,on", [([], True), (["--no-enable-prefix-caching"], False)])
def test_mock_engine_follows_enable_prefix_caching(flags, on):
    engine, config = server_main.build_engine(_serve_parser().parse_args(["--model", "mock", *flags]))
    try:
        assert config.enable_prefix_caching is on and engine.enable_prefix_caching is on
        ids = list(range(3, 43))
        assert [_final(engine, ids).num_cached_tokens for _ in range(2)] == [0, 32 if on else 0]
    finally:
        engine.shutdown()
