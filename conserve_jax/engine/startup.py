"""What a user sees while an `Engine` starts: each stage as an INFO line on the
`conserve_jax.startup` logger and, with `bars`, tqdm progress bars on stderr.

Stages, in order: loading weights (bytes and seconds), compiling shapes (a bar counting
token buckets with its ETA; JAX persistent compilation cache hits and misses counted from
`jax.monitoring` events while it runs), the latency model (loaded from its cache, or
profiled with a bar over the sweep's points). The serving entry point adds its own "ready"
line once it listens.

Contract: every method is called by the thread constructing the engine (the step loop does
not exist yet); nothing here configures logging (the entry point does), and bars are drawn
only when asked (`bars=True`, which `serve` sets when INFO is enabled), never on stdout.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

log = logging.getLogger("conserve_jax.startup")

CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


def params_nbytes(params) -> int:
    """Bytes of every array leaf of a parameter tree (numpy or jax arrays)."""
    import jax

    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(params)))


def load_checked(config, loaded, checkpointing: bool, progress: "StartupProgress"):
    """The model an `Engine` serves (its constructor's thread): `loaded` as given, else
    loaded from `config.model` with the stages reported on `progress`. Either way the
    executables `config` plans for it are checked against the map budget first
    (`MapBudgetExceeded` when XLA could not compile them; before the weights load when it
    loads them)."""
    from conserve_jax.runtime.map_budget import check_map_budget
    from conserve_jax.runtime.model_runner import planned_executables_for
    if loaded is not None:
        check_map_budget(planned_executables_for(loaded.config, config, checkpointing))
        return loaded
    from conserve_jax.models.loader import load_model, load_model_config
    check_map_budget(planned_executables_for(load_model_config(config.model), config,
                                             checkpointing))
    progress.loading_weights(config.model)
    t_load = time.perf_counter()
    loaded = load_model(config.model, seed=config.seed)
    progress.weights_loaded(loaded.source, params_nbytes(loaded.params),
                            time.perf_counter() - t_load)
    return loaded


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


class CompileCacheCounter:
    """Counts JAX persistent compilation cache hits and misses between `start` and `stop`
    (listeners on `jax.monitoring` events; any thread may compile meanwhile)."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def _on_event(self, event: str, **kwargs) -> None:
        if event in (CACHE_HIT_EVENT, CACHE_MISS_EVENT):
            with self._lock:
                if event == CACHE_HIT_EVENT:
                    self.hits += 1
                else:
                    self.misses += 1

    def start(self) -> None:
        import jax.monitoring

        jax.monitoring.register_event_listener(self._on_event)

    def stop(self) -> None:
        import jax.monitoring

        try:
            jax.monitoring.unregister_event_listener(self._on_event)
        except (AssertionError, ValueError):  # already gone (e.g. cleared by someone else)
            pass


@dataclass
class StartupProgress:
    """Reports an engine's start-up (see the module docstring). `bars`: draw tqdm bars
    on `stream` (stderr) besides the log lines."""

    bars: bool = False
    stream: object = field(default=None, repr=False)
    started: float = field(default_factory=time.monotonic)
    _profile_bar: object = field(default=None, repr=False)
    _profile_t0: Optional[float] = field(default=None, repr=False)
    _profiled_points: int = field(default=0, repr=False)
    _redirect: object = field(default=None, repr=False)

    def _bar(self, desc: str, total: Optional[int], unit: str):
        if not self.bars:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=self.stream or sys.stderr,
                    dynamic_ncols=True, mininterval=0.5, leave=True)

    # ---- weights -----------------------------------------------------------------------
    def loading_weights(self, model: str) -> None:
        log.info("loading weights: %s", model)

    def weights_loaded(self, source: str, nbytes: int, seconds: float) -> None:
        log.info("loaded weights: %s, %s in %.1f s", source, _mb(nbytes), seconds)

    # ---- compiling -----------------------------------------------------------------------
    @contextlib.contextmanager
    def compiling(self, what: str, total: int) -> Iterator[Callable[[int, int, int], None]]:
        """Yields `progress(T, done, total)` for `ModelRunner.warmup` (`total` token
        buckets); logs the totals, with the persistent cache's hits and misses, on exit.
        While the bar is drawn, log lines go through tqdm so they do not break it."""
        counter = CompileCacheCounter()
        counter.start()
        log.info("compiling shapes: %s (cached executables under the compilation cache "
                 "directory load instead of compiling)", what)
        bar = self._bar("compiling shapes", total, "shape")
        t0 = time.monotonic()
        done = [0]
        redirect = contextlib.ExitStack()
        if bar is not None:
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect.enter_context(logging_redirect_tqdm())

        def progress(T: int, i: int, n: int) -> None:
            done[0] = n
            if bar is not None:
                if bar.total != n:
                    bar.total = n
                bar.set_postfix_str(f"tokens={T} cache hits={counter.hits}", refresh=False)
                bar.update(i - bar.n)
            else:
                log.info("compiled token bucket %d (%d/%d)", T, i, n)
        try:
            with redirect:
                yield progress
        finally:
            counter.stop()
            if bar is not None:
                bar.close()
            log.info("compiled %d shapes and the sampler in %.1f s (persistent cache: %d hits, "
                     "%d compiled)", done[0], time.monotonic() - t0, counter.hits,
                     counter.misses)

    # ---- latency model -------------------------------------------------------------------
    def profiled(self, done: int, total: int) -> None:
        """`progress(done, total)` for the latency-model profiling sweep."""
        if self._profile_t0 is None:
            self._profile_t0 = time.monotonic()
            log.info("latency model: not cached for this model, shapes and machine; "
                     "profiling %d points", total)
            self._profile_bar = self._bar("profiling latency model", total, "point")
            if self._profile_bar is not None:  # log lines through tqdm until it closes
                from tqdm.contrib.logging import logging_redirect_tqdm

                self._redirect = contextlib.ExitStack()
                self._redirect.enter_context(logging_redirect_tqdm())
        self._profiled_points = done
        if self._profile_bar is not None:
            self._profile_bar.update(done - self._profile_bar.n)

    def latency_model_ready(self) -> None:
        if self._profile_bar is not None:
            self._profile_bar.close()
            self._profile_bar = None
            self._redirect.close()
        if self._profile_t0 is None:
            log.info("latency model: loaded (cached from an earlier start, or "
                     "--latency-model-path)")
        else:
            log.info("latency model: profiled %d points in %.1f s (cached for later starts)",
                     self._profiled_points, time.monotonic() - self._profile_t0)

    def elapsed(self) -> float:
        return time.monotonic() - self.started
