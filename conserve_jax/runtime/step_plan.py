"""The scheduler -> runner contract for one iteration (host-side, plain Python).

The scheduler (step-loop thread) builds a `StepPlan`; the runner reads it and returns a
`StepResult`, or None when a safepoint asked it to abandon the iteration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SampleSpec:
    temperature: float
    top_k: int
    top_p: float
    seed: int
    counter: int  # tokens this request generated so far (keys its randomness)
    num_logprobs: Optional[int]  # None: no logprobs; n >= 0: chosen + top-n


@dataclass
class DecodeItem:
    """One token of a sequence whose earlier tokens are all in the cache."""

    token: int
    position: int
    block_table: list[int]
    sample: SampleSpec


@dataclass
class PrefillItem:
    """A chunk of tokens [start, start+len) of a sequence. `sample` is set when the chunk
    ends at the last known token, so a new token is drawn from its last row."""

    tokens: list[int]
    start: int
    block_table: list[int]
    sample: Optional[SampleSpec] = None


@dataclass
class StepPlan:
    decodes: list[DecodeItem] = field(default_factory=list)
    prefills: list[PrefillItem] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(len(p.tokens) for p in self.prefills)

    @property
    def context_tokens(self) -> int:
        """KV entries read by attention (sum over sequences of their context)."""
        return (sum(d.position + 1 for d in self.decodes)
                + sum(p.start + len(p.tokens) for p in self.prefills))

    @property
    def num_seqs(self) -> int:
        return len(self.decodes) + len(self.prefills)

    def sampled_specs(self) -> list[SampleSpec]:
        return [d.sample for d in self.decodes] + [p.sample for p in self.prefills if p.sample]


@dataclass
class SampledToken:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepResult:
    """One `SampledToken` per entry of `plan.sampled_specs()`, in that order."""

    tokens: list[SampledToken]
    layers_run: int
