"""The fast end of the offline pace (issue 27's estimates): the engine keeps the seconds
of its last iterations that generated offline tokens with no offline prompt beside them;
`FreePace` takes their median; the tracker's lead pace is that when there is one, else the
lower quartile of the item paces."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from conserve_jax.engine.step_accounting import StepAccounting
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.deadline_pace import FREE_MIN_ITERATIONS, FreePace
from tests.test_deadline_tracker import setup  # noqa: F401  (fixture)


def _entry(online: bool, decode: bool, tokens: int = 1):
    return SimpleNamespace(seq=SimpleNamespace(online=online), decode=decode, num_tokens=tokens)


def test_engine_counts_offline_iterations_with_no_offline_prompt_beside_them(monkeypatch):
    clock = iter([10.0, 10.2, 10.5, 11.5, 11.6])
    monkeypatch.setattr("conserve_jax.engine.step_accounting.time.monotonic", lambda: next(clock))
    acc = StepAccounting()
    off, on = SimpleNamespace(online=False), SimpleNamespace(online=True)
    acc.record([_entry(False, True)], [(off, 1)])  # 10.0: the first, no iteration before it
    acc.record([_entry(False, True), _entry(True, False, 50)], [(off, 1), (on, 1)])  # 0.2 s
    acc.record([_entry(False, True), _entry(False, False, 512)], [(off, 1)])  # a chunk beside
    acc.record([_entry(True, True)], [(on, 1)])  # 11.5: no offline token
    acc.record([_entry(False, True)], [(off, 1)])  # 0.1 s
    assert list(acc._decode_only_s) == pytest.approx([0.2, 0.1])


def test_free_pace_is_the_median_of_the_recent_decode_only_iterations():
    fp = FreePace()
    fp.observe((0.1,) * (FREE_MIN_ITERATIONS - 1))
    assert fp.value() is None  # too few iterations
    fp.observe((0.1,) * FREE_MIN_ITERATIONS + (5.0,))  # one stalled iteration: no matter
    assert fp.value() == pytest.approx(0.1)
    fp.observe(tuple([0.1] * 10 + [0.3] * 30))
    assert fp.value() == pytest.approx(0.3)


def test_lead_pace_is_the_engines_free_pace_when_it_has_one(setup):  # noqa: F811
    store, eng, clock, tr = setup
    for tpot in (0.5, 1.0, 2.0, 4.0):  # lower quartile 1 s per token
        tr.observe_length(pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=20)),
                          [3, 4], "t", 20, tpot_s=tpot)
    tr.tick()
    assert tr.tpot_lead() == pytest.approx(1.0)  # the engine measured nothing yet
    eng.st.offline_decode_only_recent_s = (0.25,) * 30
    clock.t += 5
    tr.tick()
    assert tr.tpot_lead() == pytest.approx(0.25) and tr.tpot() == pytest.approx(2.0)
