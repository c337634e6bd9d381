"""The latency model: fitting recovers known coefficients; predictions on this machine fall
within the stated error of measured iterations (median relative error <= 35%, 90th
percentile <= 80%, on a tiny model whose iterations last milliseconds, where timer and
dispatch noise weigh most; runs here measured medians of 0.06-0.23); the online
correction follows a drift; files round-trip."""
import statistics
import time

import numpy as np
import pytest

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.scheduling.latency_model import LatencyModel, WorkShape, features
from conserve_jax.scheduling.profiler import profile, synthetic_plan

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


def test_predictions_match_measured_iterations():
    """As the engine uses it: fitted by the profiling sweep, then corrected online from
    measured iterations (the first 12 fresh points), then judged on 20 more fresh points
    off the profiling grid. Iteration times are the median of 5 runs, as when profiling."""
    loaded = load_model("random:small")
    cfg = EngineConfig(max_model_len=512, max_num_seqs=16, max_prefill_tokens=256,
                       cache=CacheConfig(num_blocks=512))
    runner = ModelRunner(loaded.config, loaded.params, cfg)
    model = LatencyModel.fit(profile(runner, quick=False, repeats=5), runner.buckets,
                             runner.block_size, loaded.config.num_layers)
    rng = np.random.default_rng(1)
    errs = []
    for i in range(32):
        d = int(rng.integers(0, 17))
        t = int(rng.choice([0, int(rng.integers(8, 257))])) if d else int(rng.integers(8, 257))
        c = int(rng.integers(max(t, 1), 512))
        plan, w = synthetic_plan(runner, d, t, c)
        runner.execute(plan)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            runner.execute(plan)
            times.append(time.perf_counter() - t0)
        measured = statistics.median(times)
        if i < 12:
            for _ in range(5):
                model.observe(w, measured)
        else:
            errs.append(abs(model.predict(w) - measured) / measured)
    print(f"latency model relative error: median {statistics.median(errs):.3f}, "
          f"p90 {np.percentile(errs, 90):.3f}, correction {model.correction:.3f}, "
          f"fit {model.fit_error}")
    assert statistics.median(errs) <= 0.35, errs
    assert float(np.percentile(errs, 90)) <= 0.8, errs
