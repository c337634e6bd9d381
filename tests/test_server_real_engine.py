"""The gRPC server over the real JAX engine (tiny random model): streamed generation equals
the engine's own greedy output, batches run as offline work, cancellation frees KV."""

import grpc
import pytest

from conserve_jax.client import Client
from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.engine.engine import Engine
from tests.conftest_server import start_server, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    eng = Engine(EngineConfig(warmup=False, model="random:tiny", policy="conserve", max_model_len=256,
                              max_num_seqs=4, max_prefill_tokens=64,
                              cache=CacheConfig(num_blocks=128)))
    srv = start_server(tmp_path_factory.mktemp("data"), engine=eng)
    yield srv
    srv.stop()


def test_generate_stream_matches_engine(server):
    from conserve_jax.engine_api import GenerationRequest
    from conserve_jax.sampling_params import SamplingParams

    ids = [5, 17, 99, 123, 7, 300]
    ref = server.engine.submit(GenerationRequest("ref", ids, SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True)))
    ref_ids = [t for d in ref for t in d.token_ids]
    with Client(server.target) as c:
        chunks = list(c.generate(token_ids=ids, max_tokens=12, temperature=0.0, ignore_eos=True))
        got = [t for ch in chunks for t in ch.token_ids]
        assert got == ref_ids
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == 6
        text = "".join(ch.text for ch in c.generate(
            messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.0))
        assert isinstance(text, str)


def test_batch_runs_offline_and_completes(server):
    with Client(server.target) as c:
        before = c.stats()["offline_tokens_total"]
        bid = c.submit_batch([{"token_ids": [9, 8, 7 + i], "max_tokens": 6, "temperature": 0.0,
                               "ignore_eos": True} for i in range(5)])
        assert wait_until(lambda: c.get_batch(bid).state == "completed", timeout=120)
        res = list(c.batch_results(bid))
        assert [r.index for r in res] == list(range(5))
        assert all(len(r.token_ids) == 6 and r.finish_reason == "length" for r in res)
        assert c.stats()["offline_tokens_total"] - before == 30


def test_cancel_frees_kv_on_real_engine(server):
    with Client(server.target) as c:
        stream = c.generate(token_ids=[3] * 50, max_tokens=200, temperature=0.0, ignore_eos=True)
        next(iter(stream))
        assert server.engine.kv.used_online > 0
        stream.cancel()
        assert wait_until(lambda: server.engine.kv.used_online == 0, timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate(token_ids=[100000], max_tokens=3))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "vocabulary" in e.value.details() or "token" in e.value.details()
