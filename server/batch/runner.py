"""`BatchRunner`: feeds stored batch items to the engine as OFFLINE requests.

One thread (started by `start`) owns everything in here: it claims pending items from
the `BatchStore`, submits at most `max_in_flight` of them to the engine at a time (the
engine is never flooded; its scheduler decides how many of those actually run), polls
their streams, and commits each item's result the moment its final delta arrives. Every
`deadline_check_s` it runs the deadline check (`DeadlineCheck`, `deadline_check.py`):
batches whose completion deadline has passed fail, and the `DeadlineTracker` (harvest
rate, estimates; `deadlines.py`) is ticked; it also tells the tracker the length of every
finished item (the expected-output predictor behind the estimates).

Other threads only call `wake`, `cancel_batch` (after `BatchStore.terminate`), `stop`
and read `in_flight`; requests from them travel through a queue, so the in-flight table
is touched by the runner thread alone.

Outcomes: stop/length/error results are committed as they are. An item the engine ends
as "cancelled" is committed as cancelled (batch cancelled) or failed (deadline passed)
when the runner asked for it; otherwise (the engine is shutting down) it is released and
runs again later, so no item is ever committed half-done by accident. Likewise an item
ended by the engine's death ("engine stopped") is released, not failed.

Store failures (database locked by another process, disk full, PostgreSQL restarting or
unreachable: `STORE_ERRORS`): a result that cannot be committed stays with the runner,
counted in flight, and is retried every `retry_commit_s` until it lands, so an item is
never left "running" with its result lost. Results finished in one poll are committed
together (`commit_many`, one transaction on PostgreSQL).

Deadlines: items of batches the tracker finds at risk (`DeadlineCheck.at_risk`) are
claimed first and marked urgent in the engine (`EngineAPI.set_urgent`: served first among
offline work), also past a full claim window (`DeadlineCheck.urgent_room`). At every
deadline check the tracker is told how many items of each batch are inside the engine
(the engine serves those before unclaimed ones) and their progress so far.

Claim window (`_claim_window`): at most `max_in_flight` items inside the engine. On a
shared store the runner also claims only as its engine has idle capacity: while
`max_in_flight // 2` offline requests already wait in the engine's queue (online load is
taking the capacity), none, so a busy replica leaves the queue to idle ones.

Leases (shared store, i.e. PostgreSQL): every claimed item carries its lease epoch; commits
and releases are fenced by it. Every `lease_s / 3` the runner renews the leases of its
in-flight items (`StoreBase.renew`); an item whose lease is lost (this replica stalled
past its lease and another replica took the item over) is cancelled in the engine and
dropped with a log line, and a commit the store refuses is logged and dropped: another
replica owns that item's one result. The same heartbeat notices batches ended on another
replica (cancelled, deadline) and stops their items here, and runs `reap` (items of ended
batches whose replica died).
The runner also deletes batches that finished more than `retention_s` ago and truncates
the WAL (every `purge_every_s`).

Prefix-cache salt: an item's engine request carries `cache_salt(tenant)` of its batch's
tenant (`ServiceOptions.cache_salt`: the tenant, so one tenant's items never reuse another
tenant's cached KV), looked up once per batch (`store.get`) and kept while the batch has
items here; if the store cannot say, the claimed items are released and retried later.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from conserve_jax.engine_api import GenerationRequest, RequestClass, RequestOutput, RequestStream
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server import convert
from conserve_server.batch.deadline_check import DeadlineCheck, drain
from conserve_server.batch.store import STORE_ERRORS, ClaimedItem, StoreBase

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    item: ClaimedItem
    request_id: str
    stream: RequestStream
    outputs: list[RequestOutput] = field(default_factory=list)
    lost: bool = False  # the lease went to another replica: drop, never commit
    generated: int = 0  # tokens in `outputs` so far (read at deadline checks)
    # monotonic time and token count when its second token was first seen (its pace after)
    steady_at: Optional[float] = None
    steady_from: int = 0


class BatchRunner:
    def __init__(self, store: StoreBase, engine, max_in_flight: int, poll_s: float = 0.01,
                 deadline_check_s: float = 0.25, retry_commit_s: float = 0.5,
                 retention_s: float = 7 * 86400.0, purge_every_s: float = 60.0,
                 idle_claim_s: float = 0.25,
                 cache_salt: Optional[Callable[[str], Optional[str]]] = None) -> None:
        """`cache_salt`: a batch tenant's prefix-cache salt (default: the tenant itself, None
        for "", a batch stored without auth). `idle_claim_s`: after a claim that found
        fewer items than it asked for (the queue is drained), the next claim waits this
        long unless `wake` (a local submit) says there is new work: a busy runner used to
        claim every `poll_s`, 100 store round trips a second for nothing (PostgreSQL's on
        the engine's two cores and the GIL)."""
        self.store = store
        self.engine = engine
        self.max_in_flight = max(1, int(max_in_flight))
        self.poll_s = poll_s
        self.deadline_check_s = deadline_check_s
        self.retry_commit_s = retry_commit_s
        self.retention_s = retention_s
        self.purge_every_s = purge_every_s
        self.idle_claim_s = idle_claim_s
        self._claim_after = 0.0  # monotonic time of the next claim after a drained queue
        self._wakes = 0  # bumped by `wake`: a claim that raced a wake does not back off
        self.cache_salt = cache_salt or (lambda tenant: tenant or None)
        self._tenant_of: dict[str, str] = {}  # batch id -> its tenant (salts of its items)
        # store writes that failed, retried in order: ("commit", batch_id, result, outcome,
        # item) or ("release", batch_id, index, epoch)
        self._unwritten: list[tuple] = []
        self._retry_at = 0.0
        self._requests: "queue.Queue[tuple[str, str]]" = queue.Queue()  # (batch_id, outcome)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_until = 0.0
        self._in_flight: dict[str, _InFlight] = {}
        self._terminated: dict[str, str] = {}  # batch_id -> outcome for its stopped items
        self._count = 0
        self.lost_leases = 0  # items dropped because another replica took them over
        self.refused_commits = 0  # results the store refused (lease lost or already done)
        self._next_heartbeat = 0.0
        # conserve_server.batch.offline_resume.OfflineResume or None: resume items from saved state, save
        # the unfinished ones at stop (set by ServerApp before start)
        self.offline = None
        # conserve_server.batch.deadlines.DeadlineTracker or None: ticked at every deadline
        # check (harvest rate, estimates), told the length of every finished item (set by
        # ServerApp before start)
        self.deadlines = None
        self._deadline = DeadlineCheck(engine)  # at-risk batches, urgent
        self._thread = threading.Thread(target=self._run, name="batch-runner", daemon=True)

    @property
    def in_flight(self) -> int:
        return self._count

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New work may be claimable (a local submit): claim now. Any thread."""
        self._wakes += 1
        self._claim_after = 0.0
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
                        self._deadline_check()
                    if self.store.shared and now >= self._next_heartbeat:
                        self._next_heartbeat = now + getattr(self.store, "lease_s", 30.0) / 3
                        self._heartbeat()
                    if now >= next_purge:
                        next_purge = now + self.purge_every_s
                        self._purge()
                    if now >= max(fill_after, self._claim_after) and not self._unwritten \
                            and not self._fill():
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
        except STORE_ERRORS as e:
            log.warning("batch store write failed (%s); keeping the result and retrying", e)
            self._unwritten.append(op)
            self._retry_at = time.monotonic() + self.retry_commit_s

    def _apply(self, op: tuple) -> None:
        kind, batch_id, a, b = op[:4]
        if kind == "commit":
            if not self.store.commit_result(batch_id, a, b, op[4].epoch):
                self._refused(op[4])
            self._item_done(op[4])
        else:
            self.store.release(batch_id, a, b)

    def _refused(self, item: ClaimedItem) -> None:
        if self.store.shared:
            self.refused_commits += 1
            log.warning("result of batch item %s/%d not committed: its lease (epoch %d) was "
                        "lost or it already has a result; another replica owns it",
                        item.batch_id, item.index, item.epoch)

    def _write_commits(self, ops: list[tuple]) -> None:
        """Commit several results in one store call (or keep them all for a retry)."""
        if len(ops) < 2 or self._unwritten:
            for op in ops:
                self._write(op)
            return
        try:
            ok = self.store.commit_many([(op[1], op[2], op[3], op[4].epoch) for op in ops])
        except STORE_ERRORS as e:
            log.warning("batch store write failed (%s); keeping %d results and retrying",
                        e, len(ops))
            self._unwritten.extend(ops)
            self._retry_at = time.monotonic() + self.retry_commit_s
            return
        for op, hit in zip(ops, ok):
            if not hit:
                self._refused(op[4])
            self._item_done(op[4])

    def _retry_unwritten(self) -> None:
        if not self._unwritten or time.monotonic() < self._retry_at:
            return
        while self._unwritten:
            try:
                self._apply(self._unwritten[0])
            except STORE_ERRORS as e:
                log.warning("batch store write still failing (%s); %d results waiting",
                            e, len(self._unwritten))
                self._retry_at = time.monotonic() + self.retry_commit_s
                break
            self._unwritten.pop(0)
        self._count = len(self._in_flight) + len(self._unwritten)

    def _fill(self) -> bool:
        """Claim and submit items up to the in-flight bound. False if the engine refuses
        work (e.g. shutting down); claimed items it did not take are released."""
        want, only_urgent = self._claim_window(), False
        at_risk = self._deadline.at_risk
        if want <= 0 and at_risk:
            want = self._deadline.urgent_room(self.max_in_flight, self._in_flight)
            only_urgent = True
        if want <= 0:
            return True
        wakes = self._wakes
        claimed = self.store.claim(want, first=at_risk, only_first=only_urgent)
        if len(claimed) < want and wakes == self._wakes:
            # drained: claim again after idle_claim_s, or at once after a wake (a submit
            # that committed while this claim ran must not wait for the back-off)
            self._claim_after = time.monotonic() + self.idle_claim_s
        if not self._learn_tenants(claimed):
            return False
        for n, item in enumerate(claimed):
            rid = f"b:{item.batch_id}:{item.index}:{uuid.uuid4().hex[:8]}"
            tenant = self._tenant_of.get(item.batch_id)
            if tenant is None:  # the batch was deleted after the claim: nothing to run
                self._write(("release", item.batch_id, item.index, item.epoch))
                continue
            req = GenerationRequest(request_id=rid, prompt_token_ids=item.prompt_ids,
                                    sampling=convert.sampling_from_proto(item.request.sampling),
                                    request_class=RequestClass.OFFLINE,
                                    cache_salt=self.cache_salt(tenant))
            try:
                stream = self.offline.submit(item, req) if self.offline else self.engine.submit(req)
            except ValueError as e:  # e.g. the model changed since the batch was stored
                self._write(("commit", item.batch_id, convert.error_result(
                    item.index, item.request.request_id, "error", str(e)), "error", item))
                continue
            except RuntimeError as e:
                log.info("engine refused batch items (%s); stop submitting", e)
                for rest in claimed[n:]:
                    self._write(("release", rest.batch_id, rest.index, rest.epoch))
                return False
            self._in_flight[rid] = _InFlight(item, rid, stream)
        self._count = len(self._in_flight) + len(self._unwritten)
        if at_risk and claimed:
            self._deadline.mark_urgent(self._in_flight)
        return True

    def _deadline_check(self) -> None:
        """Expire batches past their deadline; re-estimate (tracker) and mark the items of
        at-risk batches urgent (`DeadlineCheck`)."""
        self._deadline.expire(self.store, self.deadlines, self.offline,
                              lambda batch_id: self._requests.put((batch_id, "error")))
        if self.deadlines is not None:
            self._deadline.tick(self.deadlines, self._in_flight)

    def _learn_tenants(self, claimed: list[ClaimedItem]) -> bool:
        """Look up the tenant of every claimed item's batch not yet known (one `get` per
        batch). False, with the claimed items released, if the store cannot answer now."""
        try:
            for batch_id in {c.batch_id for c in claimed} - set(self._tenant_of):
                row = self.store.get(batch_id)
                if row is not None:
                    self._tenant_of[batch_id] = row.tenant
        except STORE_ERRORS as e:
            log.warning("batch store unreachable after a claim (%s); releasing %d items",
                        e, len(claimed))
            for item in claimed:
                self._write(("release", item.batch_id, item.index, item.epoch))
            return False
        return True

    def _claim_window(self) -> int:
        """How many items to claim now: room under `max_in_flight`, and only while the
        engine's offline queue is short (its scheduler has idle capacity for them)."""
        room = self.max_in_flight - len(self._in_flight)
        if room <= 0 or not self.store.shared:  # alone on its store: nobody to leave work to
            return max(0, room)
        try:
            waiting = self.engine.stats().offline_waiting
        except Exception:  # an engine without stats: the in-flight bound alone
            return room
        return max(0, min(room, max(1, self.max_in_flight // 2) - waiting))

    def _collect(self) -> None:
        commits: list[tuple] = []
        for rid, f in list(self._in_flight.items()):
            if not f.stream.done.is_set():
                continue
            drain(f, time.monotonic())
            del self._in_flight[rid]
            op = self._finish(f)
            if op is not None:
                commits.append(op)
        if commits:
            self._write_commits(commits)
        self._count = len(self._in_flight) + len(self._unwritten)
        if self._terminated or len(self._tenant_of) > 256:
            busy = {f.item.batch_id for f in self._in_flight.values()}
            # forget ended batches once their stopped items are in
            self._terminated = {b: o for b, o in self._terminated.items() if b in busy}
            if len(self._tenant_of) > 256:  # tenants of batches with items here, looked up again
                self._tenant_of = {b: t for b, t in self._tenant_of.items() if b in busy}

    def _finish(self, f: _InFlight):
        """The commit op for a finished item (None when there is nothing to commit)."""
        item = f.item
        if f.lost:
            return None
        final = f.outputs[-1] if f.outputs else None
        reason = final.finish_reason if final is not None and final.finished else "cancelled"
        result = convert.outputs_to_result(item.index, item.request.request_id, f.outputs)
        if reason == "cancelled":
            outcome = self._terminated.get(item.batch_id)
            if outcome is None:  # not our doing: the engine is stopping; run it again later
                self._write(("release", item.batch_id, item.index, item.epoch))
                return None
            if outcome == "error":
                result = convert.error_result(item.index, item.request.request_id, "error",
                                              "batch deadline exceeded", partial=result)
            return ("commit", item.batch_id, result, outcome, item)
        if reason == "error" and self.engine.failure is not None:
            # the engine died under it ("engine stopped"): not the item's fault; it runs
            # again when the restarted server resumes the batch
            self._write(("release", item.batch_id, item.index, item.epoch))
            return None
        outcome = reason if reason in ("stop", "length") else "error"
        if outcome != "error" and self.deadlines is not None:
            self.deadlines.observe_length(item.request, item.prompt_ids,
                                          self._tenant_of.get(item.batch_id, ""),
                                          final.completion_tokens, final.mean_tpot_s)
        return ("commit", item.batch_id, result, outcome, item)

    def _heartbeat(self) -> None:
        """Shared store: renew this replica's leases, drop the lost ones, stop items of
        batches ended elsewhere, reap items of ended batches whose replica died."""
        flights = [f for f in self._in_flight.values() if not f.lost]
        try:
            lost = self.store.renew([(f.item.batch_id, f.item.index, f.item.epoch) for f in flights])
        except STORE_ERRORS as e:
            log.warning("could not renew batch item leases (%s); retrying", e)
            return
        for f in flights:
            if (f.item.batch_id, f.item.index) in lost:
                f.lost = True
                self.lost_leases += 1
                log.warning("lost the lease of batch item %s/%d (epoch %d): another replica "
                            "runs it now; dropping it here", f.item.batch_id, f.item.index,
                            f.item.epoch)
                self.engine.cancel(f.request_id)
        try:
            for batch_id in {f.item.batch_id for f in flights} - set(self._terminated):
                row = self.store.get(batch_id)
                if row is not None and row.state in ("cancelled", "failed"):
                    self.cancel_batch(batch_id, "cancelled" if row.state == "cancelled" else "error")
            n = self.store.reap()
        except STORE_ERRORS as e:
            log.warning("batch store unreachable in the heartbeat (%s); retrying", e)
            return
        if n:
            log.info("finished %d items of ended batches left by a stopped replica", n)

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
            if not f.lost:
                self._write(("release", f.item.batch_id, f.item.index, f.item.epoch))
        self._in_flight.clear()
        self._retry_at = 0.0
        self._retry_unwritten()  # last try; what still fails is "running" in the database,
        self._count = 0          # and recovery makes it pending at the next start
