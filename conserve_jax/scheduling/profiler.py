"""Profiling sweep for the latency model: time synthetic iterations on the real runner.

Called at engine start-up (before the step loop exists) or by `conserve-jax profile`; it
owns the runner while it runs. KV contents written here are garbage and are never read as
committed data: the scheduler only trusts positions it committed itself.
"""
from __future__ import annotations

import itertools
import logging
import statistics
import time
from typing import Callable, Optional

from conserve_jax.runtime.buckets import powers_of_two
from conserve_jax.runtime.model_runner import ModelRunner
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan
from conserve_jax.scheduling.latency_model import LatencyModel, WorkShape

log = logging.getLogger(__name__)


def _tables(runner: ModelRunner, n: int, context: int) -> list[list[int]]:
    per = -(-context // runner.block_size)
    usable = runner.num_blocks - 1
    return [[1 + (i * per + j) % usable for j in range(per)] for i in range(n)]


def synthetic_plan(runner: ModelRunner, decodes: int, prefill: int, context: int) -> tuple[StepPlan, WorkShape]:
    """`decodes` sequences at `context` tokens, plus one prefill chunk of `prefill` tokens
    ending at `context` (so it reads `context` tokens of KV)."""
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, None)
    context = max(context, prefill, 1)
    tables = _tables(runner, decodes + 1, context)
    plan = StepPlan(decodes=[DecodeItem(5, context - 1, tables[i], spec) for i in range(decodes)])
    w = WorkShape()
    for _ in range(decodes):
        w = w.add_decode(context)
    if prefill:
        plan.prefills.append(PrefillItem([5] * prefill, context - prefill, tables[-1], spec))
        w = w.add_prefill(prefill, context, True)
    return plan, w


def sweep_points(runner: ModelRunner, quick: bool) -> list[tuple[int, int, int]]:
    b, c = runner.buckets, runner.engine_cfg
    max_ctx = runner.max_blocks_per_seq * runner.block_size
    dec_sizes = powers_of_two(1, b.max_num_seqs)
    top = min(c.max_prefill_tokens, max_ctx)  # a chunk never runs past the model length
    pre_sizes = powers_of_two(min(32, top), top)
    decodes = dec_sizes[:: 2 if quick else 1] + [dec_sizes[-1]]
    prefills = pre_sizes[:: 2 if quick else 1] + [pre_sizes[-1]]
    contexts = sorted({min(max_ctx, c) for c in (64, 256, 1024, max_ctx)})
    if quick:
        contexts = sorted({contexts[0], contexts[len(contexts) // 2], contexts[-1]})
    pts = set()
    for d, c in itertools.product(sorted(set(decodes)), contexts):
        pts.add((d, 0, c))
    for t, c in itertools.product(sorted(set(prefills)), contexts):
        if t <= c:
            pts.add((0, t, c))
    for d, t in itertools.product(sorted(set(decodes))[::2], sorted(set(prefills))[::2]):
        pts.add((d, t, max(t, contexts[len(contexts) // 2])))
    return sorted(pts)


def profile(runner: ModelRunner, quick: bool = False, repeats: int = 3,
            max_seconds: float = 300.0,
            progress: Optional[Callable[[int, int], None]] = None
            ) -> list[tuple[WorkShape, float]]:
    """Time each sweep point (median of `repeats` after one compile/warm run);
    `progress(done, total)` is called before the first point and after each."""
    samples = []
    start = time.perf_counter()
    points = sweep_points(runner, quick)
    if progress is not None:
        progress(0, len(points))
    for i, (d, t, c) in enumerate(points):
        if time.perf_counter() - start > max_seconds:
            log.warning("profiling stopped after %d of %d points (time limit)", i, len(points))
            break
        plan, w = synthetic_plan(runner, d, t, c)
        runner.execute(plan)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.execute(plan)
            times.append(time.perf_counter() - t0)
        samples.append((w, statistics.median(times)))
        if progress is not None:
            progress(i + 1, len(points))
    return samples


def profile_and_fit(runner: ModelRunner, quick: bool = False,
                    progress: Optional[Callable[[int, int], None]] = None) -> LatencyModel:
    samples = profile(runner, quick=quick, progress=progress)
    model = LatencyModel.fit(samples, runner.buckets, runner.block_size, runner.cfg.num_layers)
    log.info("latency model fitted on %d points: %s", len(samples), model.fit_error)
    return model
