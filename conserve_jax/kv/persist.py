"""Offline KV checkpoints on disk: one orbax checkpoint per saved request, written atomically.

What is saved (`SavedRequest`): a request's token state (prompt, generated tokens, sampler
seed; the sampler's counter is the number of generated tokens, so it continues by itself)
and the KV of its first `len(blocks)` blocks, as the engine's host pool holds them
([n, layers, 2, kv_heads, block_size, head_dim], the full unsharded heads), perhaps none (a
policy without KV checkpoints saves tokens only; orbax refuses zero-size arrays, so an
empty array is saved as one element and its shape in the meta).

On disk (`CheckpointDir`): `<directory>/<key>/` is an orbax checkpoint written by
`orbax.checkpoint.Checkpointer(CompositeCheckpointHandler())` with two items, "kv" (the
blocks array, `StandardSave`) and "meta" (`JsonSave`: token state, the engine's layout, a
CRC32 of the blocks). One process writes and reads it (process 0 in a multi-process run,
which joins every process's KV heads into its blocks). Orbax writes into `<key>.orbax-checkpoint-tmp*` and renames it to
`<key>` only when everything is on disk (`AtomicRenameTemporaryPath`), so a save cut short by
SIGKILL or a full disk leaves a temporary directory, which `CheckpointDir` never loads and
deletes at open. A finalized checkpoint whose layout (model, dtype, block size, tensor-
parallel degree, number of processes, block shape) differs from the engine's (the log line
names the fields that differ), or whose content does not read back
or does not match its CRC, is deleted with a log line and the request recomputes.

Threading: not thread-safe; the server's glue calls it from one thread at a time (the batch
runner's thread at shutdown and when it claims items). Imports nothing from the engine.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KEY = re.compile(r"^[A-Za-z0-9_.:-]+$")
_TMP_MARK = ".orbax-checkpoint-tmp"


@dataclass
class SavedRequest:
    """A request's resumable state. `num_saved_tokens` tokens have their KV in `blocks`
    (a multiple of the block size, at most len(blocks) * block_size)."""

    prompt_ids: list[int]
    generated_ids: list[int]
    seed: int
    num_saved_tokens: int
    blocks: np.ndarray  # [n, layers, 2, kv_heads, block_size, head_dim]

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _this_process_only(ocp):
    """Orbax options for a checkpoint written and read by this process alone: in a
    multi-process run orbax would otherwise wait at barriers for every process (only
    process 0 saves; the other processes' KV heads are already joined into its blocks)."""
    import jax

    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                              barrier_sync_key_prefix=f"conserve-kv-{me}")


def layout_differences(saved: dict, mine: dict) -> str:
    """'name: saved value != this engine's' for every field that differs."""
    names = sorted(set(saved) | set(mine))
    return "; ".join(f"{n}: saved {saved.get(n)!r} != this engine's {mine.get(n)!r}"
                     for n in names if saved.get(n) != mine.get(n))


class CheckpointDir:
    """Saved requests under `directory`, keyed by a caller-chosen name ([A-Za-z0-9_.:-]+).
    `layout` describes the engine that may use them (compared on load); `max_bytes` bounds
    the directory's total size (saves that would exceed it are skipped and logged)."""

    def __init__(self, directory: str, layout: dict, max_bytes: int) -> None:
        self._ocp = None  # orbax, imported at the first save or load (seconds to import)
        self._ckpt = None
        self.directory = os.path.abspath(directory)
        self.layout = {"format": FORMAT_VERSION, **layout}
        self.max_bytes = int(max_bytes)
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # saves that never finished
            if _TMP_MARK in name:
                log.info("deleting unfinished offline checkpoint %s", name)
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _orbax(self):
        if self._ocp is None:
            import orbax.checkpoint as ocp

            alone = _this_process_only(ocp)
            handler = ocp.CompositeCheckpointHandler(
                composite_options=ocp.CompositeOptions(multiprocessing_options=alone))
            self._ckpt = ocp.Checkpointer(handler, multiprocessing_options=alone)
            self._ocp = ocp
        return self._ocp

    def _path(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"checkpoint key {key!r} must match {_KEY.pattern}")
        return os.path.join(self.directory, key)

    def keys(self) -> list[str]:
        return sorted(n for n in os.listdir(self.directory)
                      if _TMP_MARK not in n and os.path.isdir(os.path.join(self.directory, n)))

    def bytes_used(self) -> int:
        return _dir_bytes(self.directory)

    def delete(self, key: str) -> None:
        shutil.rmtree(self._path(key), ignore_errors=True)

    # ---- save ---------------------------------------------------------------------------
    def save_all(self, entries: list[tuple[str, SavedRequest]]) -> list[str]:
        """Write each (key, saved request) in order until the size bound would be passed;
        returns the keys written. A key already on disk is replaced."""
        used = self.bytes_used()
        written, skipped, skipped_tokens = [], 0, 0
        for key, saved in entries:
            path = self._path(key)
            if os.path.exists(path):
                used -= _dir_bytes(path)
                self.delete(key)
            if used + saved.nbytes > self.max_bytes:
                skipped += 1
                skipped_tokens += saved.num_saved_tokens
                continue
            try:
                self._save(path, saved)
            except Exception:  # a failed save must not stop the others or the shutdown
                log.exception("saving offline checkpoint %s failed", key)
                self.delete(key)
                continue
            used += _dir_bytes(path)
            written.append(key)
        if skipped:
            log.warning("offline checkpoint size limit (%.1f MB) reached: %d request(s) with "
                        "%d saved tokens not written; they will recompute after restart",
                        self.max_bytes / 2**20, skipped, skipped_tokens)
        return written

    def _save(self, path: str, saved: SavedRequest) -> None:
        ocp = self._orbax()
        meta = {"layout": self.layout, "prompt_ids": [int(t) for t in saved.prompt_ids],
                "generated_ids": [int(t) for t in saved.generated_ids],
                "seed": int(saved.seed), "num_saved_tokens": int(saved.num_saved_tokens),
                "num_blocks": int(saved.blocks.shape[0]), "crc32": _crc(saved.blocks)}
        blocks = saved.blocks
        if blocks.size == 0:  # orbax refuses zero-size arrays: one element stands in
            meta["empty_shape"] = list(blocks.shape)
            blocks = np.zeros(1, blocks.dtype)
        self._ckpt.save(path, args=ocp.args.Composite(
            kv=ocp.args.StandardSave({"blocks": blocks}), meta=ocp.args.JsonSave(meta)))

    # ---- load ---------------------------------------------------------------------------
    def load(self, key: str) -> Optional[SavedRequest]:
        """The saved request under `key`, or None (absent). An unusable checkpoint
        (layout mismatch, unreadable, CRC mismatch, inconsistent) is deleted and logged."""
        path = self._path(key)
        if not os.path.isdir(path):
            return None
        ocp = self._orbax()
        try:
            meta = self._ckpt.restore(path, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
            if meta.get("layout") != self.layout:
                return self._discard(key, "made by a different engine layout ("
                                     + layout_differences(meta.get("layout") or {},
                                                          self.layout) + ")")
            blocks = self._ckpt.restore(path, args=ocp.args.Composite(
                kv=ocp.args.StandardRestore()))["kv"]["blocks"]
            blocks = np.asarray(blocks)
            if "empty_shape" in meta:  # saved without KV (`_save`)
                blocks = np.zeros(meta["empty_shape"], blocks.dtype)
            saved = SavedRequest(list(meta["prompt_ids"]), list(meta["generated_ids"]),
                                 int(meta["seed"]), int(meta["num_saved_tokens"]), blocks)
        except Exception as e:  # corrupted files: orbax/tensorstore/json errors of any kind
            return self._discard(key, f"unreadable ({type(e).__name__}: {e})")
        if blocks.shape[0] != meta["num_blocks"] or _crc(blocks) != meta["crc32"]:
            return self._discard(key, "content does not match its checksum")
        bs = self.layout.get("block_size")
        if bs and not 0 <= saved.num_saved_tokens <= len(blocks) * bs:
            return self._discard(key, "inconsistent token count")
        return saved

    def _discard(self, key: str, why: str) -> None:
        log.warning("discarding offline checkpoint %s: %s; the request recomputes", key, why)
        self.delete(key)
        return None
