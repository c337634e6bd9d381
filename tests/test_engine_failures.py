"""Issue 9, fault 2 and the engine part of fault 9: the step loop's failure policy
(`StepGuard`), injected deterministically with monkeypatch, on the mock engine and on the
real engine (tiny random model). A failed iteration fails only the requests it can blame
(after one retry when nothing was committed), with a fixed message and no exception text;
a loop that keeps failing dies, ends every stream with "engine stopped", refuses work and
reports `failure`."""
from __future__ import annotations

import pytest

from conserve_jax.engine_api import GenerationRequest, RequestClass
from conserve_jax.engine.mock_engine import MockEngine
from conserve_jax.sampling_params import SamplingParams
from conserve_jax.engine.step_guard import ENGINE_STOPPED, ITERATION_FAILED
from tests.coserve_helpers import collect, engine, req


def _mreq(rid, text, n=5):
    return GenerationRequest(rid, [ord(c) + 3 for c in text], SamplingParams(max_tokens=n),
                             RequestClass.ONLINE)


def _final(stream):
    while True:
        out = stream.get(timeout=30)
        if out.finished:
            return out


def test_mock_blames_only_the_failing_request(monkeypatch):
    eng = MockEngine()
    real = MockEngine._step_one

    def step_one(self, rid, r, counts):
        if rid == "poison":
            raise RuntimeError("secret internal detail")
        return real(self, rid, r, counts)
    monkeypatch.setattr(MockEngine, "_step_one", step_one)
    try:
        bad, good = eng.submit(_mreq("poison", "aa")), eng.submit(_mreq("good", "bb"))
        out = _final(bad)
        assert (out.finish_reason, out.error) == ("error", ITERATION_FAILED)
        assert "secret" not in out.error
        assert _final(good).finish_reason == "length"
        assert eng.failure is None and eng.stats().kv_blocks_online == 0
    finally:
        eng.shutdown()


def test_mock_loop_death_ends_streams_and_refuses_work():
    eng = MockEngine(token_delay_s=0.001, fail_after_steps=2)
    try:
        out = _final(eng.submit(_mreq("a", "abc", 50)))
        assert (out.finish_reason, out.error) == ("error", ENGINE_STOPPED)
        assert eng.failure is not None
        with pytest.raises(RuntimeError, match="engine stopped"):
            eng.submit(_mreq("b", "x"))
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def real():
    eng = engine(policy="conserve", num_blocks=64)
    yield eng
    eng.shutdown()


def _prompt(k):
    return list(range(10 + k, 30 + k))


def test_real_engine_retries_a_failure_before_commit_once(real, monkeypatch):
    calls = {"n": 0}
    execute = real.runner.execute

    def flaky(plan, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("transient device error")
        return execute(plan, *args, **kw)
    monkeypatch.setattr(real.runner, "execute", flaky)
    toks, reason = collect(real.submit(req("retry", _prompt(0), 6)))
    assert reason == "length" and len(toks) == 6  # the first failure was retried
    monkeypatch.setattr(real.runner, "execute", execute)
    assert real.failure is None


def test_real_engine_fails_requests_of_a_step_that_breaks_in_commit(real, monkeypatch):
    commit = real.scheduler.commit
    state = {"armed": False}

    def broken(step, result):
        if state["armed"] and any(e.seq.request_id == "victim" for e in step.entries):
            state["armed"] = False
            raise RuntimeError("commit blew up: secret")
        return commit(step, result)
    monkeypatch.setattr(real.scheduler, "commit", broken)
    state["armed"] = True
    out = _final(real.submit(req("victim", _prompt(1), 6)))
    assert (out.finish_reason, out.error) == ("error", ITERATION_FAILED)
    toks, reason = collect(real.submit(req("after", _prompt(2), 4)))  # the engine goes on
    assert reason == "length" and len(toks) == 4 and real.failure is None


def test_real_engine_loop_death(real, monkeypatch):  # last: it kills the shared engine
    def broken_schedule():
        raise RuntimeError("scheduler invariant broken")
    monkeypatch.setattr(real.scheduler, "schedule", broken_schedule)
    out = _final(real.submit(req("x", _prompt(4), 8)))
    assert (out.finish_reason, out.error) == ("error", ENGINE_STOPPED)
    assert real.failure is not None
    with pytest.raises(RuntimeError, match="engine stopped"):
        real.submit(req("y", _prompt(5), 2))
