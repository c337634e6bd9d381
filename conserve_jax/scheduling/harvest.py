"""The harvest rate: how much offline work the engine gets done per wall second, measured
over a sliding window of recent observations, and the cost model that puts prefill and
generated tokens on one scale.

`WorkCost` turns tokens into work units: seconds of a dedicated engine per prefill token
and per generated token. From a latency model (`WorkCost.from_latency_model`) the unit is
"seconds of an engine running only offline work at full batch", so a harvest rate of 0.4
means the online load leaves 40 % of the engine to offline work. Without one (the mock
engine) both costs are 1: the unit is a token.

`HarvestMeter` is fed cumulative offline counters (prefill tokens, generated tokens, as
`EngineStats` reports them) with the wall time they were read at, plus whether offline work
was waiting at that moment (backlogged). Only intervals that were backlogged at both ends
count: an engine with nothing offline to do harvests nothing, and that says nothing about
the rate it *could* harvest. `rate()` is work units per backlogged wall second over the last
`window_s` backlogged seconds (the window slides over backlogged time, so an engine idle
for an hour still reports the rate it last harvested at); None until at least
`min_span_s` backlogged seconds were measured (no history: callers must say what they
assume instead, see `slack.py`).

Beside the rate, the meter keeps two speeds of its own windows, each over the last
`window_s` seconds of the time it is measured in, however long ago: the prompt units a
second of offline iterations with a prompt in them and `free_period()` (the engine's
seconds per iteration that generated offline tokens with no offline prompt in it); and,
over the rate's backlogged window, `duty()` (the share of that time the engine spent in
iterations with offline work). `prompt_rate()` is the first over wall time by the duty.
The deadline estimates use all three for a few items served first (`slack.py`,
`conserve_server.batch.deadlines`).

Pure host code with an explicit clock (callers pass `now`), so tests drive it with a fake
clock. One owner (the batch runner's thread) feeds it; readers on other threads call
`rate()`, which reads an immutable tuple (`_intervals` is replaced whole, never mutated in
place, so a reader never sees a half-updated window).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


FREE_MIN_ITERATIONS = 10  # iterations without offline prompts before `free_period` counts


@dataclass(frozen=True)
class WorkCost:
    """Seconds of a dedicated engine per prefill token and per generated token."""

    prefill_s: float = 1.0
    decode_s: float = 1.0
    # seconds of an iteration of k decodes and nothing else, k = 1, 2, ... (the latency
    # model's; empty: unknown): an offline item's pace, a token an iteration, before the
    # engine has run such iterations (`decode_iteration_s`)
    decode_iter_s: tuple[float, ...] = ()
    # the latency model's online correction (`LatencyModel.correction`) when these costs
    # were taken: `decode_iteration_s` scales by the one measured since
    correction: float = 1.0

    def __post_init__(self) -> None:
        if not (self.prefill_s > 0 and self.decode_s > 0 and self.correction > 0):
            raise ValueError(f"WorkCost needs positive costs, got {self}")

    def of(self, prefill_tokens: float, output_tokens: float) -> float:
        return self.prefill_s * prefill_tokens + self.decode_s * output_tokens

    def decode_iteration_s(self, rows: int, correction: Optional[float] = None
                           ) -> Optional[float]:
        """Predicted seconds of an iteration of `rows` decodes (capped at the largest
        known), None without a latency model. `correction`: the latency model's online
        correction now (`EngineStats.latency_correction`; None: as when the costs were
        taken): the prediction made then, rescaled to it (the engine measures iterations
        slower than the profile on a busy host)."""
        if not self.decode_iter_s:
            return None
        t = self.decode_iter_s[min(max(1, int(rows)), len(self.decode_iter_s)) - 1]
        return t if correction is None else t * correction / self.correction

    @classmethod
    def from_latency_model(cls, model, max_prefill_tokens: int, max_num_seqs: int,
                           context: int = 512) -> "WorkCost":
        """Per-token costs of the engine at throughput: one full prefill chunk starting at
        `context` // 2, and `max_num_seqs` decodes reading `context` tokens each."""
        from conserve_jax.scheduling.latency_model import WorkShape

        buckets = getattr(model, "buckets", None)
        n = max(1, int(max_prefill_tokens))
        rows = max(1, int(max_num_seqs))
        if buckets is not None:  # never past the shapes the model was fitted on
            n = min(n, buckets.tokens[-1])
            rows = min(rows, buckets.max_num_seqs)
        pre = WorkShape().add_prefill(n, context // 2 + n, True)
        dec, iters = WorkShape(), []
        for _ in range(rows):
            dec = dec.add_decode(context)
            iters.append(model.predict(dec))
        p, d = model.predict(pre) / n, iters[-1] / rows
        if not (p > 0 and d > 0):  # a degenerate fit: fall back to counting tokens
            return cls()
        return cls(p, d, tuple(iters) if min(iters) > 0 else (),
                   float(getattr(model, "correction", 1.0)))


@dataclass(frozen=True)
class _Reading:
    t: float
    work: float  # cumulative work units
    backlogged: bool
    prefill: float = 0.0  # of `work`, the prompt tokens' units
    # the engine's cumulative (free iterations, their seconds) (None: unknown; `free_period`)
    free: Optional[tuple[int, float]] = None
    busy_s: Optional[float] = None  # cumulative seconds of offline iterations (`duty`)


class HarvestMeter:
    """Offline work units per backlogged wall second over the last `window_s` backlogged
    seconds (module doc)."""

    def __init__(self, cost: WorkCost = WorkCost(), window_s: float = 120.0,
                 min_span_s: float = 5.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if not 0 <= min_span_s <= window_s:
            raise ValueError(f"min_span_s must be in [0, window_s], got {min_span_s}")
        self.cost = cost
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._last: Optional[_Reading] = None
        # backlogged intervals (seconds, work units, of them prompt units), oldest first,
        # covering at most window_s seconds; replaced whole on every change (readers see a
        # consistent tuple)
        self._intervals: tuple[tuple[float, float, float], ...] = ()
        # backlogged intervals in which offline prompt tokens went in (seconds, prompt
        # units), oldest first, covering at most window_s seconds of such time however
        # long ago (`prompt_rate`); replaced whole like `_intervals`
        self._prompt_intervals: tuple[tuple[float, float], ...] = ()
        # (seconds, iterations) of the engine's free iterations between two readings, the
        # last window_s seconds of them however long ago (`free_period`)
        self._free_intervals: tuple[tuple[float, float], ...] = ()
        # backlogged intervals (seconds, seconds of offline iterations in them), the last
        # window_s seconds (`duty`); replaced whole like `_intervals`
        self._busy_intervals: tuple[tuple[float, float], ...] = ()
        # (seconds of offline iterations with an offline prompt in them, prompt units they
        # took) between two readings, the last window_s such seconds however long ago
        # (`prompt_rate`); replaced whole like `_intervals`
        self._prompt_busy: tuple[tuple[float, float], ...] = ()

    def observe(self, now: float, prefill_tokens_total: int, output_tokens_total: int,
                backlogged: bool, free: Optional[tuple[int, float]] = None,
                busy_s: Optional[float] = None) -> None:
        """One reading of the engine's cumulative offline counters at wall time `now`, and
        if known its free iterations (`EngineStats.offline_free_iterations`, `_s`: offline
        tokens and no offline prompt in them) and their seconds, and the seconds of its
        iterations with any offline work (`EngineStats.offline_busy_s`). A reading earlier
        than the previous one, or counters that went down (the engine restarted), forget
        the history."""
        work = self.cost.of(prefill_tokens_total, output_tokens_total)
        prefill = self.cost.of(prefill_tokens_total, 0)
        last, self._last = self._last, _Reading(now, work, bool(backlogged), prefill, free,
                                                busy_s)
        if last is None:
            return
        if now < last.t or work < last.work or (
                free is not None and last.free is not None and free[0] < last.free[0]) or (
                busy_s is not None and last.busy_s is not None and busy_s < last.busy_s):
            self._intervals = self._prompt_intervals = self._free_intervals = ()
            self._busy_intervals = self._prompt_busy = ()
            return
        if free is not None and last.free is not None and free[0] > last.free[0]:
            self._free_intervals = _slide(
                self._free_intervals + ((free[1] - last.free[1], float(free[0] - last.free[0])),),
                self.window_s)
        dt = now - last.t
        if not (last.backlogged and backlogged) or dt <= 0:
            return
        p = max(0.0, prefill - last.prefill)
        self._intervals = _slide(self._intervals + ((dt, work - last.work, p),), self.window_s)
        if busy_s is not None and last.busy_s is not None:
            busy = busy_s - last.busy_s
            self._busy_intervals = _slide(self._busy_intervals + ((dt, busy),), self.window_s)
            if p > 0 and free is not None and last.free is not None:
                prompting = busy - (free[1] - last.free[1])  # the offline iterations not free
                if prompting > 0:
                    self._prompt_busy = _slide(self._prompt_busy + ((prompting, p),),
                                               self.window_s)
        if p > 0:
            self._prompt_intervals = _slide(self._prompt_intervals + ((dt, p),), self.window_s)

    def span(self) -> tuple[float, float]:
        """(backlogged seconds, work units done in them) inside the window."""
        iv = self._intervals
        return sum(d for d, _, _ in iv), sum(w for _, w, _ in iv)

    def rate(self) -> Optional[float]:
        """Work units per backlogged wall second, or None with under `min_span_s` of
        backlogged time measured."""
        return self._per_second(self._intervals)

    def _per_second(self, iv: tuple) -> Optional[float]:
        """The amounts in intervals `iv` (seconds first, then the amount) per second, or
        None while they add up to under `min_span_s` seconds."""
        secs = sum(x[0] for x in iv)
        if secs < self.min_span_s or secs <= 0:
            return None
        return sum(x[1] for x in iv) / secs

    def prompt_rate(self) -> Optional[float]:
        """Prompt work units per wall second while offline prompts wait to go in: the prompt
        units per second of offline iterations with a prompt in them (over the last
        `window_s` such seconds, however long ago: a stretch of items only generating does
        not age it), over wall time by `duty()` (prompts go in only in offline iterations:
        an online burst can hold them back for seconds; bench_deadlines, full runs: an
        urgent job's 4,557 prompt tokens took 10 s in one run and 17 s in another, 8 s of
        it with no offline iteration at all). Before the engine times its iterations, the
        prompt units per second of the backlogged intervals in which prompts went in; while
        those add up to under `min_span_s` (or there is no rate), `rate()`. Never below
        `rate()`: a work unit is a second of a dedicated engine, and a run of prompts uses
        the engine at least as well as the offline mix does. (Per offline-busy second is
        low where offline prompts go in only as KV memory frees, a sliver of a chunk beside
        an online prompt counting the whole iteration: the same runs measured 0.22-0.29
        units a second this way, their harvest rates 0.30-0.34, and the urgent prompts
        went in at 0.27-0.40.) Offline work
        alternates between prompts going in (many units a second) and items only
        generating (few: KV memory holds only so many items), so `rate()`, the mean over
        both, is the throughput of a long stream of items; a few items served first take
        their prompts' units at this rate, then their generation time (`slack` module
        doc)."""
        rate = self.rate()
        per_busy, duty = self._per_second(self._prompt_busy), self.duty()
        r = (per_busy * duty if per_busy is not None and duty is not None
             else self._per_second(self._prompt_intervals))
        if r is None:
            return rate
        return r if rate is None else max(r, rate)

    def free_period(self) -> Optional[float]:
        """Seconds per engine iteration that generated offline tokens with no offline
        prompt in it (the engine times each from its scheduling to its commit), over the
        last `window_s` seconds of such iterations however long ago: the pace, a token an
        iteration, of an offline item served before every other offline prompt, at the
        fast end (an item left out of an iteration, or an iteration abandoned for an online
        arrival, makes it slower). None before `FREE_MIN_ITERATIONS` of them."""
        iv = self._free_intervals
        n = sum(i for _, i in iv)
        return sum(d for d, _ in iv) / n if n >= FREE_MIN_ITERATIONS else None

    def duty(self) -> Optional[float]:
        """The share of backlogged wall time the engine spent in iterations with offline
        work in them, over the last `window_s` backlogged seconds (at most 1): the rest went
        to online work alone (isolation: an online prompt's chunk can leave offline items no
        room for several seconds) or to waiting. An offline item served first advances
        only in that share, so its wall pace is `free_period()` / this. None with under
        `min_span_s` measured."""
        d = self._per_second(self._busy_intervals)
        return None if d is None else min(1.0, d)


def _slide(iv: tuple, window_s: float) -> tuple:
    """`iv` (intervals whose first field is seconds and the rest amounts in them, oldest
    first) cut to its last `window_s` seconds: the oldest dropped, the one straddling the
    edge kept in proportion."""
    out = list(iv)
    excess = sum(x[0] for x in out) - window_s
    while excess > 0 and out:
        d = out[0][0]
        if d <= excess:  # wholly outside the window
            out.pop(0)
            excess -= d
        else:  # partly: keep the share inside
            keep = (d - excess) / d
            out[0] = tuple(x * keep for x in out[0])
            excess = 0
    return tuple(out)
