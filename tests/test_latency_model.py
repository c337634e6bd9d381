"""The latency model: fitting recovers known coefficients; the online correction follows a
drift; files round-trip. Deterministic only: accuracy against measured iterations depends
on machine load and is a benchmark (scripts/bench_latency_model.py), not a unit test."""

import numpy as np
import pytest

from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.scheduling.latency_model import LatencyModel, WorkShape, features

BUCKETS = BucketSet.build(16, 256, 2, 32)


def _shapes(rng, n):
    out = []
    for _ in range(n):
        w = WorkShape()
        for _ in range(int(rng.integers(0, 16))):
            w = w.add_decode(int(rng.integers(1, 512)))
        if rng.random() < 0.6 or w.num_decodes == 0:
            t = int(rng.integers(1, 256))
            w = w.add_prefill(t, t + int(rng.integers(0, 256)), True)
        out.append(w)
    return out


def test_fit_recovers_known_coefficients():
    true = np.array([1e-3, 2e-5, 3e-8, 1e-8, 2e-9, 5e-5])
    rng = np.random.default_rng(0)
    samples = [(w, float(features(w, BUCKETS, 16) @ true)) for w in _shapes(rng, 80)]
    m = LatencyModel.fit(samples, BUCKETS, 16, num_layers=4)
    np.testing.assert_allclose(m.coef, true, rtol=1e-6)
    assert m.fit_error["max_rel_error"] < 1e-6


def test_online_correction_tracks_a_slowdown():
    true = np.array([1e-3, 2e-5, 3e-8, 1e-8, 2e-9, 5e-5])
    m = LatencyModel(true, BUCKETS, 16, 4)
    w = WorkShape().add_decode(100)
    for _ in range(200):
        m.observe(w, 1.5 * float(features(w, BUCKETS, 16) @ true))
    assert m.predict(w) == pytest.approx(1.5 * float(features(w, BUCKETS, 16) @ true), rel=0.02)


def test_save_and_load(tmp_path):
    m = LatencyModel(np.array([1e-3, 2e-5, 3e-8, 1e-8, 2e-9, 5e-5]), BUCKETS, 16, 4,
                     fit_error={"median_rel_error": 0.1})
    m.save(tmp_path / "lm.json")
    back = LatencyModel.load(str(tmp_path / "lm.json"), BUCKETS, 16, 4)
    np.testing.assert_array_equal(back.coef, m.coef)
    with pytest.raises(ValueError, match="layers"):
        LatencyModel.load(str(tmp_path / "lm.json"), BUCKETS, 16, 5)


def test_profile_points_stay_inside_the_model_length():
    """max_prefill_tokens past max_model_len (e.g. random:tiny --max-model-len 256 with the
    default 512 prefill tokens): no profiled prefill chunk or context runs past the model
    length (one did, and the profiler failed building its block table)."""
    from types import SimpleNamespace

    from conserve_jax.runtime.buckets import BucketSet
    from conserve_jax.scheduling.profiler import sweep_points
    runner = SimpleNamespace(
        buckets=BucketSet.build(4, 512, 1, 16), block_size=16, max_blocks_per_seq=16,
        engine_cfg=SimpleNamespace(max_prefill_tokens=512))
    for quick in (False, True):
        pts = sweep_points(runner, quick)
        assert pts and all(t <= ctx <= 256 for _, t, ctx in pts), pts
        assert max(t for _, t, _ in pts) == 256
