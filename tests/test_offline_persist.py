"""Offline work saved and resumed: the engine's suspend/resume (token-identical greedy and
seeded-sampling output, restored tokens counted), and the orbax checkpoint directory
(round trip, atomicity, size bound, mismatched or corrupted checkpoints discarded)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from conserve_jax.engine_api import GenerationRequest, RequestClass
from conserve_jax.kv.persist import CheckpointDir, SavedRequest
from conserve_jax.sampling_params import SamplingParams
from tests.coserve_helpers import collect, engine, prompts, req, wait_until

N = 40
PROMPTS = prompts(3, 50, seed=3)


def _collect_text(stream):
    toks, text = [], ""
    while True:
        out = stream.get(timeout=120)
        toks += out.token_ids
        text += out.text
        if out.finished:
            return toks, text, out


@pytest.fixture(scope="module")
def eng():
    e = engine(policy="conserve", num_blocks=64)
    yield e
    e.shutdown()


def _sampled(rid, prompt, n):
    return GenerationRequest(rid, list(prompt), SamplingParams(
        max_tokens=n, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
        RequestClass.OFFLINE)


def test_suspend_then_resume_is_token_identical(eng):
    reference = {f"r{i}": _collect_text(eng.submit(req(f"r{i}", p, N)))
                 for i, p in enumerate(PROMPTS)}
    ref_sampled = _collect_text(eng.submit(_sampled("s-ref", PROMPTS[0], N)))

    base = eng.stats().offline_tokens_total
    streams = {f"a{i}": eng.submit(req(f"a{i}", p, N)) for i, p in enumerate(PROMPTS)}
    streams["s"] = eng.submit(_sampled("s", PROMPTS[0], N))
    wait_until(lambda: eng.stats().offline_tokens_total >= base + 4 * 12)
    saved = eng.suspend_offline(list(streams))
    for s in streams.values():
        assert _collect_text(s)[2].finish_reason == "cancelled"
    assert saved, "something was running"
    assert any(s.num_saved_tokens > 0 and s.generated_ids for s in saved.values())
    st = eng.stats()
    restored_before, hits_before = st.restored_tokens, st.prefix_cache_hits_offline
    for rid, s in saved.items():
        assert s.num_saved_tokens == len(s.blocks) * 16
        assert s.num_saved_tokens <= len(s.prompt_ids) + len(s.generated_ids)

    for rid, s in saved.items():
        key = "r" + rid[1:] if rid != "s" else None
        new_req = req(rid + "-resumed", s.prompt_ids, N) if key else \
            _sampled("s-resumed", PROMPTS[0], N)
        toks, text, final = _collect_text(eng.submit(new_req, resume=s))
        ref = reference[key] if key else ref_sampled
        assert toks == ref[0]  # the first delta replays the tokens generated before
        assert text == ref[1]
        assert final.completion_tokens == N and final.finish_reason == "length"
    # the saved KV comes back from the host copy, or (same engine, prefix caching) from
    # the blocks still cached on device
    st = eng.stats()
    assert st.restored_tokens - restored_before + st.prefix_cache_hits_offline - hits_before \
        >= sum(s.num_saved_tokens for s in saved.values()) - len(saved)


def test_resume_refuses_what_does_not_fit(eng):
    p = PROMPTS[0]
    bs = eng.checkpointer.transfer.block_shape
    ok = SavedRequest(list(p), [5, 6], 1, 16, np.zeros((1,) + bs, np.float32))
    with pytest.raises(ValueError, match="prompt"):
        eng.submit(req("x1", p[:-1], N), resume=ok)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.submit(req("x2", p, 2), resume=ok)
    bad_shape = SavedRequest(list(p), [5], 1, 16, np.zeros((1, 1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        eng.submit(req("x3", p, N), resume=bad_shape)
    online = GenerationRequest("x4", list(p), SamplingParams(max_tokens=N), RequestClass.ONLINE)
    with pytest.raises(ValueError, match="offline"):
        eng.submit(online, resume=ok)
    assert eng.suspend_offline(["nobody"]) == {}


# ---- the checkpoint directory -------------------------------------------------------------
LAYOUT = {"model": "random:tiny", "dtype": "float32", "block_size": 4, "tp": 1}


def _saved(n_blocks=3, seed=0):
    rng = np.random.default_rng(seed)
    return SavedRequest([1, 2, 3], [4, 5], 11, n_blocks * 4,
                        rng.standard_normal((n_blocks, 2, 2, 1, 4, 8)).astype(np.float32))


def test_checkpoint_dir_round_trip_and_delete(tmp_path):
    d = CheckpointDir(str(tmp_path), LAYOUT, 1 << 30)
    s = _saved()
    assert d.save_all([("b1-0", s)]) == ["b1-0"]
    got = CheckpointDir(str(tmp_path), LAYOUT, 1 << 30).load("b1-0")
    assert np.array_equal(got.blocks, s.blocks) and got.blocks.dtype == s.blocks.dtype
    assert (got.prompt_ids, got.generated_ids, got.seed, got.num_saved_tokens) == \
        (s.prompt_ids, s.generated_ids, s.seed, s.num_saved_tokens)
    d.delete("b1-0")
    assert d.load("b1-0") is None and d.keys() == []
    with pytest.raises(ValueError, match="key"):
        d.load("../escape")


def test_a_save_without_kv_round_trips(tmp_path):
    """A policy without KV checkpoints saves tokens only: zero blocks (orbax refuses a
    zero-size array; it was never written before)."""
    d = CheckpointDir(str(tmp_path), LAYOUT, 1 << 30)
    for key, blocks in (("b1-0", np.zeros((0,), np.float32)),
                        ("b1-1", np.zeros((0, 2, 2, 2, 4, 8), np.float32))):
        s = SavedRequest([1, 2, 3], [4, 5], 7, 0, blocks)
        assert d.save_all([(key, s)]) == [key]
        got = CheckpointDir(str(tmp_path), LAYOUT, 1 << 30).load(key)
        assert got.blocks.shape == blocks.shape and got.blocks.dtype == blocks.dtype
        assert (got.prompt_ids, got.generated_ids, got.seed, got.num_saved_tokens) == \
            ([1, 2, 3], [4, 5], 7, 0)


def test_unfinished_save_is_never_used(tmp_path):
    tmp = tmp_path / "b1-0.orbax-checkpoint-tmp-123"
    tmp.mkdir()
    (tmp / "junk").write_bytes(b"half")
    d = CheckpointDir(str(tmp_path), LAYOUT, 1 << 30)
    assert d.keys() == [] and d.load("b1-0") is None
    assert not tmp.exists()


def test_mismatched_layout_is_discarded(tmp_path, caplog):
    CheckpointDir(str(tmp_path), LAYOUT, 1 << 30).save_all([("k", _saved())])
    other = CheckpointDir(str(tmp_path), {**LAYOUT, "tp": 2}, 1 << 30)
    with caplog.at_level(logging.WARNING, logger="conserve_jax.kv.persist"):
        assert other.load("k") is None
    assert "different engine layout" in caplog.text
    assert other.keys() == []


def test_corrupted_checkpoint_is_discarded(tmp_path, caplog):
    d = CheckpointDir(str(tmp_path), LAYOUT, 1 << 30)
    d.save_all([("a", _saved()), ("b", _saved(seed=1))])
    # a flipped byte in every data file of a, a truncated metadata file in b
    for root, _, files in os.walk(tmp_path / "a" / "kv"):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 64:
                data = bytearray(open(p, "rb").read())
                data[len(data) // 2] ^= 0xFF
                open(p, "wb").write(bytes(data))
    meta = tmp_path / "b" / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:10])
    with caplog.at_level(logging.WARNING, logger="conserve_jax.kv.persist"):
        assert d.load("a") is None
        assert d.load("b") is None
    assert caplog.text.count("discarding offline checkpoint") == 2
    assert d.keys() == []


def test_size_bound_skips_with_a_log_line(tmp_path, caplog):
    s = _saved(n_blocks=64)
    d = CheckpointDir(str(tmp_path), LAYOUT, int(s.nbytes * 2.5))
    with caplog.at_level(logging.WARNING, logger="conserve_jax.kv.persist"):
        written = d.save_all([(f"k{i}", s) for i in range(4)])
    assert written == ["k0", "k1"]
    assert "size limit" in caplog.text and "2 request(s)" in caplog.text
    assert d.bytes_used() <= d.max_bytes
