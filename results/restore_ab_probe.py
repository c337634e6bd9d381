"""Old vs new restore path, same process, alternating: 64 blocks (1024 tokens) from a host
pool into the default model's caches at bench_coserve's geometry (321 blocks)."""
import time, numpy as np, jax, jax.numpy as jnp
from conserve_jax.config import EngineConfig, CacheConfig
from conserve_jax.models.loader import load_model
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.kv_transfer import KVTransfer
m = load_model("default")
cfg = EngineConfig(model="default", max_model_len=1280, max_num_seqs=16, cache=CacheConfig(num_blocks=321))
r = ModelRunner(m.config, m.params, cfg)
tr = KVTransfer(r); tr.warmup()
def _old(caches, ids, data):
    return [(k.at[:, ids].set(data[i, 0]), v.at[:, ids].set(data[i, 1])) for i, (k, v) in enumerate(caches)]
old = jax.jit(_old, donate_argnums=(0,))
pool = np.random.default_rng(0).standard_normal((200,) + tr.block_shape).astype(np.float32)
slots = list(np.random.default_rng(1).permutation(200)[:64])
dev = list(range(100, 164))
def run_old():
    blocks = pool[slots]
    ids = tr._padded(dev)
    data = np.zeros((len(ids),) + tr.block_shape, blocks.dtype); data[:64] = blocks
    data = np.ascontiguousarray(np.moveaxis(data, 0, 3))
    r.caches = old(r.caches, ids, data)
def run_new():
    tr.scatter(dev, pool[slots + [slots[0]] * (tr.padded_count(64) - 64)])
for f in (run_old, run_new):
    f(); jax.block_until_ready(r.caches)
ref = None
res = {"old": [], "new": []}
for i in range(8):
    for name, f in ((("old", run_old), ("new", run_new)) if i % 2 == 0 else (("new", run_new), ("old", run_old))):
        time.sleep(0.05)
        t = time.perf_counter(); f(); jax.block_until_ready(r.caches); res[name].append(time.perf_counter() - t)
        got = np.asarray(r.caches[7][1][:, 100:164])
        ref = got if ref is None else ref
        assert np.array_equal(got, ref)
for k, v in res.items(): print(f"restore {k}: median {1e3*np.median(v):.1f} ms, min {1e3*min(v):.1f} ms, all {[round(1e3*x) for x in v]}")
