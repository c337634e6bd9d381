"""Prefix caching through the serving faces over the real JAX engine (tiny random model,
auth on with two tenants): a repeated prompt reports its cached full blocks on gRPC (final
chunk, batch results) and HTTP (`usage.prompt_tokens_details.cached_tokens`) with the same
greedy tokens, another tenant's identical prompt hits nothing, and GetServerStats and
/metrics count the queries and hits."""
from __future__ import annotations

import openai
import pytest

from conserve_jax.client import Client
from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.engine.engine import Engine
from tests.conftest_server import start_server, wait_until
from tests.metrics_helpers import metric
from tests.openai_helpers import TOKEN_A, TOKEN_B, raw

MODEL = "random:tiny"
BLOCK = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    eng = Engine(EngineConfig(warmup=False, model=MODEL, policy="conserve", max_model_len=256,
                              max_num_seqs=4, max_prefill_tokens=64,
                              cache=CacheConfig(num_blocks=128, block_size=BLOCK)))
    srv = start_server(tmp_path_factory.mktemp("data"), engine=eng, http_port=0,
                       served_model_name=MODEL, auth_tokens=[TOKEN_A, TOKEN_B])
    yield srv
    srv.stop()


def _greedy(c: Client, ids):
    chunks = list(c.generate(token_ids=ids, max_tokens=6, temperature=0.0, ignore_eos=True))
    return [t for ch in chunks for t in ch.token_ids], chunks[-1].usage.num_cached_tokens


def test_real_engine_reports_cached_tokens_per_tenant_on_every_face(server):
    ids = [(7 * i + 3) % 250 + 2 for i in range(40)]  # 40 tokens: two full blocks
    with Client(server.target, token=TOKEN_A) as a, Client(server.target, token=TOKEN_B) as b:
        before = a.stats()
        ref, n0 = _greedy(a, ids)
        again, n1 = _greedy(a, ids)
        assert (n0, n1) == (0, 32) and again == ref  # the cached KV gives the same tokens
        other, n2 = _greedy(b, ids)
        assert n2 == 0 and other == ref  # tenant B never reuses A's blocks
        bid = a.submit_batch([{"token_ids": ids + [11, 12], "max_tokens": 6, "temperature": 0.0,
                               "ignore_eos": True}])
        assert wait_until(lambda: a.get_batch(bid).state == "completed", timeout=120)
        [res] = list(a.batch_results(bid))
        assert res.usage.num_cached_tokens == 32 and res.finish_reason == "length"
        after = a.stats()
    http = openai.OpenAI(base_url=f"http://127.0.0.1:{server.app.http_port}/v1", api_key=TOKEN_B,
                         max_retries=0, timeout=120)
    r = http.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0.0,
                                extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens_details.cached_tokens == 32  # B's own blocks, from its gRPC call
    d = {k: after[k] - before[k] for k in ("prefix_cache_queries_online", "prefix_cache_hits_online",
                                           "prefix_cache_queries_offline", "prefix_cache_hits_offline")}
    assert d == {"prefix_cache_queries_online": 120, "prefix_cache_hits_online": 32,
                 "prefix_cache_queries_offline": 42, "prefix_cache_hits_offline": 32}
    text = raw(server, "GET", "/metrics", token=None)[1].decode()
    with Client(server.target, token=TOKEN_A) as a:
        now = a.stats()
    for cls in ("online", "offline"):
        for what in ("queries", "hits"):
            assert metric(text, f"conserve_prefix_cache_{what}_total", f'{{class="{cls}"}}') \
                == now[f"prefix_cache_{what}_{cls}"]
    assert metric(text, "conserve_kv_blocks_cached_free") >= 2
