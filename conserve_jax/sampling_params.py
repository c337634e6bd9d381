"""`SamplingParams`: per-request decoding options, shaped like vLLM's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy. top_k 0 or -1 means no top-k cut; top_p 1 means none.
    `logprobs`: None returns no logprobs; 0 returns the chosen token's logprob; n > 0 also
    returns the top-n alternatives. `seed` makes sampling reproducible independently of
    batching. `validate` raises ValueError naming the offending field; it bounds every
    field (temperature finite and <= MAX_TEMPERATURE, at most MAX_STOP_STRINGS stop strings
    of MAX_STOP_CHARS characters, MAX_STOP_TOKEN_IDS stop ids) so that one request's
    options cannot slow the step loop for everyone. `expected_output_tokens` is a length
    hint for the scheduler (never a limit).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    # a guess of the response length (tokens): a hint for KV planning, not a limit; the
    # `LLM` API passes it on as GenerationRequest.expected_output_tokens
    expected_output_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))

    def validate(self, max_logprobs: int = 20, vocab_size: Optional[int] = None) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        if self.logprobs is not None and not (0 <= self.logprobs <= max_logprobs):
            raise ValueError(f"logprobs must be in [0, {max_logprobs}], got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        e = self.expected_output_tokens
        if e is not None and (not isinstance(e, int) or isinstance(e, bool) or e < 1):
            raise ValueError(f"expected_output_tokens must be an integer >= 1, got {e!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; the limit is {MAX_STOP_STRINGS}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; "
                             f"the limit is {MAX_STOP_TOKEN_IDS}")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"stop_token_ids contains ids outside the vocabulary: {bad}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
