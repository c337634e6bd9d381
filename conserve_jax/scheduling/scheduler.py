"""The iteration scheduler: which sequences run next, and how many tokens each.

Owned by the engine's step-loop thread; nothing here is thread-safe. Every iteration:
online work first (running decodes, then prefill chunks), then offline work, each
sequence admitted only while the policy's `StepBudget` (tokens, and predicted time when a
latency model is present) still has room. KV memory: online sequences may evict offline
ones; offline sequences never evict anybody. `commit` applies a finished iteration,
`abandon` drops one the runner gave up at a safepoint.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Optional

from conserve_jax.config import EngineConfig
from conserve_jax.kv.kv_manager import KVManager
from conserve_jax.runtime.step_plan import (DecodeItem, PrefillItem, SampledToken, SampleSpec,
                                            StepPlan, StepResult)
from conserve_jax.scheduling.policy import Policy, StepBudget
from conserve_jax.scheduling.sequence import Sequence, SeqStatus


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

    @property
    def has_online(self) -> bool:
        return any(e.seq.online for e in self.entries)

    @property
    def empty(self) -> bool:
        return not self.entries


@dataclass
class SchedulerCounters:
    evictions: int = 0
    recomputed_tokens: int = 0
    preemptions: int = 0  # iterations abandoned at a safepoint
    preempted_tokens_discarded: int = 0


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVManager, policy: Policy) -> None:
        self.cfg = cfg
        self.kv = kv
        self.policy = policy
        self.waiting_online: collections.deque[Sequence] = collections.deque()
        self.waiting_offline: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.counters = SchedulerCounters()
        self.on_evict = None  # optional hook(seq) -> bool: True when it kept a host copy

    # ---- intake -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        (self.waiting_online if seq.online else self.waiting_offline).append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished, cancelled or failed) and free its KV at once."""
        if seq in self.running:
            self.running.remove(seq)
        for q in (self.waiting_online, self.waiting_offline):
            if seq in q:
                q.remove(seq)
        self.kv.release(seq)
        seq.status = SeqStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting_online or self.waiting_offline)

    def online_active(self) -> bool:
        return bool(self.waiting_online) or any(s.online for s in self.running)

    # ---- one iteration ------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(StepPlan())
        budget = self.policy.budget(self)
        online_running = [s for s in self.running if s.online]
        offline_running = [s for s in self.running if not s.online]
        self._fill(step, budget, online_running, online=True)
        self._fill(step, budget, list(self.waiting_online), online=True, waiting=True)
        if self.policy.admits_offline(self, step):
            self._fill(step, budget, offline_running, online=False)
            self._fill(step, budget, list(self.waiting_offline), online=False, waiting=True)
        return step

    def _fill(self, step: ScheduledStep, budget: StepBudget, seqs: list[Sequence], online: bool,
              waiting: bool = False) -> None:
        for seq in seqs:
            if seq.status is SeqStatus.FINISHED or seq in [e.seq for e in step.entries]:
                continue
            if waiting and len(self.running) >= self.cfg.max_num_seqs:
                return
            decode = not seq.in_prefill
            if decode:
                n = 1
                if budget.decodes_left(step) <= 0:
                    return
            else:
                if len(step.plan.prefills) >= self.cfg.max_prefill_seqs:
                    continue
                n = budget.prefill_tokens_for(step, seq)
                if n <= 0:
                    continue
            if not self._ensure_blocks(seq, seq.num_computed + n, step):
                if waiting:
                    return  # keep arrival order: do not let later requests jump ahead
                continue
            if waiting:
                (self.waiting_online if online else self.waiting_offline).remove(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
            self._add_entry(step, seq, n, decode)

    def _ensure_blocks(self, seq: Sequence, upto: int, step: ScheduledStep) -> bool:
        if self.kv.grow(seq, upto):
            return True
        if not seq.online:
            return False  # offline work never takes memory from anybody
        scheduled = {id(e.seq) for e in step.entries}
        victims = [s for s in reversed(self.running)
                   if not s.online and id(s) not in scheduled and s.blocks]
        for v in victims:
            self.evict(v)
            if self.kv.grow(seq, upto):
                return True
        return False

    def evict(self, seq: Sequence) -> None:
        """Free a running offline sequence's device KV now; it resumes later, from its host
        checkpoint when `on_evict` kept one, else by recomputing."""
        kept = bool(self.on_evict and self.on_evict(seq))
        if not kept:
            self.counters.recomputed_tokens += seq.num_computed
            seq.num_computed = 0
        self.kv.release(seq)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.counters.evictions += 1
        (self.waiting_online if seq.online else self.waiting_offline).appendleft(seq)

    def _add_entry(self, step: ScheduledStep, seq: Sequence, n: int, decode: bool) -> None:
        spec = None
        samples = seq.num_computed + n == len(seq.token_ids)
        if samples:
            sp = seq.request.sampling
            spec = SampleSpec(sp.temperature, sp.top_k, sp.top_p, seq.seed, seq.num_generated,
                              sp.logprobs)
        if decode:
            step.plan.decodes.append(DecodeItem(seq.token_ids[-1], seq.num_computed, seq.blocks, spec))
        else:
            toks = seq.token_ids[seq.num_computed: seq.num_computed + n]
            step.plan.prefills.append(PrefillItem(toks, seq.num_computed, seq.blocks, spec))
        step.entries.append(Scheduled(seq, n, samples, decode))

    # ---- results ------------------------------------------------------------------------
    def commit(self, step: ScheduledStep, result: StepResult) -> list[tuple[Sequence, SampledToken]]:
        """Advance every scheduled sequence; returns the new token of each that sampled,
        in the runner's row order (decode items first, then prefill items)."""
        ordered = [e for e in step.entries if e.decode] + [e for e in step.entries if not e.decode]
        out, it = [], iter(result.tokens)
        now = time.monotonic()
        for e in ordered:
            e.seq.num_computed += e.num_tokens
            if e.samples:
                tok = next(it)
                e.seq.token_ids.append(tok.token)
                if e.seq.first_token_time is None:
                    e.seq.first_token_time = now
                e.seq.last_token_time = now
                out.append((e.seq, tok))
        return out

    def abandon(self, step: ScheduledStep) -> None:
        """The runner stopped at a safepoint: nothing is committed (the KV it wrote lies past
        every committed length); the sequences stay where they are and run again later."""
        self.counters.preemptions += 1
        self.counters.preempted_tokens_discarded += step.plan.num_tokens
