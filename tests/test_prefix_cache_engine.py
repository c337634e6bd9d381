"""Prefix caching in a running engine: outputs are token-identical with the cache on and
off (greedy and seeded sampling) for shared prefixes, partial-block boundaries, prompts
that are exact prefixes of others, chat turns, eviction and layer-wise preemption, a
suspend/resume across engines and tensor parallelism; hits are reported and counted;
salts never share; nothing leaks."""
from __future__ import annotations

import numpy as np
import pytest

from conserve_jax.engine_api import GenerationRequest, RequestClass
from conserve_jax.sampling_params import SamplingParams
from tests.coserve_helpers import assert_no_leaks, engine, req, wait_until

BS = 16
RNG = np.random.default_rng(11)
SHARED = [int(t) for t in RNG.integers(5, 2000, 5 * BS + 3)]  # ends mid-block
TAILS = [[int(t) for t in RNG.integers(5, 2000, n)] for n in (9, 20, 1, 37)]
N_OUT = 12


def _final(stream, timeout=180.0):
    toks = []
    while True:
        out = stream.get(timeout=timeout)
        toks += out.token_ids
        if out.finished:
            return toks, out


def _run(eng, requests, sequential=False):
    """{request id: (tokens, final delta)}; `sequential`: each after the one before."""
    if sequential:
        return {r.request_id: _final(eng.submit(r)) for r in requests}
    streams = {r.request_id: eng.submit(r) for r in requests}
    return {rid: _final(s) for rid, s in streams.items()}


def _sampled(rid, prompt, n=N_OUT, salt=None, online=False):
    sp = SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, seed=3, ignore_eos=True)
    return GenerationRequest(rid, list(prompt), sp,
                             RequestClass.ONLINE if online else RequestClass.OFFLINE,
                             cache_salt=salt)


def _workload():
    """Shared prefix + tails; a prompt that is an exact prefix of another (and one the
    other way round); a prompt exactly on a block boundary; greedy and sampled."""
    reqs = [req(f"g{i}", SHARED + t, N_OUT) for i, t in enumerate(TAILS)]
    reqs += [req("exact", SHARED[:4 * BS], N_OUT), req("longer", SHARED[:4 * BS] + TAILS[0], N_OUT),
             req("prefix-of-first", SHARED[:2 * BS + 5], N_OUT)]
    reqs += [_sampled(f"s{i}", SHARED + t) for i, t in enumerate(TAILS[:2])]
    return reqs


@pytest.fixture(scope="module")
def reference():
    eng = engine(policy="conserve", num_blocks=128, enable_prefix_caching=False)
    try:
        return {k: v[0] for k, v in _run(eng, _workload(), sequential=True).items()}
    finally:
        eng.shutdown()


@pytest.mark.parametrize("sequential", [True, False], ids=["one-by-one", "together"])
def test_shared_prefixes_are_token_identical_and_hit(reference, sequential):
    eng = engine(policy="conserve", num_blocks=128)
    try:
        got = _run(eng, _workload(), sequential=sequential)
        assert {k: v[0] for k, v in got.items()} == reference
        cached = {k: v[1].num_cached_tokens for k, v in got.items()}
        if sequential:  # every later request hits what the earlier ones computed
            assert cached["g0"] == 0
            assert all(cached[f"g{i}"] == 5 * BS for i in (1, 2, 3))
            assert cached["exact"] == 3 * BS  # its last block runs again (its last token)
            assert cached["longer"] == 4 * BS
            assert cached["prefix-of-first"] == 2 * BS
            assert cached["s0"] == 5 * BS  # g0's prompt again: all but its last block
            assert cached["s1"] == 6 * BS  # g1's prompt (103 tokens): 6 full blocks
        else:  # twins wait for the first to compute the prefix, then hit it
            assert sum(c > 0 for c in cached.values()) >= 8
        st = eng.stats()
        assert st.prefix_cache_hits_offline == sum(cached.values())
        assert st.prefix_cache_queries_offline == sum(len(r.prompt_token_ids)
                                                      for r in _workload())
        assert_no_leaks(eng)
        assert eng.kv.allocator.num_cached > 0  # kept for later requests
    finally:
        eng.shutdown()


def test_salts_never_share():
    eng = engine(policy="conserve", num_blocks=128)
    try:
        a = _final(eng.submit(_sampled("a", SHARED + TAILS[0], salt="tenant-a")))
        b = _final(eng.submit(_sampled("b", SHARED + TAILS[0], salt="tenant-b")))
        a2 = _final(eng.submit(_sampled("a2", SHARED + TAILS[0], salt="tenant-a")))
        assert a[1].num_cached_tokens == 0 and b[1].num_cached_tokens == 0
        assert a2[1].num_cached_tokens == 5 * BS
        assert a[0] == b[0] == a2[0]
    finally:
        eng.shutdown()


def test_chat_turns_hit_the_earlier_turn():
    eng = engine(policy="conserve", num_blocks=128)
    ref = engine(policy="conserve", num_blocks=128, enable_prefix_caching=False)
    try:
        turns = {}
        for e in (eng, ref):
            conv = list(SHARED)
            turns[e] = []
            for turn in range(3):
                toks, fin = _final(e.submit(req(f"t{turn}", conv, 8, online=True)))
                turns[e].append((toks, fin.num_cached_tokens))
                conv = conv + toks + TAILS[turn % len(TAILS)]
        assert [t for t, _ in turns[eng]] == [t for t, _ in turns[ref]]
        cached = [c for _, c in turns[eng]]
        assert cached[0] == 0
        # turn k reuses every full block of turn k-1's prompt and answer
        assert cached[1] == (len(SHARED) + 8 - 1) // BS * BS and cached[2] > cached[1]
        assert eng.stats().prefix_cache_hits_online == sum(cached)
    finally:
        eng.shutdown()
        ref.shutdown()


def test_eviction_and_preemption_keep_tokens_identical(reference):
    """A KV cache too small for the batch (evictions, host checkpoints that leave the hit
    blocks out) with online arrivals (layer-wise preemption)."""
    eng = engine(policy="conserve", num_blocks=26)
    try:
        offs = {r.request_id: eng.submit(r) for r in _workload()}
        wait_until(lambda: eng.stats().offline_tokens_total >= 4)
        ons = [eng.submit(req(f"on{i}", TAILS[3] * 3, 6, online=True)) for i in range(2)]
        got = {rid: _final(s)[0] for rid, s in offs.items()}
        for s in ons:
            _final(s)
        assert got == reference
        st = eng.stats()
        assert st.evictions > 0 or st.preemptions > 0
        assert st.prefix_cache_hits_offline > 0
        assert_no_leaks(eng)
    finally:
        eng.shutdown()


def test_suspend_and_resume_in_a_new_engine_with_hits(reference):
    """The first request computes the prefix; the second hits it. Both are suspended
    mid-decode and resumed in another engine: the hit blocks travel in the saved state
    (read from device), and the outputs are those of an uninterrupted run."""
    first = engine(policy="conserve", num_blocks=128)
    try:
        done = _final(first.submit(req("warm", SHARED + TAILS[1], 1)))  # caches the prefix
        assert done[1].finish_reason == "length"
        streams = {rid: first.submit(r) for rid, r in
                   (("g0", req("g0", SHARED + TAILS[0], N_OUT)),
                    ("s0", _sampled("s0", SHARED + TAILS[0])))}
        wait_until(lambda: first.stats().offline_tokens_total >= 1 + 2 * 4)
        saved = first.suspend_offline(list(streams))
        for s in streams.values():
            _final(s)
    finally:
        first.shutdown()
    assert set(saved) == {"g0", "s0"}
    for s in saved.values():
        assert s.num_saved_tokens >= 5 * BS  # the hit blocks are in it
    second = engine(policy="conserve", num_blocks=128)
    try:
        out = {rid: _final(second.submit(r, resume=saved[rid]))[0] for rid, r in
               (("g0", req("g0", SHARED + TAILS[0], N_OUT)),
                ("s0", _sampled("s0", SHARED + TAILS[0])))}
        assert out == {"g0": reference["g0"], "s0": reference["s0"]}
        assert second.stats().restored_tokens > 0
        assert_no_leaks(second)
    finally:
        second.shutdown()


def test_tensor_parallel_hits_are_token_identical(reference):
    eng = engine(policy="conserve", num_blocks=128, tp=2)
    try:
        got = _run(eng, _workload(), sequential=True)
        assert {k: v[0] for k, v in got.items()} == reference
        assert got["g1"][1].num_cached_tokens == 5 * BS
    finally:
        eng.shutdown()


def test_nothing_leaks_after_cancel_with_hits():
    eng = engine(policy="conserve", num_blocks=64)
    try:
        _final(eng.submit(req("w", SHARED + TAILS[0], 2)))
        streams = [eng.submit(req(f"c{i}", SHARED + t, 200)) for i, t in enumerate(TAILS)]
        wait_until(lambda: eng.stats().offline_tokens_total >= 10)
        for i in range(len(TAILS)):
            eng.cancel(f"c{i}")
        for s in streams:
            assert _final(s)[1].finish_reason == "cancelled"
        assert_no_leaks(eng)
        assert not eng.kv.allocator._ref  # every block free or cached-free
    finally:
        eng.shutdown()
