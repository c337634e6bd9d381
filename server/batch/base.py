"""The batch store's contract, shared by its two implementations (`sqlite_store`: the
embedded default under `--data-dir`; `pg_store`: one PostgreSQL database shared by a
fleet of replicas). `conserve_server.batch.store.open_store(url)` picks one.

Items: pending -> running (claimed under a lease) -> done (exactly one result). A claim
returns each item with its lease epoch; `commit_result(..., epoch=e)` commits only while
the item is still running under epoch `e` (fencing: a replica that lost its lease cannot
write a second result), and never for an item that already has a result.

Every method may be called from any thread. Failures to reach the database raise one of
`STORE_ERRORS` (`sqlite3.Error` or `StoreUnavailable`); the store stays usable and the
caller retries (the batch runner keeps unwritten results and retries them).
"""
from __future__ import annotations

import abc
import hashlib
import sqlite3
from dataclasses import dataclass
from typing import Optional, Sequence
from urllib.parse import urlsplit

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb

ACTIVE = ("queued", "running")
TERMINAL = ("completed", "cancelled", "failed")


class DataDirInUse(RuntimeError):
    """Another live process holds the data directory's lock."""


class IdempotencyConflict(ValueError):
    """An idempotency key was reused with a different payload."""


class QuotaExceeded(RuntimeError):
    """The tenant already has too many unfinished batch items stored."""


class StoreUnavailable(RuntimeError):
    """The database cannot be reached now (restart, lost connection); retry later."""


STORE_ERRORS = (sqlite3.Error, StoreUnavailable)


@dataclass
class BatchRow:
    id: str
    tenant: str
    state: str
    total: int
    done: int
    failed: int
    cancelled: int
    created_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    deadline: Optional[float]
    error: str
    seq: int
    # deadline bookkeeping (issue 27), written once at creation: the batch's work in
    # tokens (prompt tokens, expected output tokens) and its estimated completion time
    # then (unix s; None: no estimate, e.g. no harvest history yet)
    work_prompt_tokens: int = 0
    work_output_tokens: int = 0
    estimate_at: Optional[float] = None
    # the expected output tokens of its longest item (0: not recorded, e.g. a batch from
    # before this column: its items are taken alike)
    work_longest_output: int = 0


@dataclass(frozen=True)
class BatchWork:
    """What `create_batch` records for deadline estimates (see `BatchRow`)."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    estimate_at: Optional[float] = None
    longest_output_tokens: int = 0


@dataclass
class ClaimedItem:
    batch_id: str
    index: int
    request: pb.GenerateRequest
    prompt_ids: list[int]
    epoch: int = 0  # lease epoch this claim holds (fencing token)


BATCH_COLS = ("id, tenant, state, total, done, failed, cancelled, created_at, started_at, "
              "finished_at, deadline, error, seq, work_prompt_tokens, work_output_tokens, "
              "estimate_at, work_longest_output")


def insert_batch(placeholder: str, batch_id: str, tenant: str, total: int,
                 created_at: float, deadline: Optional[float], idempotency_key: Optional[str],
                 digest: str, work: Optional[BatchWork]) -> tuple[str, tuple]:
    """The INSERT of a new queued batch row and its values, in the store's placeholder
    style ('?' for sqlite3, '%s' for psycopg): one column list for both stores. `work`
    None: no deadline bookkeeping (zeros, no estimate)."""
    work = work or BatchWork()
    row = {"id": batch_id, "tenant": tenant, "state": "queued", "total": total,
           "created_at": created_at, "deadline": deadline,
           "idempotency_key": idempotency_key or None, "payload_sha": digest,
           "work_prompt_tokens": int(work.prompt_tokens),
           "work_output_tokens": int(work.output_tokens), "estimate_at": work.estimate_at,
           "work_longest_output": int(work.longest_output_tokens)}
    marks = ", ".join([placeholder] * len(row))
    return f"INSERT INTO batches ({', '.join(row)}) VALUES ({marks})", tuple(row.values())


def payload_digest(items: list[tuple[pb.GenerateRequest, list[int]]],
                   deadline: Optional[float]) -> str:
    """A digest of what a SubmitBatch asked for (compares idempotent retries)."""
    h = hashlib.sha256()
    for req, _ in items:
        blob = req.SerializeToString(deterministic=True)
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    h.update(repr(deadline).encode())
    return h.hexdigest()


def is_locked_error(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and "locked" in str(e).lower()


def is_full_error(e: BaseException) -> bool:
    return isinstance(e, sqlite3.Error) and (
        getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(e).lower())


def redact_url(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def without_prompt(req: pb.GenerateRequest) -> bytes:
    """The request to store: its prompt lives in `prompt_ids` only."""
    r = pb.GenerateRequest()
    r.CopyFrom(req)
    r.ClearField("input")
    return r.SerializeToString()


def end_result(idx: int, request_blob: bytes, outcome: str, error: str) -> pb.BatchResult:
    """The result a pending item gets when its batch ends (cancelled or failed)."""
    rid = pb.GenerateRequest.FromString(request_blob).request_id
    reason = pb.FINISH_REASON_CANCELLED if outcome == "cancelled" else pb.FINISH_REASON_ERROR
    return pb.BatchResult(index=idx, request_id=rid, finish_reason=reason, error=error)


class StoreBase(abc.ABC):
    """What the servicer, the HTTP front, the runner and metrics use. `shared` is True
    when other processes claim from the same database (then leases matter and the runner
    heartbeats them); `path` names the database for logs (no password)."""

    shared: bool = False
    path: str = ""
    closed: bool = False

    @property
    def healthy(self) -> bool:
        """False while the database cannot be reached (last operation failed)."""
        return True

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def create_batch(self, tenant: str, items: list[tuple[pb.GenerateRequest, list[int]]],
                     deadline: Optional[float] = None, idempotency_key: str = "",
                     max_tenant_items: Optional[int] = None,
                     work: Optional[BatchWork] = None) -> tuple[str, bool]: ...

    @abc.abstractmethod
    def find_by_key(self, tenant: str, idempotency_key: str) -> Optional[BatchRow]:
        """The tenant's batch created with this idempotency key, if any."""

    @abc.abstractmethod
    def active(self) -> list[BatchRow]:
        """Every queued or running batch of every tenant (deadline estimates)."""

    @abc.abstractmethod
    def claim(self, n: int, first: Sequence[str] = (),
              only_first: bool = False) -> list[ClaimedItem]:
        """Claim up to n items: of the batches `first` names (at-risk jobs, in that
        order) before anything else, then (unless `only_first`) in the store's fair
        order."""

    @abc.abstractmethod
    def release(self, batch_id: str, index: int, epoch: Optional[int] = None) -> None: ...

    @abc.abstractmethod
    def commit_result(self, batch_id: str, result: pb.BatchResult, outcome: str,
                      epoch: Optional[int] = None) -> bool: ...

    def commit_many(self, entries: list[tuple[str, pb.BatchResult, str, Optional[int]]]) -> list[bool]:
        """Commit several results (batch_id, result, outcome, epoch); per entry, whether it
        committed. A store may do it in one transaction."""
        return [self.commit_result(b, r, o, e) for b, r, o, e in entries]

    def checkpoint(self) -> None:
        """Bound the store's own log (sqlite: truncate the WAL)."""

    def renew(self, leases: list[tuple[str, int, int]]) -> set[tuple[str, int]]:
        """Heartbeat: extend the leases (batch_id, index, epoch) this process holds;
        returns the (batch_id, index) whose lease is lost (re-claimed by another replica,
        or the item ended). A store without other claimants loses none."""
        return set()

    def publish_rate(self, rate: Optional[float]) -> None:
        """Record this process's offline harvest rate (work units per second; None: no
        history yet) for the fleet's estimates. A store without other claimants keeps
        nothing."""

    def fleet_rate(self, max_age_s: float) -> Optional[float]:
        """The sum of the harvest rates replicas published within `max_age_s` (None: none
        did, or the store has no other claimants: use this process's own)."""
        return None

    def reap(self) -> int:
        """Maintenance any replica may run: end items of ended batches whose lease
        expired (their owner died). Returns how many got their result."""
        return 0

    @abc.abstractmethod
    def terminate(self, batch_id: str, state: str, error: str = "") -> bool: ...

    @abc.abstractmethod
    def delete(self, batch_id: str) -> bool: ...

    @abc.abstractmethod
    def purge(self, finished_before: float) -> int: ...

    @abc.abstractmethod
    def get(self, batch_id: str) -> Optional[BatchRow]: ...

    @abc.abstractmethod
    def list(self, tenant: Optional[str], limit: int,
             after_id: Optional[str] = None) -> list[BatchRow]: ...

    @abc.abstractmethod
    def results(self, batch_id: str, start: int, limit: int = 256) -> list[tuple[int, bytes]]: ...

    @abc.abstractmethod
    def expired(self, now: float) -> list[str]: ...

    @abc.abstractmethod
    def counts(self, tenant: Optional[str] = None) -> dict[str, int]: ...

    @abc.abstractmethod
    def item_totals(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def wait_for_change(self, seen_version: int, timeout: float) -> int: ...

    @property
    @abc.abstractmethod
    def version(self) -> int: ...
