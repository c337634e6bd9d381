"""Helpers for co-serving tests: build engines on tiny presets, run request mixes, and
collect outputs and allocator state."""
from __future__ import annotations

import time

from conserve_jax.engine_args import engine_config
from conserve_jax.engine.engine import Engine
from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass
from conserve_jax.models.loader import load_model
from conserve_jax.sampling_params import SamplingParams

_MODELS = {}


def model(name="random:small"):
    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


def engine(policy="conserve", num_blocks=64, host_pool_bytes=1 << 26, name="random:small",
           **kw) -> Engine:
    base = dict(max_model_len=512, max_num_seqs=8, max_prefill_tokens=128, max_prefill_seqs=2,
                safepoint_interval=1, warmup=False)  # warm-up: test_no_recompile
    base.update(kw)
    cfg = engine_config(model=name, policy=policy, block_size=16, num_blocks=num_blocks,
                        host_pool_bytes=host_pool_bytes, **base)
    return Engine(cfg, loaded=model(name))


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def req(rid, prompt, n, online=False, ttft=None, tpot=None):
    cls = RequestClass.ONLINE if online else RequestClass.OFFLINE
    return GenerationRequest(rid, list(prompt), greedy(n), cls, SLO(ttft, tpot))


def collect(stream, timeout=120.0):
    toks = []
    deadline = time.monotonic() + timeout
    while True:
        out = stream.get(timeout=max(0.01, deadline - time.monotonic()))
        toks += out.token_ids
        if out.finished:
            return toks, out.finish_reason


def prompts(n, length, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(5, 2000, length + 7 * i)] for i in range(n)]


def wait_until(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def assert_no_leaks(eng: Engine):
    wait_until(lambda: not eng.scheduler.has_work and not eng._seqs)
    assert eng.kv.num_free == eng.kv.capacity
    assert eng.kv.used_online == 0 and eng.kv.used_offline == 0
    if eng.checkpointer is not None:
        eng.checkpointer.wait_pending()
        assert eng.checkpointer.pool.num_free == eng.checkpointer.pool.num_slots
