"""`BatchRunner`: feeds stored batch items to the engine as OFFLINE requests.

One thread (started by `start`) owns everything in here: it claims pending items from
the `BatchStore`, submits at most `max_in_flight` of them to the engine at a time (the
engine is never flooded; its scheduler decides how many of those actually run), polls
their streams, and commits each item's result the moment its final delta arrives. It
also fails batches whose completion deadline has passed.

Other threads only call `wake`, `cancel_batch` (after `BatchStore.terminate`), `stop`
and read `in_flight`; requests from them travel through a queue, so the in-flight table
is touched by the runner thread alone.

Outcomes: stop/length/error results are committed as they are. An item the engine ends
as "cancelled" is committed as cancelled (batch cancelled) or failed (deadline passed)
when the runner asked for it; otherwise (the engine is shutting down) it is released and
runs again later, so no item is ever committed half-done by accident. Likewise an item
ended by the engine's death ("engine stopped") is released, not failed.

Store failures (database locked by another process, disk full): a result that cannot be
committed stays with the runner, counted in flight, and is retried every
`retry_commit_s` until it lands, so an item is never left "running" with its result lost.
The runner also deletes batches that finished more than `retention_s` ago and truncates
the WAL (every `purge_every_s`).
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field

from conserve_jax.engine_api import GenerationRequest, RequestClass, RequestOutput, RequestStream
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server import convert
from conserve_server.batch.store import BatchStore, ClaimedItem

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    item: ClaimedItem
    request_id: str
    stream: RequestStream
    outputs: list[RequestOutput] = field(default_factory=list)


class BatchRunner:
    def __init__(self, store: BatchStore, engine, max_in_flight: int, poll_s: float = 0.01,
                 deadline_check_s: float = 0.25, retry_commit_s: float = 0.5,
                 retention_s: float = 7 * 86400.0, purge_every_s: float = 60.0) -> None:
        self.store = store
        self.engine = engine
        self.max_in_flight = max(1, int(max_in_flight))
        self.poll_s = poll_s
        self.deadline_check_s = deadline_check_s
        self.retry_commit_s = retry_commit_s
        self.retention_s = retention_s
        self.purge_every_s = purge_every_s
        # store writes that failed, retried in order: ("commit", batch_id, result, outcome)
        # or ("release", batch_id, index, None)
        self._unwritten: list[tuple] = []
        self._retry_at = 0.0
        self._requests: "queue.Queue[tuple[str, str]]" = queue.Queue()  # (batch_id, outcome)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_until = 0.0
        self._in_flight: dict[str, _InFlight] = {}
        self._terminated: dict[str, str] = {}  # batch_id -> outcome for its stopped items
        self._count = 0
        # conserve_server.batch.offline_resume.OfflineResume or None: resume items from saved state, save
        # the unfinished ones at stop (set by ServerApp before start)
        self.offline = None
        self._thread = threading.Thread(target=self._run, name="batch-runner", daemon=True)

    @property
    def in_flight(self) -> int:
        return self._count

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def cancel_batch(self, batch_id: str, outcome: str = "cancelled") -> None:
        """Stop the batch's in-flight items; they are committed with `outcome`
        ("cancelled", or "error" for a passed deadline)."""
        self._requests.put((batch_id, outcome))
        self._wake.set()

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop claiming; let in-flight items finish for up to drain_timeout_s, then stop
        the rest and release them to run again after a restart."""
        self._drain_until = time.monotonic() + drain_timeout_s
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    # ---- runner thread -----------------------------------------------------------------
    def _run(self) -> None:
        next_deadline_check = 0.0
        next_purge = time.monotonic() + self.purge_every_s
        fill_after = 0.0  # back off after the engine refuses work
        while True:
            try:
                self._handle_requests()
                self._collect()
                self._retry_unwritten()
                if self._stopping.is_set():
                    if not self._in_flight or time.monotonic() >= self._drain_until:
                        break
                else:
                    now = time.monotonic()
                    if now >= next_deadline_check:
                        next_deadline_check = now + self.deadline_check_s
                        self._expire()
                    if now >= next_purge:
                        next_purge = now + self.purge_every_s
                        self._purge()
                    if now >= fill_after and not self._unwritten and not self._fill():
                        fill_after = now + 1.0
            except Exception:  # report and keep serving; never take the process down
                log.exception("batch runner iteration failed")
                self._wake.wait(0.5)
            busy = self._in_flight or self._unwritten
            self._wake.wait(self.poll_s if busy else 0.5)
            self._wake.clear()
        self._abandon()

    def _purge(self) -> None:
        n = self.store.purge(time.time() - self.retention_s)
        if n:
            log.info("retention: deleted %d batches finished over %.0f s ago", n, self.retention_s)

    def _write(self, op: tuple) -> None:
        """Do one store write now, or keep it for a retry if the store refuses it."""
        if self._unwritten:  # keep order behind earlier failed writes
            self._unwritten.append(op)
            return
        try:
            self._apply(op)
        except sqlite3.Error as e:
            log.warning("batch store write failed (%s); keeping the result and retrying", e)
            self._unwritten.append(op)
            self._retry_at = time.monotonic() + self.retry_commit_s

    def _apply(self, op: tuple) -> None:
        kind, batch_id, a, b = op[:4]
        if kind == "commit":
            self.store.commit_result(batch_id, a, b)
            self._item_done(op[4])
        else:
            self.store.release(batch_id, a)

    def _retry_unwritten(self) -> None:
        if not self._unwritten or time.monotonic() < self._retry_at:
            return
        while self._unwritten:
            try:
                self._apply(self._unwritten[0])
            except sqlite3.Error as e:
                log.warning("batch store write still failing (%s); %d results waiting",
                            e, len(self._unwritten))
                self._retry_at = time.monotonic() + self.retry_commit_s
                break
            self._unwritten.pop(0)
        self._count = len(self._in_flight) + len(self._unwritten)

    def _fill(self) -> bool:
        """Claim and submit items up to the in-flight bound. False if the engine refuses
        work (e.g. shutting down); claimed items it did not take are released."""
        claimed = self.store.claim(self.max_in_flight - len(self._in_flight))
        for n, item in enumerate(claimed):
            rid = f"b:{item.batch_id}:{item.index}:{uuid.uuid4().hex[:8]}"
            req = GenerationRequest(request_id=rid, prompt_token_ids=item.prompt_ids,
                                    sampling=convert.sampling_from_proto(item.request.sampling),
                                    request_class=RequestClass.OFFLINE)
            try:
                stream = self.offline.submit(item, req) if self.offline else self.engine.submit(req)
            except ValueError as e:  # e.g. the model changed since the batch was stored
                self._write(("commit", item.batch_id, convert.error_result(
                    item.index, item.request.request_id, "error", str(e)), "error", item))
                continue
            except RuntimeError as e:
                log.info("engine refused batch items (%s); stop submitting", e)
                for rest in claimed[n:]:
                    self._write(("release", rest.batch_id, rest.index, None))
                return False
            self._in_flight[rid] = _InFlight(item, rid, stream)
        self._count = len(self._in_flight) + len(self._unwritten)
        return True

    def _collect(self) -> None:
        for rid, f in list(self._in_flight.items()):
            if not f.stream.done.is_set():
                continue
            while True:
                try:
                    f.outputs.append(f.stream.get(timeout=0))
                except queue.Empty:
                    break
            del self._in_flight[rid]
            self._finish(f)
        self._count = len(self._in_flight) + len(self._unwritten)
        if self._terminated:  # forget ended batches once their stopped items are in
            busy = {f.item.batch_id for f in self._in_flight.values()}
            self._terminated = {b: o for b, o in self._terminated.items() if b in busy}

    def _finish(self, f: _InFlight) -> None:
        item = f.item
        final = f.outputs[-1] if f.outputs else None
        reason = final.finish_reason if final is not None and final.finished else "cancelled"
        result = convert.outputs_to_result(item.index, item.request.request_id, f.outputs)
        if reason == "cancelled":
            outcome = self._terminated.get(item.batch_id)
            if outcome is None:  # not our doing: the engine is stopping; run it again later
                self._write(("release", item.batch_id, item.index, None))
                return
            if outcome == "error":
                result = convert.error_result(item.index, item.request.request_id, "error",
                                              "batch deadline exceeded", partial=result)
            self._write(("commit", item.batch_id, result, outcome, item))
            return
        if reason == "error" and self.engine.failure is not None:
            # the engine died under it ("engine stopped"): not the item's fault; it runs
            # again when the restarted server resumes the batch
            self._write(("release", item.batch_id, item.index, None))
            return
        outcome = reason if reason in ("stop", "length") else "error"
        self._write(("commit", item.batch_id, result, outcome, item))

    def _item_done(self, item: ClaimedItem) -> None:
        """After its result is durable: the item's saved engine state is not needed."""
        if self.offline is not None:
            try:
                self.offline.item_done(item)
            except Exception:
                log.exception("deleting the saved state of a finished batch item failed")

    def _handle_requests(self) -> None:
        while True:
            try:
                batch_id, outcome = self._requests.get_nowait()
            except queue.Empty:
                return
            self._terminated[batch_id] = outcome
            for rid, f in self._in_flight.items():
                if f.item.batch_id == batch_id:
                    self.engine.cancel(rid)

    def _expire(self) -> None:
        for batch_id in self.store.expired(time.time()):
            if self.store.terminate(batch_id, "failed", "batch deadline exceeded"):
                log.info("batch %s failed: completion deadline passed", batch_id)
                self._requests.put((batch_id, "error"))

    def _abandon(self) -> None:
        """At stop: cancel what is still in flight; results that arrive finished anyway are
        committed, the rest are released to run again (when `offline` is set, their engine
        state is saved first, so that they resume from it)."""
        if self.offline is not None and self._in_flight:
            try:
                self.offline.suspend({rid: f.item for rid, f in self._in_flight.items()})
            except Exception:
                log.exception("saving unfinished batch items failed; they will recompute")
        for rid in list(self._in_flight):
            self.engine.cancel(rid)
        end = time.monotonic() + 2.0
        while self._in_flight and time.monotonic() < end:
            self._collect()
            time.sleep(0.005)
        for f in self._in_flight.values():
            self._write(("release", f.item.batch_id, f.item.index, None))
        self._in_flight.clear()
        self._retry_at = 0.0
        self._retry_unwritten()  # last try; what still fails is "running" in the database,
        self._count = 0          # and recovery makes it pending at the next start
