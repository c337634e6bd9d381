"""The cached latency profile is keyed by the layout: a run with another number of
pipeline stages or processes (same per-process tp) must profile, not reuse another's."""
from __future__ import annotations

from types import SimpleNamespace

from conserve_jax.config import EngineConfig
from conserve_jax.scheduling import latency_cache


def _runner():
    return SimpleNamespace(cfg="model", dtype="float32", weight_dtype="float32",
                           buckets="buckets", block_size=16, layers_per_call=2)


def test_layouts_get_their_own_cached_profile(tmp_path):
    base = dict(compilation_cache_dir=str(tmp_path), tp=2)
    one = latency_cache._cache_path(_runner(), EngineConfig(**base))
    again = latency_cache._cache_path(_runner(), EngineConfig(**base))
    two = latency_cache._cache_path(_runner(), EngineConfig(
        **base, pp=2, num_processes=2, coordinator_address="127.0.0.1:1"))
    three = latency_cache._cache_path(_runner(), EngineConfig(
        **base, pp=3, num_processes=3, coordinator_address="127.0.0.1:1"))
    assert one == again
    assert len({one, two, three}) == 3
