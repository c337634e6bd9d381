"""Offline requests across a restart: how one request's state is saved (`export`), checked
against this engine (`check`) and taken back (`take`), and what a saved checkpoint depends
on (`layout`).

`OfflineSuspension` is a component the `Engine` holds, built once from the engine's
configuration, its checkpointer (None for policies without one), vocabulary size and
context limit. It keeps no state of its own and never touches the engine's queues or
threads: the engine decides when to call it. `check` runs on the caller's thread of
`Engine.submit` (pure); `export` and `take` run on the step-loop thread, which owns the
sequence and the checkpointer's host pool.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from conserve_jax.config import EngineConfig
from conserve_jax.engine_api import GenerationRequest, RequestClass, validate_prompt
from conserve_jax.kv.checkpointer import KVCheckpointer
from conserve_jax.kv.persist import SavedRequest
from conserve_jax.request import Sequence


class OfflineSuspension:
    def __init__(self, config: EngineConfig, checkpointer: Optional[KVCheckpointer],
                 vocab_size: int, max_model_len: int) -> None:
        self.config = config
        self.checkpointer = checkpointer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def layout(self) -> dict:
        """What a saved request's KV depends on: a checkpoint made under another layout is
        not used (`EngineConfig.kv_content`: model, random-weight seed, dtypes of weights
        and compute, block size; plus the tensor-parallel degree, the number of processes
        the devices are spread over, the pipeline stages if more than one, and the block
        shape)."""
        c = self.config
        shape = self.checkpointer.block_shape if self.checkpointer is not None else None
        out = {**c.kv_content(), "tp": c.tp, "processes": c.num_processes,
               "block_shape": list(shape) if shape else None}
        if c.pp > 1:  # (absent for pp 1: checkpoints saved before pp existed stay valid)
            out["pp"] = c.pp
        return out

    @staticmethod
    def worth_saving(seq: Optional[Sequence]) -> bool:
        """An unfinished offline sequence that computed or generated something."""
        return seq is not None and not seq.online and bool(seq.num_computed or seq.num_generated)

    def export(self, seq: Sequence, table: list[int] = ()) -> SavedRequest:
        """Step-loop thread: `seq`'s token state and the KV blocks already on host (and its
        prefix-hit blocks, read from `table`, its device block table)."""
        blocks = np.zeros((0,), np.float32)
        if self.checkpointer is not None:
            blocks = self.checkpointer.export_blocks(seq.request_id, seq.num_computed, table)
        return SavedRequest(seq.token_ids[: seq.prompt_len], seq.token_ids[seq.prompt_len:],
                            seq.seed, len(blocks) * self.config.cache.block_size, blocks)

    def check(self, request: GenerationRequest, saved: SavedRequest) -> int:
        """Any thread (in `submit`): ValueError naming what does not fit; returns the seed."""
        if request.request_class is not RequestClass.OFFLINE:
            raise ValueError("resume: only offline requests resume from saved state")
        if [int(t) for t in saved.prompt_ids] != [int(t) for t in request.prompt_token_ids]:
            raise ValueError("resume: the saved prompt differs from the request's prompt")
        validate_prompt(list(saved.prompt_ids) + list(saved.generated_ids), self.vocab_size,
                        self.max_model_len)
        if request.sampling.logprobs is not None and saved.generated_ids:
            raise ValueError("resume: logprobs of the tokens generated before are not saved")
        if len(saved.generated_ids) >= request.sampling.max_tokens:
            raise ValueError("resume: the saved request already generated max_tokens")
        if len(saved.blocks) and (self.checkpointer is None or tuple(saved.blocks.shape[1:])
                                  != tuple(self.checkpointer.block_shape)):
            raise ValueError(f"resume: saved blocks of shape {saved.blocks.shape[1:]} do not "
                             f"fit this engine's KV cache")
        return int(saved.seed)

    def take(self, seq: Sequence, saved: SavedRequest) -> None:
        """Step-loop thread, at intake: load the saved blocks into the host pool so that the
        scheduler restores them when it first starts `seq` (like an evicted request)."""
        if self.checkpointer is None or not len(saved.blocks):
            return
        n = self.checkpointer.import_blocks(seq.request_id, saved.blocks)
        seq.num_computed = min(n * self.config.cache.block_size, saved.num_saved_tokens,
                               len(seq.token_ids) - 1)
