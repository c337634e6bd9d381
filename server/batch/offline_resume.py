"""Batch items survive a graceful restart: save their engine state at shutdown, resume at claim.

`OfflineResume` is the server's glue between the `BatchRunner`, the engine and the on-disk
`CheckpointDir` (`<data-dir>/offline-kv/`, one checkpoint per batch item, named
`<batch_id>-<index>`). The batch runner calls it from its own thread only:

- `submit(item, request)` when it hands a claimed item to the engine: if the item has a
  usable checkpoint, the engine resumes it from there (restored tokens, only the unsaved
  tail recomputed, the sampler's seed and counter continuing); otherwise, or if the engine
  refuses the saved state, it starts from its prompt as before.
- `item_done(item)` when the item's one result is committed (finished, failed, cancelled):
  its checkpoint is deleted.
- `suspend(in_flight)` at shutdown, after the drain window, before the runner releases the
  items still in flight: the engine stops them and returns their state, which is written
  to disk (bounded; see `CheckpointDir`). The runner then releases them as before, so a
  SIGKILL at any point keeps today's behaviour: the item runs again (from a checkpoint only
  if one was completely written) and commits exactly one result.

Leases (shared PostgreSQL store): the claim epoch of each saved item is kept beside the
checkpoints (`<data-dir>/offline-kv-leases.json`). A checkpoint is used only if this
replica's new claim directly follows the one it saved under (epoch + 1: nobody claimed the
item in between); otherwise another replica took the item over meanwhile, and the
checkpoint is discarded with a log line and the item starts from its prompt. (With sqlite
one process claims, so a checkpoint is always its own.)

`sweep()` (at start and after saving) deletes checkpoints whose item already has a result or
whose batch is gone (e.g. a batch cancelled while its saved items were pending).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from typing import Optional

from conserve_server.batch.store import ClaimedItem, StoreBase

log = logging.getLogger(__name__)


def _key(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index}"


class OfflineResume:
    def __init__(self, engine, store: StoreBase, data_dir: str, max_bytes: int) -> None:
        from conserve_jax.kv.persist import CheckpointDir

        self.engine = engine
        self.store = store
        self.dir = CheckpointDir(os.path.join(data_dir, "offline-kv"),
                                 engine.checkpoint_layout(), max_bytes)
        self.leases_path = os.path.join(data_dir, "offline-kv-leases.json")
        self.resumed = 0  # items started from a checkpoint (for tests and logs)
        self.sweep()
        # orbax takes seconds to import: do it now, off the listening and the shutdown path
        threading.Thread(target=importlib.import_module, args=("orbax.checkpoint",),
                         name="orbax-import", daemon=True).start()

    @classmethod
    def create(cls, engine, store: StoreBase, data_dir: str,
               max_bytes: int) -> Optional["OfflineResume"]:
        """None when persisting is off (max_bytes 0) or the engine cannot suspend/resume
        (the mock engine)."""
        if max_bytes <= 0 or not hasattr(engine, "suspend_offline"):
            return None
        return cls(engine, store, data_dir, max_bytes)

    # ---- batch-runner thread -------------------------------------------------------------
    def submit(self, item: ClaimedItem, request):
        key = _key(item.batch_id, item.index)
        saved = self.dir.load(key)
        if saved is not None and not self._lease_continues(key, item):
            self.dir.delete(key)
            saved = None
        if saved is not None:
            try:
                stream = self.engine.submit(request, resume=saved)
            except ValueError as e:
                log.warning("not resuming batch item %s from its checkpoint: %s", key, e)
                self.dir.delete(key)
            else:
                self.resumed += 1
                log.info("batch item %s resumes: %d tokens generated, %d tokens of KV saved",
                         key, len(saved.generated_ids), saved.num_saved_tokens)
                return stream
        return self.engine.submit(request)

    def _read_leases(self) -> dict:
        try:
            with open(self.leases_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _write_leases(self, leases: dict) -> None:
        tmp = self.leases_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(leases, f)
        os.replace(tmp, self.leases_path)

    def _lease_continues(self, key: str, item: ClaimedItem) -> bool:
        if not self.store.shared:  # one process claims from this store: nobody else ran it
            return True
        saved_epoch = self._read_leases().get(key)
        if saved_epoch is None or item.epoch == saved_epoch + 1:
            return True
        log.warning("discarding the saved state of batch item %s: saved under lease epoch %d, "
                    "claimed now with epoch %d (another replica ran it meanwhile)", key,
                    saved_epoch, item.epoch)
        return False

    def item_done(self, item: ClaimedItem) -> None:
        self.dir.delete(_key(item.batch_id, item.index))

    def suspend(self, in_flight: dict[str, ClaimedItem]) -> None:
        """Save the state of the in-flight items (request id -> item) the engine still runs."""
        if not in_flight:
            return
        t0 = time.monotonic()
        saved = self.engine.suspend_offline(list(in_flight))
        t1 = time.monotonic()
        entries = [(_key(in_flight[rid].batch_id, in_flight[rid].index), s)
                   for rid, s in saved.items()]
        written = self.dir.save_all(entries)
        by_key = {_key(i.batch_id, i.index): i.epoch for i in in_flight.values()}
        try:
            leases = self._read_leases()
            leases.update({k: by_key[k] for k in written if k in by_key})
            on_disk = set(self.dir.keys())
            self._write_leases({k: e for k, e in leases.items() if k in on_disk})
        except OSError:
            log.exception("recording the lease epochs of saved batch items failed")
        log.info("saved %d of %d unfinished batch items (%d tokens of KV, %.1f MB) to %s: "
                 "engine %.2f s, writing %.2f s", len(written), len(in_flight),
                 sum(s.num_saved_tokens for s in saved.values()),
                 sum(s.nbytes for s in saved.values()) / 2**20, self.dir.directory, t1 - t0,
                 time.monotonic() - t1)
        self.sweep()

    def sweep(self) -> None:
        for key in self.dir.keys():
            batch_id, _, index = key.rpartition("-")
            if not index.isdigit():
                continue
            row = self.store.get(batch_id)
            done = row is None or row.state in ("completed", "cancelled", "failed") or any(
                idx == int(index) for idx, _ in self.store.results(batch_id, int(index), 1))
            if done:
                self.dir.delete(key)
