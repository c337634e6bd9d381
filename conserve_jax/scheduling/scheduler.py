"""The iteration scheduler: which sequences run next, and how many tokens each.

Owned by the engine's step-loop thread; nothing here is thread-safe. Every iteration:
online work first (running decodes, then prefill chunks), then offline work, each
sequence admitted only while the policy's `StepBudget` (tokens, and predicted time when a
latency model is present) still has room. Among offline work, `urgent` sequences (items of
jobs at risk of missing their deadline), rank by rank (the lowest, i.e. earliest deadline,
first), running then waiting, go before every other offline sequence, each part in its
usual order; and in an iteration where an urgent sequence generates a token, no offline
prompt of a later rank or of a job not at risk goes in (their decodes still do; the
urgent job's own prompts do). An item generates one token per iteration, and an iteration
carrying a prompt chunk lasts several decode iterations (bench_deadlines: ~1 s against
~0.1 s with the small model on CPU), so chunks of other jobs' prompts beside it would set
an urgent item's pace; its job keeps going first only if they wait. Also for urgent jobs
due later: with their prompts beside it, the tight job of bench_deadlines took 21 s where
its estimate at submission, made before they came, said 15. KV memory and slots: online sequences may
evict offline ones (a parked iteration's sequences last); urgent offline sequences may
evict other offline ones; offline sequences never evict online ones. A
policy without priority (non-preemptive) sees one queue in arrival order. `commit`
applies a finished iteration, `abandon` drops one the runner gave up at a safepoint,
`park` keeps one to be continued from its layer: its prefill chunks' sequences are
skipped by `schedule` until `take_parked` hands it back (to resume) or something that
needs them (eviction, removal, their blocks changing) drops it, discarding its tokens as
`abandon` would; its decodes (one token each) are discarded at once and their sequences
run on. A policy may steer KV through four hooks (see
`Policy`): `before_schedule`, `order_waiting` (admission order of a waiting queue),
`admit` (may a waiting sequence start) and `kv_tokens_for` (KV to hold beyond a chunk,
e.g. a reservation for the predicted response); their defaults change nothing.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from conserve_jax.config import EngineConfig
from conserve_jax.kv.kv_manager import KVManager
from conserve_jax.runtime.step_plan import (DecodeItem, PrefillItem, SampledToken, SampleSpec,
                                            StepPlan, StepResult)
from conserve_jax.scheduling.policies.base import Policy, StepBudget
from conserve_jax.scheduling.prefix_groups import PrefixGroups
from conserve_jax.scheduling.scheduled_step import Scheduled, ScheduledStep
from conserve_jax.request import Sequence, SeqStatus


@dataclass
class SchedulerCounters:
    evictions: int = 0
    recomputed_tokens: int = 0  # committed tokens thrown away by evictions
    restored_tokens: int = 0  # tokens brought back from host checkpoints
    preemptions: int = 0  # iterations abandoned at a safepoint
    preempted_tokens_discarded: int = 0  # their tokens, unless parked and resumed
    preemptions_resumed: int = 0  # parked iterations continued from their layer
    # prefix caching, by class (index: online): prompt tokens of requests at their first
    # start, and those found in the cache
    prefix_query_tokens: list = field(default_factory=lambda: [0, 0])
    prefix_hit_tokens: list = field(default_factory=lambda: [0, 0])


@dataclass
class Parked:
    """An abandoned iteration kept to be continued: the step, the runner's opaque state
    for it, each kept (prefill) sequence's block table when it stopped (its KV for the
    finished layers lives there), and the entries cut loose (decodes, not committed)."""

    step: ScheduledStep
    handle: object
    tables: dict  # id(seq) -> tuple of block ids, kept sequences
    detached: set  # id(seq) of the entries whose results are ignored

    @property
    def kept_entries(self) -> list:
        """The step's entries whose results count (all but the detached ones)."""
        return [e for e in self.step.entries if id(e.seq) not in self.detached]


def _arrived_after(s: Sequence, seq: Sequence) -> bool:
    """`s` yields memory to `seq` within one class and rank: it arrived later (a tie goes
    against any other sequence)."""
    return s.arrival > seq.arrival or (s.arrival == seq.arrival and id(s) != id(seq))


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVManager, policy: Policy) -> None:
        self.cfg = cfg
        self.kv = kv
        self.policy = policy
        self.waiting_online: collections.deque[Sequence] = collections.deque()
        self.waiting_offline: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.counters = SchedulerCounters()
        # on_evict(seq) -> tokens kept on host (0: recompute); on_remove(request id) frees
        # its host copies
        self.on_evict: Optional[Callable[[Sequence], int]] = None
        self.on_remove: Optional[Callable[[str], None]] = None
        # host_blocks(request id, first block) -> how many of its blocks from `first` on
        # are saved on host without a gap (None: no host checkpoints)
        self.host_blocks: Optional[Callable[[str, int], int]] = None
        self.parked: Optional[Parked] = None
        # offline request id -> rank, served first among offline work, lowest rank first
        # (at-risk jobs' items; the engine sets it before every `schedule` from
        # `EngineAPI.set_urgent`)
        self.urgent: dict = {}
        self.groups = (PrefixGroups(kv.block_size, cfg.prefix_group_hold_s)
                       if kv.prefix_caching else None)

    # ---- intake -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        (self.waiting_online if seq.online else self.waiting_offline).append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished, cancelled or failed) and free its KV at once."""
        self._unpark_for(seq)
        if seq in self.running:
            self.running.remove(seq)
        for q in (self.waiting_online, self.waiting_offline):
            if seq in q:
                q.remove(seq)
        self.kv.release(seq.request_id)
        if self.on_remove:
            self.on_remove(seq.request_id)
        seq.status = SeqStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting_online or self.waiting_offline)

    # ---- one iteration ------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(StepPlan())
        self.policy.before_schedule(self)
        budget = self.policy.budget(self)
        order = self.policy.order_waiting
        if not self.policy.priority:
            waiting = sorted(list(self.waiting_online) + list(self.waiting_offline),
                             key=lambda s: s.arrival)
            self._fill(step, budget, sorted(self.running, key=lambda s: s.arrival))
            self._fill(step, budget, order(self, waiting), waiting=True)
            return step
        self._fill(step, budget, [s for s in self.running if s.online])
        self._fill(step, budget, order(self, list(self.waiting_online)), waiting=True)
        running = [s for s in self.running if not s.online]
        offline = list(self.waiting_offline)
        if self.groups is not None:
            offline = self.groups.order(offline)
        offline = order(self, offline)
        if self.urgent:  # at-risk jobs' items, running then waiting, rank by rank (lowest
            u = self.urgent  # first), before all other offline work
            generating = False  # an urgent item of this rank or a lower one generates
            for r in sorted({u[s.request_id] for s in running + offline if s.request_id in u}):
                mine = [s for s in running if u.get(s.request_id) == r]
                if generating:  # its decodes go in, its prompts wait (class doc)
                    self._fill(step, budget, [s for s in mine if not s.in_prefill])
                    continue
                self._fill(step, budget, mine)
                self._fill(step, budget, [s for s in offline if u.get(s.request_id) == r],
                           waiting=True)
                generating = any(e.decode and e.seq.request_id in u for e in step.entries)
            running = [s for s in running if s.request_id not in u]
            offline = [s for s in offline if s.request_id not in u]
            if generating:
                # an urgent item generates: no other offline prompt goes in beside it
                self._fill(step, budget, [s for s in running if not s.in_prefill])
                return step
        self._fill(step, budget, running)
        self._fill(step, budget, offline, waiting=True)
        return step

    def _outranks(self, seq: Sequence, other: Sequence) -> bool:
        """May offline `seq` take KV or a slot from running offline `other`? Urgent work
        (at-risk jobs' items) outranks the rest, a lower urgent rank a higher one; within a
        rank, earlier arrivals outrank later ones. A strict order, so running work cannot
        deadlock on memory."""
        inf = float("inf")
        rs, ro = self.urgent.get(seq.request_id, inf), self.urgent.get(other.request_id, inf)
        if rs != ro:
            return rs < ro
        return _arrived_after(other, seq)

    def _fill(self, step: ScheduledStep, budget: StepBudget, seqs: list[Sequence],
              waiting: bool = False) -> None:
        parked = self.parked.tables if self.parked is not None else {}
        leaders = None  # prefix groups' members computing their prompt (offline intake)
        for seq in seqs:
            if seq.status is SeqStatus.FINISHED or (not waiting and seq.status is not SeqStatus.RUNNING):
                continue  # (a running sequence evicted earlier in this fill is waiting now)
            if id(seq) in parked:
                continue  # its iteration waits to be resumed
            if waiting and len(self.running) >= self.cfg.max_num_seqs \
                    and not self._free_a_slot(seq, step):
                return
            if waiting and seq.in_prefill and (
                    len(step.plan.prefills) >= self.cfg.max_prefill_seqs
                    or budget.prefill_tokens_for(step, seq) <= 0):
                continue  # no room (checked before prefix hits are taken and given back)
            hits = None  # its cached blocks, looked up once for the group check and the hits
            if waiting and not seq.online and self.groups is not None:
                if leaders is None:
                    leaders = self.groups.leaders(self.running)
                hits = self._match(seq)
                if leaders and self.groups.held(seq, leaders, lambda s: len(hits)):
                    continue  # a twin is computing the prefix it would share
            undo = self._take_prefix(seq, hits) if waiting else None
            verdict = self._try_add(step, budget, seq, waiting)
            if verdict != "added" and undo is not None:
                self.kv.release(seq.request_id)  # give the cached blocks back
                seq.num_computed, seq.prefix_hit_tokens = undo, 0
            if verdict == "stop":
                return
            if verdict == "added" and leaders is not None and not seq.online:
                k = self.groups.key(seq)  # started now: its twins wait for it too
                if k is not None and seq.num_computed < seq.prompt_len:
                    leaders.setdefault(k, []).append(seq)

    def _try_add(self, step: ScheduledStep, budget: StepBudget, seq: Sequence,
                 waiting: bool) -> str:
        """Schedule `seq`'s next tokens if the budget, the policy and KV allow: "added",
        "skip" (later sequences may still go) or "stop" (none of `seqs` after it may)."""
        decode = not seq.in_prefill
        if decode:
            n = 1
            if budget.decodes_left(step, seq) <= 0:
                return "skip"
        else:
            if len(step.plan.prefills) >= self.cfg.max_prefill_seqs:
                return "skip"
            n = budget.prefill_tokens_for(step, seq)
            if n <= 0:
                return "skip"
        end = seq.num_computed + n
        if waiting:
            ok = self.policy.admit(self, seq, end)
            if ok is None:
                return "skip"  # not now; later requests may start
            if not ok:
                return "stop"  # the policy keeps its admission order: later requests wait too
        # KV the policy wants held beyond this chunk (a reservation) comes from free
        # blocks only; what the chunk itself needs follows the eviction rules below
        want = self.policy.kv_tokens_for(self, seq, end)
        if want is None:  # the policy holds it back this iteration (no KV for it)
            return "stop" if waiting else "skip"
        if not (want > end and self.kv.grow(seq.request_id, seq.online, want)) \
                and not self._ensure_blocks(seq, end, step):
            # keep arrival order: later requests do not jump ahead
            return "stop" if waiting else "skip"
        if waiting:
            self._start(seq, step)
        self._add_entry(step, seq, n, decode)
        return "added"

    # ---- prefix caching -----------------------------------------------------------------
    def _match(self, seq: Sequence) -> list:
        """The cached blocks of `seq`'s longest cached prefix (its last token always runs)."""
        return self.kv.match_prefix(seq.token_ids, seq.block_hashes, seq.cache_root,
                                    len(seq.token_ids) - 1)

    def _take_prefix(self, seq: Sequence, hits: Optional[list] = None) -> Optional[int]:
        """A waiting sequence about to be considered: start its block table with the cached
        blocks of its longest cached prefix, and count those tokens as computed (past KV
        still on host, if any, is restored from where the hits end: `_start`). Returns the
        committed length to go back to if it does not start now (None: nothing taken).
        `hits`: `_match(seq)` if the caller already looked it up in this fill."""
        if not self.kv.prefix_caching or self.kv.num_blocks(seq.request_id):
            return None
        if hits is None:
            hits = self._match(seq)
        old = seq.num_computed
        if not hits and not old:
            return None
        h = len(hits) * self.kv.block_size
        seq.num_computed = h
        if old > h and self.host_blocks is not None:
            # host copies continue the hits only as far as they run without a gap
            run = self.host_blocks(seq.request_id, len(hits))
            seq.num_computed = max(h, min(old, (len(hits) + run) * self.kv.block_size))
        self.kv.attach_prefix(seq.request_id, seq.online, hits)
        seq.prefix_hit_tokens = h
        return old

    def _free_a_slot(self, seq: Sequence, step: ScheduledStep) -> bool:
        """An online request finding every slot taken evicts an offline one; an urgent
        offline request evicts an offline one it outranks (`_outranks`)."""
        if not self.policy.priority or not (seq.online or seq.request_id in self.urgent):
            return False
        scheduled = {id(e.seq) for e in step.entries}
        for v in self._victim_order(self._parked_last(reversed(self.running))):
            if not v.online and id(v) not in scheduled and (seq.online or self._outranks(seq, v)):
                self.evict(v)
                return True
        return False

    def _victim_order(self, seqs: list[Sequence]) -> list[Sequence]:
        """Offline `seqs` (in eviction order) with the urgent ones last, the lowest rank
        (earliest deadline) last of all: an online request takes memory or a slot from
        work without a deadline at stake first. An evicted urgent item would otherwise wait
        for its host restore until no online work runs (`IsolationBudget`), which under a
        steady online load is the rest of its window."""
        u = self.urgent
        if not u:
            return list(seqs)
        inf = float("inf")
        return sorted(seqs, key=lambda s: -u.get(s.request_id, inf))  # stable

    def _parked_last(self, seqs) -> list[Sequence]:
        """`seqs` (in eviction order) with the parked step's kept sequences moved to the end:
        evicting one of those discards the whole parked iteration's work."""
        seqs = list(seqs)
        if self.parked is None:
            return seqs
        kept = self.parked.tables
        return [s for s in seqs if id(s) not in kept] + [s for s in seqs if id(s) in kept]

    def _start(self, seq: Sequence, step: ScheduledStep) -> None:
        (self.waiting_online if seq.online else self.waiting_offline).remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        bs = self.kv.block_size
        hit = seq.prefix_hit_tokens  # from the prefix cache
        if seq.num_cached_tokens is None:  # first start: the request's cache hit
            seq.num_cached_tokens = hit
            seq.first_scheduled_time = time.monotonic()  # its queue time ends here
            c = self.counters
            c.prefix_query_tokens[seq.online] += seq.prompt_len
            c.prefix_hit_tokens[seq.online] += hit
        if seq.num_computed > hit:  # evicted with KV kept on host: resume from the checkpoint
            first, n = hit // bs, -(-seq.num_computed // bs)
            step.restores.append((seq.request_id, self.kv.blocks(seq.request_id)[first:n], first))
            self.counters.restored_tokens += seq.num_computed - hit

    def _ensure_blocks(self, seq: Sequence, upto: int, step: ScheduledStep) -> bool:
        """Grow `seq`'s blocks, evicting others when memory is short: online requests evict
        offline ones; online requests evict later online arrivals, offline ones the offline
        work they outrank (`_outranks`: urgent first, then arrival), so running work cannot
        deadlock on memory. Offline work never evicts online work."""
        if self.kv.grow(seq.request_id, seq.online, upto):
            return True
        scheduled = {id(e.seq) for e in step.entries}
        cands = [s for s in self._parked_last(reversed(self.running)) if s is not seq
                 and id(s) not in scheduled and self.kv.num_blocks(s.request_id)]
        if self.policy.priority and seq.online:
            victims = (self._victim_order([s for s in cands if not s.online])
                       + [s for s in cands if s.online and _arrived_after(s, seq)])
        elif self.policy.priority:
            victims = [s for s in cands if not s.online and self._outranks(seq, s)]
        else:
            victims = [s for s in cands if _arrived_after(s, seq)]
        for v in victims:
            self.evict(v)
            if self.kv.grow(seq.request_id, seq.online, upto):
                return True
        return False

    def evict(self, seq: Sequence) -> None:
        """Free a running offline sequence's device KV now. It resumes later from its host
        checkpoint (tokens `on_evict` reports kept) and recomputes the rest."""
        self._unpark_for(seq)
        kept = self.on_evict(seq) if self.on_evict and not seq.online else 0
        self.counters.recomputed_tokens += seq.num_computed - kept
        seq.num_computed, seq.prefix_hit_tokens = kept, 0
        self.kv.release(seq.request_id)
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
        end = seq.num_computed + n
        if decode:
            step.plan.decodes.append(DecodeItem(seq.token_ids[-1], seq.num_computed, self.kv.blocks(seq.request_id), spec))
            step.work = step.work.add_decode(end)
        else:
            toks = seq.token_ids[seq.num_computed: end]
            step.plan.prefills.append(PrefillItem(toks, seq.num_computed, self.kv.blocks(seq.request_id), spec))
            step.work = step.work.add_prefill(n, end, samples)
        step.entries.append(Scheduled(seq, n, samples, decode))

    # ---- results ------------------------------------------------------------------------
    def commit(self, step: ScheduledStep, result: StepResult) -> list[tuple[Sequence, SampledToken]]:
        """Advance every scheduled sequence; returns the new token of each that sampled,
        in the runner's row order (decode items first, then prefill items)."""
        skip: set = set()  # a resumed step's detached entries: results ignored
        if self.parked is not None and self.parked.step is step:
            skip = self.parked.detached
            self.parked = None
            self.counters.preemptions_resumed += 1
        ordered = [e for e in step.entries if e.decode] + [e for e in step.entries if not e.decode]
        out, it = [], iter(result.tokens)
        now = time.monotonic()
        for e in ordered:
            tok = next(it) if e.samples else None
            if id(e.seq) in skip:
                continue
            e.seq.num_computed += e.num_tokens
            self.kv.register_full(e.seq.request_id, e.seq.token_ids, e.seq.block_hashes,
                                  e.seq.cache_root, e.seq.num_computed)
            if e.samples:
                e.seq.token_ids.append(tok.token)
                if e.seq.first_token_time is None:
                    e.seq.first_token_time = now
                e.seq.last_token_time = now
                out.append((e.seq, tok))
        return out

    def abandon(self, step: ScheduledStep, ran: bool = True) -> None:
        """The runner stopped at a safepoint (or the iteration failed, or, `ran` False, it
        was stopped before its first layer): nothing is committed (the KV it wrote lies past
        every committed length); the sequences stay where they are and run again later."""
        if self.parked is not None and self.parked.step is step:
            self.drop_parked()  # a resumed iteration failed or is given up
        elif ran:
            self.counters.preempted_tokens_discarded += step.plan.num_tokens
        self.counters.preemptions += 1

    def park(self, step: ScheduledStep, handle: object) -> None:
        """The runner stopped `step` at a safepoint and can continue it (`handle`): keep
        its prefill entries' sequences out of new iterations until `take_parked`; its
        decode entries are discarded now (`handle` must not write their KV: see
        `ModelRunner.detach_decodes`) and those sequences run on. One parked step at most;
        parking another replaces (discards) the older one. Counts a preemption (also when a
        resumed step stops again)."""
        if self.parked is not None and self.parked.step is not step:
            self.drop_parked()
        self.counters.preemptions += 1
        if self.parked is None:  # (a resumed step stopping again had its decodes cut already)
            self.counters.preempted_tokens_discarded += sum(e.decode for e in step.entries)
        self.parked = Parked(step, handle,
                             {id(e.seq): tuple(self.kv.blocks(e.seq.request_id))
                              for e in step.entries if not e.decode},
                             {id(e.seq) for e in step.entries if e.decode})

    def take_parked(self) -> Optional[Parked]:
        """The parked iteration, to resume now (it stays parked until `commit`, `park` or
        `abandon`), or None if there is none or it is no longer intact (a sequence left
        RUNNING or its blocks at stopping time changed: then it is discarded)."""
        p = self.parked
        if p is None:
            return None
        for e in p.kept_entries:
            table = p.tables[id(e.seq)]
            if e.seq.status is not SeqStatus.RUNNING \
                    or tuple(self.kv.blocks(e.seq.request_id)[:len(table)]) != table:
                self.drop_parked()
                return None
        return p

    def drop_parked(self) -> None:
        """Discard the parked iteration (its sequences run again from what they committed)."""
        if self.parked is not None:
            self.counters.preempted_tokens_discarded += sum(
                e.num_tokens for e in self.parked.kept_entries)
            self.parked = None

    def _unpark_for(self, seq: Sequence) -> None:
        if self.parked is not None and id(seq) in self.parked.tables:
            self.drop_parked()
