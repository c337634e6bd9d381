"""A bound on one engine step of a multi-process run's leader (issue 28: a hung follower).

A follower that hangs (stopped, swapped out, wedged in a driver) keeps its sockets open, so
nothing fails: the leader's step blocks inside a cross-process collective (or a plan send)
until JAX's coordination service, after `process_timeout_s` without the follower's
heartbeats, aborts the leader's whole process (SIGABRT) — with no chance to turn health
NOT_SERVING or end streams. `StepWatchdog` notices first: a step that has waited longer than
`timeout_s` (`EngineConfig.step_bound_s`, well inside the heartbeat timeout) is declared hung
and `on_hung(reason)` is called, once, on the watchdog's own thread; the engine's handler
records the failure and ends every stream (the step thread cannot be unwound: it is stuck
in native code), and the server exits.

JAX offers no supported way to let the leader handle the heartbeat failure itself: in jax
0.10.2 `jax.distributed.initialize` takes no callback, and jaxlib's lower-level
`get_distributed_runtime_client(missed_heartbeat_callback=...)` terminates the process with
`std::bad_cast` when it invokes a Python callback (the `absl::Status` argument has no Python
conversion); tried on this machine.

Compilation is not a hang: the first call of a jitted function at a new shape can compile
for many seconds, and it involves no other process. `FirstCalls` runs every jitted call of
the runner and the KV transfers under a key (function, shape bucket); the first call of
each key runs with the watchdog paused, and the bound starts afresh when it returns (the
execution it dispatched, and any wait on other processes, is then counted). The followers
compile the same calls at about the same time (the plan reaches them first) but may finish
later, so for the rest of that step the bound grows by the compile time the leader saw.
Warm-up runs through the same keys, so after it no serving call is exempt. A hang inside an
exempt call is still caught by the heartbeat (the unclean abort).

A follower that hangs while the leader runs no step would not be noticed by a step bound:
`IdleProbe` has the idle leader run one tiny all-reduce with every process (`ModelRunner.
ping`, the followers told over the plan channel) every half bound, as a step under the
watchdog; a hang is then noticed within 1.5 x the bound, a dead follower at the next probe.

Threads: `step()` is entered by the engine's step-loop thread, `paused()` (through
`FirstCalls.call`) by the thread that runs the jitted call (the step loop; at start-up the
constructing thread); `check` runs on the watchdog thread (or a test's). State is under one
lock; `on_hung` is called without it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator, Optional

log = logging.getLogger(__name__)


class StepWatchdog:
    def __init__(self, timeout_s: float, on_hung: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic,
                 poll_s: Optional[float] = None) -> None:
        """`on_hung(reason)` is called at most once. `poll_s`: how often the thread looks
        (default: a twentieth of the bound, at most 0.25 s)."""
        if not timeout_s > 0:
            raise ValueError(f"step watchdog timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = timeout_s
        self.on_hung = on_hung
        self.clock = clock
        self.poll_s = poll_s if poll_s is not None else min(0.25, timeout_s / 20)
        self.fired: Optional[str] = None  # the reason, once fired
        self._lock = threading.Lock()
        self._armed = False
        self._paused = 0  # nesting depth of `paused`
        self._paused_at = 0.0  # when the outermost pause began
        self._since: Optional[float] = None  # start of the counted wait (None: not counting)
        self._extra = 0.0  # compile time seen in this step: the bound grows by it
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "StepWatchdog":
        """Start the watchdog thread (daemon); returns self."""
        self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the watchdog thread (it never fires afterwards)."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Count the body (one engine step) against the bound."""
        with self._lock:
            self._armed, self._extra = True, 0.0
            self._since = None if self._paused else self.clock()
        try:
            yield
        finally:
            with self._lock:
                self._armed, self._since = False, None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count the body (a call that may compile); the bound restarts after it."""
        with self._lock:
            self._paused += 1
            if self._paused == 1:
                self._paused_at = self.clock()
            self._since = None
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                if self._armed and not self._paused:
                    self._since = self.clock()
                    self._extra += self._since - self._paused_at

    def check(self) -> bool:
        """Fire if the current step has waited past the bound (outside pauses); True if it
        fired now."""
        with self._lock:
            if self.fired is not None or self._since is None or self._closed.is_set():
                return False
            waited = self.clock() - self._since
            if waited <= self.timeout_s + self._extra:
                return False
            extra = f" + {self._extra:.1f} s compiled in this step" if self._extra >= 0.05 \
                else ""
            self.fired = (f"step timed out: waited {waited:.1f} s (step_timeout_s "
                          f"{self.timeout_s:g}{extra}) for another process, which is not "
                          f"answering")
        log.critical("%s; stopping the engine", self.fired)
        self.on_hung(self.fired)
        return True

    def _run(self) -> None:
        while not self._closed.wait(self.poll_s):
            try:
                if self.check():
                    return
            except Exception:  # the handler failed: say so, never fire twice
                log.exception("the step watchdog's handler failed")
                return


class IdleProbe:
    """Multi-process leader: while the engine has no work, every `interval_s` one tiny
    collective over every process (`ping`: `ModelRunner.ping`) under the watchdog, so that a
    follower that hangs (or dies) while nothing runs is noticed as in a step, not by JAX's
    heartbeat abort. Used by the engine's step-loop thread only."""

    def __init__(self, interval_s: float, ping: Callable[[], None], watchdog: StepWatchdog,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.ping = ping
        self.watchdog = watchdog
        self.clock = clock
        self._last = clock()

    def wait_s(self) -> float:
        """Seconds until the next probe is due (<= 0: due now)."""
        return self._last + self.interval_s - self.clock()

    def worked(self) -> None:
        """A step ran: it proved as much as a probe would."""
        self._last = self.clock()

    def run_if_due(self) -> None:
        if self.wait_s() > 0:
            return
        with self.watchdog.step():
            self.ping()
        self._last = self.clock()


class _NoWatchdog:
    """Stands in for a `StepWatchdog` and an `IdleProbe` where there is none (one process,
    a follower)."""

    def paused(self):
        return contextlib.nullcontext()

    def step(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass

    def wait_s(self) -> float:  # as an `IdleProbe` that is never due
        return float("inf")

    def worked(self) -> None:
        pass

    def run_if_due(self) -> None:
        pass


NO_WATCHDOG = _NoWatchdog()


class FirstCalls:
    """Runs jitted calls; the first call of each key (jitted function, shape bucket, static
    arguments: whatever makes it compile) runs with `watch` paused (module docstring).
    Used by one thread at a time (the runner's owner)."""

    def __init__(self) -> None:
        self.watch = NO_WATCHDOG  # the engine sets its `StepWatchdog` (multi-process leader)
        self._done: set = set()

    def keys(self) -> frozenset:
        """The keys that have run once (tests: warm-up leaves none for serving)."""
        return frozenset(self._done)

    def call(self, key: tuple, fn, *args, **kwargs):
        if key in self._done:
            return fn(*args, **kwargs)
        with self.watch.paused():
            out = fn(*args, **kwargs)
        self._done.add(key)
        return out
