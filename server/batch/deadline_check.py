"""`DeadlineCheck`: the batch runner's part in offline deadlines, done at every deadline
check (`BatchRunner._deadline_check`, every `deadline_check_s`).

- `expire`: batches past their completion deadline are failed in the store; the runner is
  told (through the callback it passes) to stop their in-flight items, the tracker notes
  the miss, and the saved engine state of their items is dropped.
- `tick`: reads what every in-flight item generated so far (`drain`, never blocking),
  tells the `DeadlineTracker` (`deadlines.py`) how many items of each batch are inside
  the engine and their progress (`ItemProgress`), and takes its at-risk batches
  (`at_risk`: not hopeless, earliest deadline first), whose items the runner claims first.
- `mark_urgent`: tells the engine which in-flight items belong to those batches
  (`EngineAPI.set_urgent`, ranked; sent only when it changed).
- `urgent_room`: how far past a full claim window items of at-risk batches may be claimed.

`drain` also serves the runner's collection of finished items (their whole output).

Runner thread only (no locking). It mutates only itself, the in-flight records it is
given (`drain`: their outputs and token counts) and, through the calls above, the store,
the tracker, the offline state and the engine's urgent set; the in-flight table itself
belongs to the runner and is passed in, never kept. Its records are the runner's
`_InFlight` (not imported here: runner.py imports this module); read are `item`,
`stream`, `generated`, `steady_at` and `steady_from`, and `drain` writes `outputs`,
`generated`, `steady_at` and `steady_from`.
"""
from __future__ import annotations

import logging
import queue
import time
from typing import Callable

from conserve_server.batch.deadline_pace import ItemProgress

log = logging.getLogger(__name__)


def drain(f, now: float) -> None:
    """Move the deltas `f`'s stream holds into `f.outputs` (never blocks) and count its
    tokens: the progress the deadline estimates read, and at the end the whole output
    to commit (runner thread)."""
    while True:
        try:
            out = f.stream.get(timeout=0)
        except queue.Empty:
            break
        f.outputs.append(out)
        f.generated += len(out.token_ids)
    if f.steady_at is None and f.generated >= 2:
        f.steady_at, f.steady_from = now, f.generated


class DeadlineCheck:
    def __init__(self, engine) -> None:
        self.engine = engine
        # batch ids served first (the tracker's urgent_batches at the last deadline check:
        # at risk, not hopeless, earliest deadline first)
        self.at_risk: list[str] = []
        self._urgent_sent: dict = {}  # request id -> rank, last given to set_urgent

    @staticmethod
    def expire(store, tracker, offline, stop_items: Callable[[str], None]) -> None:
        """Fail the batches whose completion deadline has passed; `stop_items(batch_id)`
        has the runner stop (and commit as failed) that batch's in-flight items."""
        for batch_id in store.expired(time.time()):
            if store.terminate(batch_id, "failed", "batch deadline exceeded"):
                log.info("batch %s failed: completion deadline passed", batch_id)
                stop_items(batch_id)
                if tracker is not None:
                    tracker.note_expired(batch_id)
                if offline is not None:  # saved state of its items ended now: dropped
                    try:
                        offline.sweep()
                    except Exception:
                        log.exception("dropping saved state of an expired batch failed")

    def tick(self, tracker, in_flight: dict) -> None:
        """Re-estimate (tracker) with the progress of the items in flight, and mark the
        items of at-risk batches urgent."""
        now = time.monotonic()
        progress: dict[str, list[ItemProgress]] = {}
        for f in in_flight.values():
            drain(f, now)
            p = (ItemProgress(f.generated) if f.steady_at is None else
                 ItemProgress(f.generated, now - f.steady_at, f.generated - f.steady_from))
            progress.setdefault(f.item.batch_id, []).append(p)
        inside = {b: len(ps) for b, ps in progress.items()}
        tracker.tick(in_engine=inside, progress=progress)
        self.at_risk = tracker.urgent_batches()
        self.mark_urgent(in_flight)

    def mark_urgent(self, in_flight: dict) -> None:
        """Tell the engine which in-flight items belong to at-risk batches (served first
        among offline work, ranked by their batch's place in the at-risk list, earliest
        deadline first; under deadline_policy borrow they may use online budget)."""
        rank = {b: k for k, b in enumerate(self.at_risk)}  # the tracker's EDF order
        urgent = {rid: rank[f.item.batch_id] for rid, f in in_flight.items()
                  if f.item.batch_id in rank}
        if urgent != self._urgent_sent:
            self.engine.set_urgent(urgent)
            self._urgent_sent = urgent

    @staticmethod
    def urgent_room(max_in_flight: int, in_flight: dict) -> int:
        """How many items of at-risk batches to claim past a full claim window: up to
        `max_in_flight // 2` (at least 1) more in flight. Without it, a window filled by a
        loose job's items would keep an at-risk job out of the engine until they finish;
        inside, its items go first (`EngineAPI.set_urgent`)."""
        cap = max_in_flight + max(1, max_in_flight // 2)
        return max(0, cap - len(in_flight))
