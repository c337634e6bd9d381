"""Restore path A/B, same process, alternating (8 rounds): 64 blocks (1024 tokens) from a host
pool into the default model's caches at bench_coserve's geometry (321 blocks).
  fresh:   pool rows fancy-indexed into a fresh array (16-byte aligned: device_put copies it)
  staging: HostPool.gather into the reused 64-byte-aligned buffer (device_put aliases it)
Both end with the scatter done and the same cache contents (asserted).
    PYTHONPATH=. python results/restore_staging_ab_probe.py
Result on a quiet machine (2026-11-30): fresh median 36.3 ms (min 30.7), staging median
31.0 ms (min 27.3); with np.take in its default mode="raise", which buffers `out`, staging
was slower (50.5 vs 38.4 ms).
"""
import time

import jax
import numpy as np

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.kv.host_pool import HostPool
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.kv_transfer import KVTransfer
from conserve_jax.runtime.model_runner import ModelRunner

m = load_model("default")
cfg = EngineConfig(model="default", max_model_len=1280, max_num_seqs=16,
                   cache=CacheConfig(num_blocks=321))
r = ModelRunner(m.config, m.params, cfg)
tr = KVTransfer(r)
tr.warmup()
pool = HostPool(200, tr.block_shape, np.float32)
pool.data[:] = np.random.default_rng(0).standard_normal(pool.data.shape, dtype=np.float32)
slots = [int(x) for x in np.random.default_rng(1).permutation(200)[:64]]
padded = slots + [slots[0]] * (tr.padded_count(64) - 64)
dev = list(range(100, 164))


def fresh():
    tr.scatter(dev, pool.data[padded])


def staging():
    tr.scatter(dev, pool.gather(padded))


res = {"fresh": [], "staging": []}
ref = None
for i in range(9):
    order = (("fresh", fresh), ("staging", staging))
    for name, f in (order if i % 2 == 0 else order[::-1]):
        time.sleep(0.05)
        t = time.perf_counter()
        f()
        jax.block_until_ready(r.caches)
        dt = time.perf_counter() - t
        if i:  # round 0 warms both up
            res[name].append(dt)
        got = np.asarray(r.caches[7][1][:, 100:164])
        ref = got if ref is None else ref
        assert np.array_equal(got, ref)
for k, v in res.items():
    print(f"restore {k}: median {1e3 * np.median(v):.1f} ms, min {1e3 * min(v):.1f} ms, "
          f"all {[round(1e3 * x) for x in v]}")
