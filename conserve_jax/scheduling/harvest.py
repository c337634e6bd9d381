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
`window_s`; None until at least `min_span_s` of backlogged time is in the window (no
history: callers must say what they assume instead, see `slack.py`).

Pure host code with an explicit clock (callers pass `now`), so tests drive it with a fake
clock. Not thread-safe: one owner (the batch runner's thread) feeds it; readers on other
threads call `rate()`, which only reads an immutable snapshot (`_samples` is replaced, never
mutated in place, so a reader never sees a half-updated window).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class WorkCost:
    """Seconds of a dedicated engine per prefill token and per generated token."""

    prefill_s: float = 1.0
    decode_s: float = 1.0

    def __post_init__(self) -> None:
        if not (self.prefill_s > 0 and self.decode_s > 0):
            raise ValueError(f"WorkCost needs positive costs, got {self}")

    def of(self, prefill_tokens: float, output_tokens: float) -> float:
        return self.prefill_s * prefill_tokens + self.decode_s * output_tokens

    @classmethod
    def from_latency_model(cls, model, max_prefill_tokens: int, max_num_seqs: int,
                           context: int = 512) -> "WorkCost":
        """Per-token costs of the engine at throughput: one full prefill chunk starting at
        `context` // 2, and `max_num_seqs` decodes reading `context` tokens each."""
        from conserve_jax.scheduling.latency_model import WorkShape

        n = max(1, int(max_prefill_tokens))
        pre = WorkShape().add_prefill(n, context // 2 + n, True)
        dec = WorkShape()
        for _ in range(max(1, int(max_num_seqs))):
            dec = dec.add_decode(context)
        p, d = model.predict(pre) / n, model.predict(dec) / max(1, int(max_num_seqs))
        if not (p > 0 and d > 0):  # a degenerate fit: fall back to counting tokens
            return cls()
        return cls(p, d)


@dataclass(frozen=True)
class _Sample:
    t: float
    work: float  # cumulative work units
    backlogged: bool


class HarvestMeter:
    """Offline work units per backlogged wall second over a sliding window (module doc)."""

    def __init__(self, cost: WorkCost = WorkCost(), window_s: float = 120.0,
                 min_span_s: float = 5.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if not 0 <= min_span_s <= window_s:
            raise ValueError(f"min_span_s must be in [0, window_s], got {min_span_s}")
        self.cost = cost
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._samples: tuple[_Sample, ...] = ()

    def observe(self, now: float, prefill_tokens_total: int, output_tokens_total: int,
                backlogged: bool) -> None:
        """One reading of the engine's cumulative offline counters at wall time `now`.
        Readings must come in time order; a counter that went down (engine restart) starts
        the window afresh."""
        work = self.cost.of(prefill_tokens_total, output_tokens_total)
        s = self._samples
        if s and (now < s[-1].t or work < s[-1].work):
            s = ()
        cut = now - self.window_s
        first = next((i for i, x in enumerate(s) if x.t >= cut), len(s))
        keep = list(s[max(0, first - 1):])  # one sample at or before the cut covers its edge
        keep.append(_Sample(now, work, bool(backlogged)))
        self._samples = tuple(keep)

    def span(self) -> tuple[float, float]:
        """(backlogged seconds, work units done in them) inside the window."""
        s = self._samples
        if not s:
            return 0.0, 0.0
        start = s[-1].t - self.window_s
        secs = work = 0.0
        for a, b in zip(s, s[1:]):
            if not (a.backlogged and b.backlogged) or b.t <= start:
                continue
            dt = b.t - a.t
            if dt <= 0:
                continue
            frac = min(1.0, (b.t - start) / dt)  # part of the interval inside the window
            secs += dt * frac
            work += (b.work - a.work) * frac
        return secs, work

    def rate(self) -> Optional[float]:
        """Work units per backlogged wall second, or None with under `min_span_s` of
        backlogged time in the window."""
        secs, work = self.span()
        if secs < self.min_span_s or secs <= 0:
            return None
        return work / secs
