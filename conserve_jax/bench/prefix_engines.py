"""The prefix-caching benchmark's engines and the request primitives every run uses (a helper
of `prefix`, run as scripts/bench_prefix.py).

- `batch_config` / `coserve_config`: the EngineConfig of the on/off engines (offline, chat,
  nosharing: conserve, KV for --kv-seqs full contexts unless --num-blocks/--kv-cache-tokens)
  and of a co-serving run (bench_coserve's, KV for --coserve-kv-seqs full contexts), from
  `prefix.parse_args`'s namespace.
- `Engines`: builds engines from one loaded model; the first of each KV geometry compiles
  every executable (--warmup all), later ones adopt its jitted functions (bench_coserve's
  SharedCompiled); each is warmed (`warm`) before it is handed out. Its `setup` dict (build
  and compile times) goes into the result JSON unchanged.
- `greedy`, `collect`, `settled`: greedy ignore_eos sampling of n tokens; one stream read to
  its end (each delta waits at most GET_TIMEOUT_S, so a hung engine fails the benchmark
  rather than hanging it); the engine's stats once it holds no request.
Nothing here measures: the timed runs are prefix_runs', the cases prefix_cases'.
"""
from __future__ import annotations

import time

import numpy as np

from conserve_jax.bench import coserve as cs
from conserve_jax.bench import prefix_workload as wl
from conserve_jax.config import EngineConfig
from conserve_jax.engine.engine import Engine
from conserve_jax.engine_api import EngineStats, GenerationRequest, RequestClass
from conserve_jax.engine_args import engine_config_from_args
from conserve_jax.sampling_params import SamplingParams

GET_TIMEOUT_S = 1800.0  # one stream delta; a hung engine fails the benchmark, not hangs it


def _blocks_per_seq(a) -> int:
    return -(-a.max_model_len // a.block_size)


def batch_config(a, cache_on: bool) -> EngineConfig:
    """The on/off engines of offline, chat and nosharing: conserve, KV for --kv-seqs full
    contexts unless --num-blocks / --kv-cache-tokens say."""
    nb = a.num_blocks or a.kv_seqs * _blocks_per_seq(a) + 1
    return engine_config_from_args(a, policy="conserve", num_blocks=nb, default_ttft_s=a.ttft,
                                   default_tpot_s=a.tpot, warmup=False,
                                   enable_prefix_caching=cache_on)


def coserve_config(a, policy: str, cache_on: bool) -> EngineConfig:
    """A co-serving run's engine: bench_coserve's, KV for --coserve-kv-seqs full contexts."""
    nb = a.coserve_kv_seqs * _blocks_per_seq(a) + 1
    return engine_config_from_args(a, policy=policy, num_blocks=nb, kv_cache_tokens=None,
                                   default_ttft_s=a.ttft, default_tpot_s=a.tpot, warmup=False,
                                   enable_prefix_caching=cache_on)


class Engines:
    """Builds engines from one loaded model: the first of each KV geometry compiles every
    executable (--warmup all), later ones adopt its jitted functions; each engine serves a
    warm-up mix before it is handed out."""

    def __init__(self, a, loaded) -> None:
        self.a, self.loaded = a, loaded
        self.shared: dict = {}
        self.setup: dict = {"engine_builds_s": [], "warmup_compiles_s": {}}

    def build(self, cfg: EngineConfig, geometry: str) -> Engine:
        shared = self.shared.setdefault(geometry, cs.SharedCompiled())
        first = not shared.fns
        t = time.perf_counter()
        eng = Engine(cfg, loaded=self.loaded,
                     warmup=first and self.a.warmup_buckets == "all")
        if first:
            self.setup["warmup_compiles_s"][geometry] = time.perf_counter() - t
        shared.adopt(eng)
        warm(eng, self.loaded.config.vocab_size, cfg.cache.block_size)
        self.setup["engine_builds_s"].append(time.perf_counter() - t)
        return eng


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def collect(stream) -> tuple:
    """(token ids, final delta, time of the first token or None) of one stream."""
    toks, first = [], None
    while True:
        out = stream.get(timeout=GET_TIMEOUT_S)
        if out.token_ids and first is None:
            first = time.monotonic()
        toks += out.token_ids
        if out.finished:
            return toks, out, first


def warm(eng: Engine, vocab: int, bs: int) -> None:
    """A short mix through a new engine (offline twins sharing two blocks where the policy
    takes offline work, and one online request), so that first-use costs stay out of the
    measured runs."""
    rng = np.random.default_rng(987654321)
    n = max(1, min(2 * bs + 5, eng.max_model_len // 2 - 8))
    shared = wl.ids(rng, n, vocab)
    reqs = [GenerationRequest("warm-on", wl.ids(rng, n, vocab), greedy(4), RequestClass.ONLINE)]
    if eng.policy.accepts(GenerationRequest("x", [5], request_class=RequestClass.OFFLINE)):
        reqs += [GenerationRequest(f"warm-off-{i}", shared + [5 + i], greedy(4),
                                   RequestClass.OFFLINE) for i in range(2)]
    for s in [eng.submit(r) for r in reqs]:
        collect(s)
    settled(eng)


def settled(eng: Engine, timeout_s: float = 60.0) -> EngineStats:
    """The engine's stats once it holds no request (the snapshot follows the last finish by
    up to one loop pass)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = eng.stats()
        busy = st.online_waiting + st.online_running + st.offline_waiting + st.offline_running
        if not busy or time.monotonic() > deadline:
            return st
        time.sleep(0.005)

