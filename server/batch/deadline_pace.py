"""`OfflinePace`: how fast offline items generate, as the deadline estimates need it
(`conserve_server.batch.deadlines`): seconds per output token of the offline items that
finished lately and of the items generating now; `ItemProgress`, what the batch runner
reports of an item inside the engine; `Paces`, the three paces an estimate uses, and the
arithmetic of a tail at them (`fast_end`, `tail`).

Who calls what: the batch runner's thread feeds it (`finished` when an item finished,
`live` at every deadline check with the progress of the items in flight); any thread
reads it (`median`, `lead`, `own`). All state is behind one lock and replaced whole.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Optional

TPOT_SAMPLES = 32  # finished offline items whose time per output token makes the tail
# an item generating counts in the pace once it generated this many tokens past its
# second: the wait after its first is not its pace (bench_deadlines: items that had just
# finished their prompt waited 3-7 s per token while the others' prompts went in, then
# generated at 0.3-1 s per token)
LIVE_MIN_TOKENS = 6


# an offline item served first is estimated to advance in at least this share of wall time
# (`fast_end`): a window in which online work took nearly every iteration does not make its
# tail 10x longer
MIN_DUTY = 0.25


@dataclass(frozen=True)
class Paces:
    """Seconds per output token the deadline estimates use, read once per look (module doc
    of `conserve_server.batch.deadlines`)."""

    median: float = 0.0  # `tpot`: items generating beside other items' prompts
    lead: float = 0.0  # the fast end (`tpot_lead`): what `hopeless` is judged at
    served: float = 0.0  # an item served first, as estimated


def faster(pace: float, other: Optional[float]) -> float:
    """The faster of `pace` (0: none known) and `other` (None: none known)."""
    if other is None:
        return pace
    return min(pace, other) if pace > 0 else other


def fast_end(quartile: float, free_s: Optional[float],
             duty: Optional[float]) -> tuple[float, float]:
    """(lead, served) from the lower quartile of the item paces (0: none), the engine's time
    per iteration with offline tokens and no offline prompt (`free_s`; None: unknown) and
    the share of wall time it spends in iterations with offline work (`duty`; None:
    unknown). lead: the faster of the quartile and `free_s`, optimistic (an item advances
    in every iteration). served: the same with `free_s` stretched to wall time, / `duty`
    (at least `MIN_DUTY`): an item advances only in offline iterations (bench_deadlines,
    full runs: the free period read 0.11-0.12 s, urgent items generated at 0.15-0.45 s a
    token while online prompts took whole seconds). Item paces are wall time already."""
    wall = free_s if free_s is None or duty is None else free_s / max(MIN_DUTY, duty)
    return faster(quartile, free_s), faster(quartile, wall)


def tail(tokens: float, behind_s: float, busy_s: float, free_s: float) -> float:
    """Seconds an item with `tokens` left to generate takes once its prompt is in: one token
    per `busy_s` while other batches' prompts go in beside it (`behind_s` seconds), then one
    per `free_s`."""
    busy = min(tokens, behind_s / busy_s) if busy_s > 0 else 0.0
    return busy * busy_s + (tokens - busy) * free_s


@dataclass(frozen=True)
class ItemProgress:
    """An item inside the engine, as the runner saw it at the last tick: tokens generated
    so far, and the seconds and tokens since its second token was seen (0 before)."""

    generated: int = 0
    steady_s: float = 0.0
    steady_tokens: int = 0


class OfflinePace:
    def __init__(self, samples: int = TPOT_SAMPLES) -> None:
        self._lock = threading.Lock()
        # seconds per output token of the offline items that finished last
        self._finished: collections.deque = collections.deque(maxlen=samples)
        self._live: tuple = ()  # the same of the items generating now
        self._own_fastest: dict[str, float] = {}  # batch id -> its items' fastest now

    def finished(self, tpot_s: Optional[float]) -> None:
        """An offline item finished after `tpot_s` seconds per output token after its
        first (None or 0: nothing to learn)."""
        if tpot_s is not None and tpot_s > 0:
            with self._lock:
                self._finished.append(tpot_s)

    def live(self, progress: dict[str, list[ItemProgress]]) -> None:
        """The items generating now, per batch: those `LIVE_MIN_TOKENS` past their second
        token are samples (seconds per token since it) until the next call."""
        own = {b: [p.steady_s / p.steady_tokens for p in ps
                   if p.steady_tokens >= LIVE_MIN_TOKENS] for b, ps in progress.items()}
        with self._lock:
            self._live = tuple(t for ts in own.values() for t in ts)
            self._own_fastest = {b: min(ts) for b, ts in own.items() if ts}

    def _samples(self) -> list[float]:
        with self._lock:
            return sorted(list(self._finished) + list(self._live))

    def count(self) -> int:
        """How many samples there are now (finished and live)."""
        return len(self._samples())

    def median(self) -> float:
        """The median over the samples (0 before any)."""
        s = self._samples()
        return s[len(s) // 2] if s else 0.0

    def lead(self) -> float:
        """The lower quartile of the samples (0 before any)."""
        s = self._samples()
        return s[len(s) // 4] if s else 0.0

    def own(self, batch_id: str, default: Optional[float]) -> Optional[float]:
        """The fastest of `batch_id`'s samples now, else `default`."""
        with self._lock:
            return self._own_fastest.get(batch_id, default)

