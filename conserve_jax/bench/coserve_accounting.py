"""Run accounting of the co-serving benchmark (a helper of `coserve`, run as
scripts/bench_coserve.py): `Probe` wraps a live engine's scheduler, policy and runner to
record every iteration, commit and runner call, and `Probe.window` turns them into the
window's offline throughput and its split (see `coserve`'s module doc for each key).
Wrappers run on the engine's step-loop thread; `window` is called after the engine stopped.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conserve_jax.engine.engine import Engine


class Probe:
    """Instrumentation by wrapping (the wrappers call the originals): every committed
    iteration's time and offline tokens (`Scheduler.commit`, so iterations resumed from a
    safepoint count too), and every timed iteration's duration and whether it carried
    online work (the policy's `on_step_done`; resumed iterations are not timed), and every
    runner call (`execute` and `resume`, abandoned or not) with whether its iteration
    carried online work."""

    def __init__(self, eng: "Engine") -> None:
        self.commits = []  # (t, offline tokens committed, iteration carried online work)
        self.iters = []  # (t, elapsed, has_online)
        pol, sched = eng.policy, eng.scheduler
        done, commit = pol.on_step_done, sched.commit

        def on_step_done(step, elapsed):
            self.iters.append((time.monotonic(), elapsed, step.has_online))
            done(step, elapsed)

        def on_commit(step, result):
            self.commits.append((time.monotonic(),
                                 sum(e.num_tokens for e in step.entries if not e.seq.online),
                                 step.has_online))
            return commit(step, result)

        pol.on_step_done, sched.commit = on_step_done, on_commit
        self.calls = []  # (t at end, duration, has_online) per runner call
        has_online: dict = {}  # id(plan) -> its step carried online work
        runner, schedule = eng.runner, sched.schedule

        def on_schedule(*args, **kw):
            step = schedule(*args, **kw)
            has_online[id(step.plan)] = step.has_online
            return step

        def timed(fn, plan_of):
            def call(arg, *args, **kw):
                t = time.monotonic()
                try:
                    return fn(arg, *args, **kw)
                finally:
                    end = time.monotonic()
                    self.calls.append((end, end - t, has_online.get(id(plan_of(arg)), False)))
            return call

        sched.schedule = on_schedule
        runner.execute = timed(runner.execute, lambda plan: plan)
        runner.resume = timed(runner.resume, lambda it: it.plan)

    def window(self, t0: float, win_s: float) -> dict:
        """The accounting keys for the window [t0, t0 + win_s] (monotonic clock)."""
        end = t0 + win_s
        in_win = [(n, online) for t, n, online in self.commits if t <= end]
        offline_only = sum(n for n, online in in_win if not online)
        busy = sum(e for t, e, online in self.iters if online and t <= end) / win_s
        calls = [c for c in self.calls if t0 <= c[0] <= end]
        off_call_s = sum(d for t, d, online in calls if not online)
        return {
            "offline_processed_tokens_per_s": sum(n for n, _ in in_win) / win_s,
            "online_busy_fraction": busy,
            # offline tokens committed by iterations that carried online work (riders), and
            # by offline-only iterations per second of the window's time without online work
            "offline_riding_tokens_per_s": sum(n for n, online in in_win if online) / win_s,
            "offline_rate_online_idle": offline_only / max(1e-9, win_s * (1.0 - busy)),
            # runner calls in the window: offline-only iterations' share of it (abandoned and
            # resumed parts included), their committed offline tokens per second of that
            # time, and the share with no runner call at all
            "offline_only_call_fraction": off_call_s / win_s,
            "offline_only_call_tokens_per_s": offline_only / max(1e-9, off_call_s),
            "runner_idle_fraction": 1.0 - sum(d for _, d, _ in calls) / win_s,
            "_offline_iter_s": [e for _, e, online in self.iters if not online],
        }
