"""StepAccounting: the free-iteration counters the deadline estimates' lead pace reads."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from conserve_jax.engine.step_accounting import StepAccounting


def _entry(online: bool, decode: bool, tokens: int = 1):
    return SimpleNamespace(decode=decode, num_tokens=tokens, seq=SimpleNamespace(online=online))


def _sampled(*online: bool):
    return [(SimpleNamespace(online=o), None) for o in online]


def test_free_iterations_count_offline_tokens_without_an_offline_prompt():
    acc = StepAccounting()
    # offline decodes beside an online prompt chunk: free (no offline prompt)
    acc.record([_entry(True, False, 64), _entry(False, True)], _sampled(True, False), 0.2)
    # an offline prompt chunk beside offline decodes: not free
    acc.record([_entry(False, False, 512), _entry(False, True)], _sampled(False), 0.9)
    # online tokens only: not free (no offline item generated)
    acc.record([_entry(True, True)], _sampled(True), 0.05)
    # offline tokens, time unknown (a resumed iteration): not counted
    acc.record([_entry(False, True)], _sampled(False), None)
    acc.record([_entry(False, True)], _sampled(False, False), 0.1)
    assert acc.iterations == 5
    assert acc.offline_free_iterations == 2
    assert acc.offline_free_s == pytest.approx(0.3)
    # seconds of the timed iterations with any offline work (0.2 + 0.9 + 0.1); not the
    # online-only one nor the untimed one
    assert acc.offline_busy_s == pytest.approx(1.2)
