"""Issue 28 item 4: the leader's step watchdog (runtime/step_watchdog.py), on a fake clock
and fake steps (no processes): a step that waits past the bound fires `on_hung` once with a
reason naming `step_timeout_s`; compile time (the first call of a jitted function at a
shape: `FirstCalls`) is not counted, however long, and the bound restarts after it, longer
by the step's compile time (followers compile too); a step that ends in time, or no step at
all, never fires. Then the real engine (tiny random model,
one process): a step stuck in the runner (as in a collective with a hung peer) stops the
engine from the watchdog's thread: `failure` is set, the open stream ends with "engine
stopped", new work is refused, and shutdown does not hang once the step returns. The flag
is validated against `process_timeout_s`."""
from __future__ import annotations

import threading
import time

import pytest

from conserve_jax.engine.step_guard import ENGINE_STOPPED
from conserve_jax.engine_args import engine_config
from conserve_jax.runtime.step_watchdog import FirstCalls, IdleProbe, StepWatchdog


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def watched(timeout_s=5.0):
    clock, fired = FakeClock(), []
    return StepWatchdog(timeout_s, fired.append, clock=clock), clock, fired


def test_a_step_past_the_bound_fires_once_with_the_reason():
    wd, clock, fired = watched(5.0)
    with wd.step():
        clock.t += 4.9
        assert not wd.check() and not fired
        clock.t += 0.2
        assert wd.check()
        clock.t += 60
        assert not wd.check()  # once
    assert len(fired) == 1 and "step_timeout_s 5" in fired[0] and "5.1 s" in fired[0]
    assert wd.fired == fired[0]


def test_no_step_or_a_step_in_time_never_fires():
    wd, clock, fired = watched(5.0)
    clock.t += 1000  # idle: nothing armed
    assert not wd.check()
    for _ in range(10):  # many steps, each in time: the bound is per step
        with wd.step():
            clock.t += 4.0
            assert not wd.check()
    clock.t += 1000
    assert not wd.check() and not fired


def test_compiling_does_not_count_and_the_bound_restarts_after_it():
    wd, clock, fired = watched(5.0)
    calls = FirstCalls()
    calls.watch = wd
    checks = []

    def fake_jitted(seconds):  # compiles on its first call per key: a long time passes
        clock.t += seconds
        checks.append(wd.check())
        return seconds
    with wd.step():
        clock.t += 3.0
        assert calls.call(("layers", 10, 64), fake_jitted, 300.0) == 300.0  # compiling
        assert checks == [False] and not fired
        clock.t += 4.0  # 4 s after the compile: within the bound again
        assert not wd.check()
        calls.call(("layers", 10, 128), fake_jitted, 120.0)  # another shape: compiles too
        assert checks == [False, False] and not fired
        # compiled: this wait counts, against 5 s + the 420 s compiled in this step (a
        # follower compiling the same calls may finish that much later)
        calls.call(("layers", 10, 64), fake_jitted, 400.0)
        assert checks == [False, False, False]
        clock.t += 30.0
        assert wd.check() and len(fired) == 1
    assert "step_timeout_s 5 + 420.0 s compiled in this step" in fired[0]


def test_the_compile_allowance_is_per_step():
    wd, clock, fired = watched(5.0)
    calls = FirstCalls()
    calls.watch = wd

    def fake_jitted(seconds):
        clock.t += seconds
    with wd.step():
        calls.call(("embed", 8), fake_jitted, 100.0)
    with wd.step():  # the next step: compiled calls only, the plain bound
        calls.call(("embed", 8), fake_jitted, 5.5)
        assert wd.check() and len(fired) == 1


def test_a_first_call_that_fails_stays_a_first_call():
    wd, clock, fired = watched(5.0)
    calls = FirstCalls()
    calls.watch = wd

    def broken():
        clock.t += 30
        raise RuntimeError("compile failed")
    with wd.step():
        with pytest.raises(RuntimeError):
            calls.call(("head", 8), broken)
        assert not wd.check()  # the bound restarted when the call returned
        with pytest.raises(RuntimeError):
            calls.call(("head", 8), broken)  # still exempt: it never completed
        assert not fired


def test_the_idle_probe_pings_every_interval_under_the_watchdog():
    wd, clock, fired = watched(5.0)
    pings = []

    def ping(hang_s=0.0):
        pings.append(clock.t)
        clock.t += hang_s
        wd.check()
    probe = IdleProbe(2.5, ping, wd, clock=clock)
    clock.t += 2.0
    assert probe.wait_s() == pytest.approx(0.5)
    probe.run_if_due()
    assert pings == []  # not due yet
    clock.t += 1.0
    probe.worked()  # a step ran: as good as a probe
    clock.t += 2.0
    probe.run_if_due()
    assert pings == []
    clock.t += 0.5
    probe.run_if_due()
    assert pings == [105.5] and probe.wait_s() == pytest.approx(2.5)
    probe.ping = lambda: ping(6.0)  # a follower hangs while idle: the probe's wait fires
    clock.t += 2.5
    probe.run_if_due()
    assert len(fired) == 1 and "step timed out" in fired[0]


def test_the_watchdog_thread_fires_and_stops():
    fired = threading.Event()
    wd = StepWatchdog(0.2, lambda reason: fired.set(), poll_s=0.01).start()
    try:
        with wd.step():
            assert fired.wait(30), "the watchdog did not fire"  # a bound: does not hang
    finally:
        wd.close()
    assert not wd._thread.is_alive()


def test_step_timeout_is_validated_against_process_timeout():
    assert engine_config().step_bound_s == 10.0  # default: a third of process_timeout_s (30)
    assert engine_config(process_timeout_s=12, step_timeout_s=6).step_bound_s == 6
    for bad in (0, -1, 15.5):
        with pytest.raises(ValueError, match="step_timeout_s must be > 0 and at most half of "
                                             "process_timeout_s"):
            engine_config(step_timeout_s=bad)


def test_real_engine_step_stuck_past_the_bound_stops_the_engine(monkeypatch):
    from tests.coserve_helpers import engine, req

    eng = engine(policy="conserve", num_blocks=64)
    release = threading.Event()
    execute = eng.runner.execute
    try:
        def stuck(plan, *args, **kw):  # as a collective whose peer stopped answering
            release.wait(120)
            return execute(plan, *args, **kw)
        monkeypatch.setattr(eng.runner, "execute", stuck)
        eng._start_watchdog(0.3)
        t0 = time.monotonic()
        stream = eng.submit(req("a", list(range(10, 30)), 8, online=True))
        out = stream.get(timeout=60)  # a bound, not a speed target
        while not out.finished:
            out = stream.get(timeout=60)
        assert (out.finish_reason, out.error) == ("error", ENGINE_STOPPED)
        assert eng.failure is not None and "step timed out" in eng.failure
        assert time.monotonic() - t0 < 60
        with pytest.raises(RuntimeError, match="engine stopped"):
            eng.submit(req("b", list(range(10, 20)), 2))
        assert eng.suspend_offline(["a"]) == {}  # at once: nothing can be saved
    finally:
        release.set()  # the step returns; the loop sees the failure and stops
        eng.shutdown()
    assert not eng._thread.is_alive()


def test_real_engine_idle_probe_stuck_stops_the_engine(monkeypatch):
    """Idle (no request): the probe's collective never returns (a follower hung while
    nothing ran): the engine stops as in a stuck step."""
    from tests.coserve_helpers import engine, req

    eng = engine(policy="conserve", num_blocks=64)
    release = threading.Event()
    pings = []
    try:
        def stuck_ping():
            pings.append(1)
            release.wait(120)
        monkeypatch.setattr(eng.runner, "ping", stuck_ping)
        eng._start_watchdog(0.3)
        deadline = time.monotonic() + 60  # a bound, not a speed target
        while eng.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.failure is not None and "step timed out" in eng.failure
        assert pings == [1]
        with pytest.raises(RuntimeError, match="engine stopped"):
            eng.submit(req("b", list(range(10, 20)), 2))
    finally:
        release.set()
        eng.shutdown()
    assert not eng._thread.is_alive()


def test_real_engine_idle_probe_pings_while_idle_and_serves_on():
    """One process: the probe's all-reduce is a no-op sum; pings while idle do not disturb
    serving."""
    from tests.coserve_helpers import collect, engine, req

    eng = engine(policy="conserve", num_blocks=64)
    try:
        calls = []
        ping = eng.runner.ping
        eng.runner.ping = lambda: (calls.append(1), ping())
        eng._start_watchdog(0.2)
        assert wait_for(lambda: len(calls) >= 3)
        toks, reason = collect(eng.submit(req("a", list(range(10, 30)), 6)))
        assert reason == "length" and len(toks) == 6 and eng.failure is None
    finally:
        eng.shutdown()


def wait_for(pred, timeout_s=60.0) -> bool:
    deadline = time.monotonic() + timeout_s  # a bound: does not hang
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
