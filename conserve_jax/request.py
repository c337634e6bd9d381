"""Per-request state of a running engine: what a request has, where it is in its life.

A neutral module (as vLLM v1's `request.py`): the engine creates a `Sequence` per submitted
request, the scheduler advances it, the output processor reads it. It imports only the
engine contract's types. Its KV blocks and host checkpoint slots are not here: the KV
manager and the checkpointer keep them, keyed by request id. Host-side state owned by the
engine's step-loop thread; nothing here is thread-safe.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

from conserve_jax.engine_api import GenerationRequest, RequestClass, RequestStream


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks on device
    RUNNING = "running"  # holds blocks; may still have prompt tokens to prefill
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    stream: RequestStream
    seed: int  # the request's seed, or one drawn by the engine
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    prompt_len: int = 0
    num_computed: int = 0  # tokens whose KV is committed on device
    status: SeqStatus = SeqStatus.WAITING
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled_time: Optional[float] = None  # first put into an iteration (scheduler)
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    num_preemptions: int = 0
    finish_reason: Optional[str] = None  # set by the engine when the request ends
    # prefix caching: the key chain's root for this request's salt (set at intake), the
    # keys of its full blocks computed so far, and the prompt tokens found cached when it
    # first started (None until then)
    cache_root: bytes = b""
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: Optional[int] = None
    # tokens of its current block table taken from the prefix cache (0 when it holds none)
    prefix_hit_tokens: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def online(self) -> bool:
        return self.request.request_class is RequestClass.ONLINE

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        """Known tokens not yet in the KV cache (1 while decoding)."""
        return len(self.token_ids) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_pending > 1 or self.num_computed == 0
