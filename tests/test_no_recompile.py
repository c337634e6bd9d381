"""After warm-up, serving never compiles: every shape that reaches jitted code is one of
the warmed buckets, whatever the mix of prompt lengths, batch sizes, sampling modes,
online and offline requests, evictions and restores from the host checkpoint; and no
serving call is a first call of its key, which the step watchdog would not count
(runtime/step_watchdog.py)."""
import pytest

from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass
from conserve_jax.sampling_params import SamplingParams
from tests.coserve_helpers import collect, engine, wait_until


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["cache-off", "cache-on"])
def test_serving_does_not_recompile_after_warmup(prefix_caching):
    # a small KV cache, so that online requests evict offline ones, which resume from host
    # (with the prefix cache on, mostly from their blocks still cached on device instead)
    eng = engine(policy="conserve", num_blocks=30, name="random:tiny", warmup=True,
                 max_model_len=256, max_num_seqs=4, max_prefill_tokens=64, max_prefill_seqs=1,
                 enable_prefix_caching=prefix_caching)
    try:
        before = eng.compiled_count()
        assert before > 0
        warmed = eng.runner.first_calls.keys()
        lengths = (1, 5, 31, 64, 65, 100, 7, 2)
        params = [SamplingParams(max_tokens=m, temperature=t, top_p=p, top_k=k, logprobs=lp,
                                 ignore_eos=True)
                  for m, t, p, k, lp in [(120, 0, 1, 0, None), (100, 1.0, 1, 0, 2),
                                         (110, 0.7, 0.9, 0, None), (90, 1.0, 1, 5, 0),
                                         (25, 0, 1, 0, 20), (10, 1.0, 0.5, 3, None),
                                         (40, 0, 1, 0, None), (1, 0, 1, 0, None)]]
        reqs = [GenerationRequest(f"r{i}", [3 + i % 50] * n, sp,
                                  RequestClass.OFFLINE if i < 4 else RequestClass.ONLINE,
                                  SLO(30.0, 30.0))
                for i, (n, sp) in enumerate(zip(lengths, params))]
        offline = [eng.submit(r) for r in reqs[:4]]
        wait_until(lambda: eng.stats().offline_tokens_total >= 8)
        online = [eng.submit(r) for r in reqs[4:]]
        outs = [collect(s) for s in offline + online]
        assert [len(t) for t, _ in outs] == [p.max_tokens for p in params]
        assert eng.scheduler.counters.evictions > 0
        if not prefix_caching:
            assert eng.scheduler.counters.restored_tokens > 0
        assert eng.compiled_count() == before
        assert eng.runner.first_calls.keys() == warmed
    finally:
        eng.shutdown()
