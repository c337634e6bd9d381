"""The `ecoserve` policy and offline KV reservation in a real engine (tiny random model):
greedy outputs identical to `fcfs` under KV pressure and mispredictions; stats; the
`kv_cache_tokens` and `expected_output_tokens` settings."""
import pytest

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass
from conserve_jax.entrypoints.llm import LLM
from conserve_jax.sampling_params import SamplingParams

from tests.coserve_helpers import assert_no_leaks, collect, engine, prompts

PROMPTS = prompts(6, 40, seed=5)
LENGTHS = [4, 70, 12, 50, 6, 90]
HINTS = [4, 5, None, 200, None, 10]  # some right, some far off


def _requests(wave, online=True):
    cls = RequestClass.ONLINE if online else RequestClass.OFFLINE
    return [GenerationRequest(f"r{i}-{wave}", p, SamplingParams(max_tokens=n, temperature=0.0,
                                                                ignore_eos=True),
                              cls, SLO(), expected_output_tokens=h)
            for i, (p, n, h) in enumerate(zip(PROMPTS, LENGTHS, HINTS))]


def _run(policy, num_blocks, online=True, **kw):
    eng = engine(policy=policy, num_blocks=num_blocks, **kw)
    try:
        outs = {}
        for wave in range(2):  # two waves: by the second the predictor has learned
            streams = {r.request_id: eng.submit(r) for r in _requests(wave, online)}
            outs.update({k: collect(s)[0] for k, s in streams.items()})
        st = eng.stats()
        assert_no_leaks(eng)
        return outs, st
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def reference():
    return _run("fcfs", num_blocks=256)[0]


def test_ecoserve_greedy_outputs_identical_to_fcfs_under_kv_pressure(reference):
    # 24 blocks of 16 tokens: the six requests (40-75 prompt + up to 90 tokens) do not fit
    # together, so reservations, loans, growth and waiting all happen
    outs, st = _run("ecoserve", num_blocks=25)
    assert outs == reference
    assert st.predictor_observed == 12
    assert st.kv_reservations_grown > 0  # the wrong hints were outlived
    assert st.predictor_mae_tokens > 0
    assert 0.0 <= st.predictor_within_25pct <= 1.0


def test_conserve_offline_kv_reservation_outputs_identical(reference):
    outs, st = _run("conserve", num_blocks=25, online=False, offline_kv_reservation=True)
    assert outs == reference
    assert st.predictor_observed == 12


def test_kv_cache_tokens_sizes_the_cache():
    cfg = EngineConfig(kv_cache_tokens=100, cache=CacheConfig(block_size=16))
    assert cfg.kv_cache_blocks == 8  # 7 blocks hold 100 tokens, plus the scratch block
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        EngineConfig(kv_cache_tokens=0)
    eng = engine(policy="ecoserve", num_blocks=None, kv_cache_tokens=300)
    try:
        assert eng.kv.capacity == 19  # ceil(300 / 16)
        assert eng.max_model_len == 19 * 16
    finally:
        eng.shutdown()


def test_expected_output_tokens_validated_and_passed_through():
    with pytest.raises(ValueError, match="expected_output_tokens"):
        SamplingParams(expected_output_tokens=0).validate()
    eng = engine(policy="ecoserve", num_blocks=64)
    try:
        with pytest.raises(ValueError, match="expected_output_tokens"):
            eng.submit(GenerationRequest("bad", [5, 6, 7], expected_output_tokens=-3))
        hints = []
        orig = eng.policy.on_arrival
        eng.policy.on_arrival = lambda s: (hints.append(s.request.expected_output_tokens),
                                           orig(s))
        sp = SamplingParams(max_tokens=3, temperature=0.0, expected_output_tokens=2)
        out = collect(eng.submit(GenerationRequest("ok", [5, 6, 7, 8], sp,
                                                   expected_output_tokens=2)))[0]
        assert len(out) == 3 and hints == [2]
    finally:
        eng.shutdown()


def test_llm_passes_hint_and_kv_cache_tokens():
    llm = LLM(warmup=False, model="random:tiny", policy="ecoserve", kv_cache_tokens=200, max_model_len=128,
              max_num_seqs=4, max_prefill_tokens=64)
    try:
        assert llm.engine.kv.capacity == 13
        hints = []
        orig = llm.engine.policy.on_arrival
        llm.engine.policy.on_arrival = lambda s: (hints.append(s.request.expected_output_tokens),
                                                  orig(s))
        out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0.0,
                                                          expected_output_tokens=7))
        assert len(out[0].token_ids) <= 3 and hints == [7]
    finally:
        llm.close()


def test_proto_hint_mapped_and_validated():
    from types import SimpleNamespace

    from conserve_jax.client import make_request
    from conserve_server.convert import build_request

    eng = SimpleNamespace(tokenizer=None, vocab_size=100, max_model_len=64)
    req = build_request(make_request(token_ids=[5, 6], expected_output_tokens=9), eng, "a",
                        RequestClass.ONLINE)
    assert req.expected_output_tokens == 9
    assert build_request(make_request(token_ids=[5, 6]), eng, "b",
                         RequestClass.ONLINE).expected_output_tokens is None
    with pytest.raises(ValueError, match="expected_output_tokens"):
        build_request(make_request(token_ids=[5, 6], expected_output_tokens=0), eng, "c",
                      RequestClass.ONLINE)
