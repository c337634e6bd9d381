"""Offline requests across a restart: `suspend_offline` saves them (token state and the KV
blocks already on host) and `submit(..., resume=saved)` takes them back.

A mixin of `Engine`, kept apart because it is one job. It uses the engine's state:
`config`, `checkpointer`, `vocab_size`, `_max_model_len`, `_lock`, `_stop`, `_suspends`
(the step loop runs `_suspend` for each job queued there), `_seqs` and `_finish`. Which
thread calls what is stated per method.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from conserve_jax.engine_api import GenerationRequest, RequestClass, validate_prompt
from conserve_jax.kv.persist import SavedRequest
from conserve_jax.request import Sequence

log = logging.getLogger(__name__)


class OfflineSuspension:
    """Engine mixin: save offline requests for a restart and check/take saved state back."""

    def checkpoint_layout(self) -> dict:
        """What a saved request's KV depends on: a checkpoint made under another layout is
        not used (model, random-weight seed, dtype, block size, tensor-parallel degree,
        block shape)."""
        c = self.config
        shape = (self.checkpointer.transfer.block_shape if self.checkpointer is not None
                 else None)
        return {"model": c.model, "weights_seed": c.seed if c.model.startswith("random:") else None,
                "dtype": c.dtype, "block_size": c.cache.block_size, "tp": c.tp,
                "block_shape": list(shape) if shape else None}

    def suspend_offline(self, request_ids: list[str], timeout_s: float = 60.0) -> dict[str, SavedRequest]:
        """Any thread. Stop the given unfinished offline requests at the next iteration
        boundary and return their saved state (token state + KV blocks already on host),
        keyed by request id; their streams end "cancelled". Requests that are unknown,
        online or have nothing worth saving are left alone. {} once the engine stops."""
        job = (list(request_ids), {}, threading.Event())
        with self._lock:
            if self._stop:
                return {}
            self._suspends.append(job)
            self._lock.notify_all()
        if not job[2].wait(timeout_s):
            log.warning("suspend_offline timed out after %.0f s", timeout_s)
            return {}
        return job[1]

    def _suspend(self, request_ids: list[str], out: dict, done: threading.Event) -> None:
        """Step-loop thread: export and end the requests `suspend_offline` asked for."""
        try:
            for rid in request_ids:
                seq = self._seqs.get(rid)
                if seq is None or seq.online or not (seq.num_computed or seq.num_generated):
                    continue
                blocks = np.zeros((0,), np.float32)
                if self.checkpointer is not None:
                    blocks = self.checkpointer.export_blocks(rid, seq.num_computed)
                out[rid] = SavedRequest(seq.token_ids[: seq.prompt_len],
                                        seq.token_ids[seq.prompt_len:], seq.seed,
                                        len(blocks) * self.config.cache.block_size, blocks)
                self._finish(seq, "cancelled")
        except Exception:
            log.exception("suspending offline requests failed")
        finally:
            done.set()

    def _check_resume(self, request: GenerationRequest, saved: SavedRequest) -> int:
        """Any thread (in `submit`): ValueError naming what does not fit; returns the seed."""
        if request.request_class is not RequestClass.OFFLINE:
            raise ValueError("resume: only offline requests resume from saved state")
        if [int(t) for t in saved.prompt_ids] != [int(t) for t in request.prompt_token_ids]:
            raise ValueError("resume: the saved prompt differs from the request's prompt")
        validate_prompt(list(saved.prompt_ids) + list(saved.generated_ids), self.vocab_size,
                        self._max_model_len)
        if request.sampling.logprobs is not None and saved.generated_ids:
            raise ValueError("resume: logprobs of the tokens generated before are not saved")
        if len(saved.generated_ids) >= request.sampling.max_tokens:
            raise ValueError("resume: the saved request already generated max_tokens")
        if len(saved.blocks) and (self.checkpointer is None or tuple(saved.blocks.shape[1:])
                                  != tuple(self.checkpointer.transfer.block_shape)):
            raise ValueError(f"resume: saved blocks of shape {saved.blocks.shape[1:]} do not "
                             f"fit this engine's KV cache")
        return int(saved.seed)

    def _take_resume(self, seq: Sequence, saved: SavedRequest) -> None:
        """Step-loop thread, at intake: load the saved blocks into the host pool so that the
        scheduler restores them when it first starts `seq` (like an evicted request)."""
        if self.checkpointer is None or not len(saved.blocks):
            return
        n = self.checkpointer.import_blocks(seq.request_id, saved.blocks)
        seq.num_computed = min(n * self.config.cache.block_size, saved.num_saved_tokens,
                               len(seq.token_ids) - 1)
