"""Engine limits: a KV cache smaller than the context lowers the context (one request must
always fit, or it would wait forever); prompts beyond it are refused up front."""
import pytest

from tests.coserve_helpers import collect, engine, req


def test_small_cache_lowers_context_and_refuses_long_prompts():
    eng = engine(policy="conserve", num_blocks=5)  # 4 usable blocks of 16 tokens
    try:
        assert eng.max_model_len == 64
        with pytest.raises(ValueError, match="prompt"):
            eng.submit(req("long", list(range(5, 105)), 4))
        toks, reason = collect(eng.submit(req("ok", list(range(5, 45)), 100)))
        assert reason == "length" and 40 + len(toks) == 64
    finally:
        eng.shutdown()
