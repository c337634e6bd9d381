"""What the scheduler decided for one iteration: the sequences in it and how many tokens
each, the runner's `StepPlan`, the predicted work shape, and checkpoint restores to do first.

Shared by the scheduler (which builds it) and the policies (which size it), so that neither
imports the other. Built and read on the engine's step-loop thread.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Protocol

from conserve_jax.request import Sequence
from conserve_jax.runtime.step_plan import StepPlan
from conserve_jax.scheduling.latency_model import WorkShape


class QueueView(Protocol):
    """What a policy may read of the scheduler's queues when it sizes an iteration."""

    running: list[Sequence]
    waiting_online: collections.deque[Sequence]
    waiting_offline: collections.deque[Sequence]


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int
    samples: bool
    decode: bool


@dataclass
class ScheduledStep:
    plan: StepPlan
    entries: list[Scheduled] = field(default_factory=list)
    work: WorkShape = field(default_factory=WorkShape)
    # (request id, device blocks, index of the first of them in the request's table)
    restores: list[tuple[str, list[int], int]] = field(default_factory=list)

    @property
    def has_online(self) -> bool:
        return any(e.seq.online for e in self.entries)

    @property
    def empty(self) -> bool:
        return not self.entries
