"""KV planning from predicted response lengths: reservations, lending, KV-heavy-first order.

Used by the `ecoserve` policy (every request planned) and by `conserve` when
`ConserveConfig.offline_kv_reservation` is set (offline requests planned). It answers the
scheduler's KV hooks (`Policy.before_schedule`, `order_waiting`, `admit`, `kv_tokens_for`)
on the engine's step-loop thread; it may evict running sequences through `Scheduler.evict`
and resize their block lists through `KVManager.grow/trim`, nothing else.

Rules (all in blocks of `block_size` tokens):
- Admission: a planned request starts only when its reservation — prompt (and tokens
  already generated, after an eviction) plus the predictor's `confidence`-quantile response
  length — fits in `free - earmarked - reserve`, where `earmarked` are blocks owed to owners
  whose loans came back and `reserve` is a small global reserve kept for requests that
  outlive their prediction (and, when only offline work is planned, room for online
  arrivals: the online KV peak of the last 30 s minus what online work holds now, plus 5%). The reservation is allocated up front, so its growth inside
  the reservation never fails. A request larger than the whole cache is admitted when
  nothing else holds a reservation (it cannot be made to wait for ever).
- Lending: when the reservation does not fit, decoding owners of the same class lend the
  top of their reservations that they will not write for `lend_safety` x the borrower's
  predicted run (prefill iterations + predicted response, one token per iteration). The
  owner's blocks are freed (`trim`) and the borrower allocates them; the ledger records
  the loan.
- Return: before every iteration (`before_schedule`) an owner about to write past what it
  holds gets its blocks back: from free memory when the borrower is gone, else by
  recalling (evicting) its borrowers, then over-runners (requests past their own
  reservation), youngest first. So lent KV is always back before its owner needs it.
- Misprediction: when a running request reaches its reservation, the reservation grows
  to the predictor's conditional estimate (`LengthPredictor.extend`) out of free memory
  and the global reserve; when even that is short the scheduler's own rules apply.
- Order: the waiting queue is served (1) requests waiting longer than their aging limit,
  in arrival order; (2) evicted requests that already generated tokens (the "generation
  task" queue); (3) new prompts (the "prompt task" queue), larger KV footprint first
  (prompt + predicted response, by octave), then predicted length closest to the running
  batch's (batching similar lengths), then arrival. A request that does not fit lets
  smaller ones behind it start (backfill) until it has aged; from then on nobody behind it
  starts first. The aging limit of an online request is `online_aging_frac` x its TTFT
  objective; of an offline one `offline_aging_s`.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from conserve_jax.kv.block_allocator import blocks_needed
from conserve_jax.kv.reservations import ReservationLedger
from conserve_jax.scheduling.length_predictor import Features, LengthPredictor, Prediction
from conserve_jax.request import SeqStatus

if TYPE_CHECKING:
    from conserve_jax.scheduling.scheduler import Scheduler
    from conserve_jax.request import Sequence


@dataclass
class KVPlanConfig:
    plan_online: bool = True  # reserve/lend for online requests too (ecoserve) or offline only
    lending: bool = True
    reserve_frac: float = 0.03  # global reserve for requests outliving their prediction
    # offline-only planning: blocks kept free for online arrivals = the online peak of the
    # last `online_window_s` minus what online work holds now, plus `online_share` x cache
    online_share: float = 0.05
    online_window_s: float = 30.0
    lend_safety: float = 1.5
    online_aging_frac: float = 2.0
    offline_aging_s: float = 60.0
    default_ttft_s: float = 2.0


@dataclass
class _Plan:
    features: Features
    pred: Prediction
    predicted_total: int  # generated tokens the current reservation is for


class KVPlanner:
    def __init__(self, cfg: KVPlanConfig, predictor: LengthPredictor, max_prefill_tokens: int,
                 max_model_len: int) -> None:
        self.cfg = cfg
        self.predictor = predictor
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len
        self.ledger = ReservationLedger()
        self._plans: dict[str, _Plan] = {}
        self._seqs: dict[str, "Sequence"] = {}  # ledger key (request id) -> sequence
        self.clock = time.monotonic  # arrival times' clock (a simulation may replace it)
        self.recalls = 0  # sequences evicted to give an owner its blocks back
        self._stalled: dict[str, "Sequence"] = {}  # outlived their reservation, no KV left
        self._online_peaks: deque = deque()  # (time, online blocks used), decreasing

    # ---- requests ---------------------------------------------------------------------------
    def planned(self, seq: "Sequence") -> bool:
        return self.cfg.plan_online or not seq.online

    def on_arrival(self, seq: "Sequence") -> None:
        req = seq.request
        f = self.predictor.features(seq.token_ids[: seq.prompt_len], req.sampling.max_tokens,
                                    getattr(req, "tenant", None),
                                    getattr(req, "expected_output_tokens", None))
        p = self.predictor.predict(f)
        self._plans[seq.request_id] = _Plan(f, p, p.high)

    def on_finished(self, seq: "Sequence") -> None:
        plan = self._plans.pop(seq.request_id, None)
        self._drop(seq)
        if plan is not None and seq.finish_reason in ("stop", "length"):
            self.predictor.observe(plan.features, seq.num_generated)

    def prediction(self, seq: "Sequence") -> Optional[Prediction]:
        plan = self._plans.get(seq.request_id)
        return plan.pred if plan else None

    def _drop(self, seq: "Sequence") -> None:
        self.ledger.drop(seq.request_id)  # returned loans: their owners' blocks are now earmarked
        self._seqs.pop(seq.request_id, None)

    # ---- geometry -----------------------------------------------------------------------------
    def _bs(self, sched: "Scheduler") -> int:
        return sched.kv.block_size

    def _footprint_tokens(self, seq: "Sequence", plan: _Plan) -> int:
        total = seq.prompt_len + max(plan.predicted_total, seq.num_generated + 1)
        return min(total, self.max_model_len)

    def _reserve_blocks(self, sched: "Scheduler", for_online: bool) -> int:
        r = int(self.cfg.reserve_frac * sched.kv.capacity)
        if not self.cfg.plan_online and not for_online:
            peak = max((u for _, u in self._online_peaks), default=0)
            r += max(0, peak - sched.kv.used_online) + int(self.cfg.online_share
                                                           * sched.kv.capacity)
        return r

    def _track_online(self, sched: "Scheduler") -> None:
        now = self.clock()
        q = self._online_peaks
        while q and now - q[0][0] > self.cfg.online_window_s:
            q.popleft()
        used = sched.kv.used_online
        while q and q[-1][1] <= used:  # a monotone deque: the front is the window's peak
            q.pop()
        q.append((now, used))

    def earmarked(self, sched: "Scheduler") -> int:
        """Blocks owed to owners that no borrower holds any more (returned loans not yet
        taken back): free memory nobody else may take."""
        out = 0
        for key in self.ledger.holders():
            held = sched.kv.num_blocks(key)
            out += max(0, self.ledger.claim(key) - held - self.ledger.lent(key))
        return out

    def available(self, sched: "Scheduler", for_online: bool) -> int:
        return sched.kv.num_free - self.earmarked(sched) - self._reserve_blocks(sched, for_online)

    # ---- hooks ----------------------------------------------------------------------------------
    def before_schedule(self, sched: "Scheduler") -> None:
        """Forget holders that lost their KV (evicted by the scheduler's own rules); then
        give every owner about to write past what it holds its reserved blocks back."""
        if not self.cfg.plan_online:
            self._track_online(sched)
        for key in self.ledger.holders():
            s = self._seqs.get(key)
            if s is None or s.status is not SeqStatus.RUNNING or not sched.kv.num_blocks(s.request_id):
                if s is not None:
                    self._drop(s)
                else:
                    self.ledger.drop(key)
        bs = self._bs(sched)
        for key in self.ledger.holders():
            o = self._seqs.get(key)
            if o is None or not self.ledger.has(key):
                continue
            claim = self.ledger.claim(key)
            if sched.kv.num_blocks(o.request_id) >= claim or len(o.token_ids) + 1 <= sched.kv.num_blocks(o.request_id) * bs:
                continue  # holds its claim, or does not need more this iteration
            self._make_room(sched, o, claim - sched.kv.num_blocks(o.request_id))
            if sched.kv.grow(o.request_id, o.online, claim * bs):
                for ln in self.ledger.loans_of(key):  # returned: from free memory
                    self.ledger.settle(ln, recalled=False)
        # requests that outlived their reservation with no KV left: the oldest first
        # preempts younger ones (as the scheduler's own rule would, but with the books kept)
        stalled, self._stalled = self._stalled, {}
        for s in sorted(stalled.values(), key=lambda s: s.arrival):
            if s.status is not SeqStatus.RUNNING or not self.ledger.has(s.request_id):
                continue
            need = blocks_needed(len(s.token_ids) + 1, bs)
            claim = self.ledger.claim(s.request_id)
            if need <= claim:
                continue
            self._make_room(sched, s, need - claim + self.earmarked(sched), younger_only=True)
            if sched.kv.num_free - self.earmarked(sched) >= need - claim:
                self.ledger.grow(s.request_id, need)

    def _make_room(self, sched: "Scheduler", owner: "Sequence", n: int,
                   younger_only: bool = False) -> None:
        """Evict until `n` blocks are free: the owner's borrowers, then over-runners, then
        other borrowers (with `younger_only`: any request that arrived after `owner`);
        youngest first."""
        if sched.kv.num_free >= n:
            return
        key = owner.request_id
        mine = [self._seqs[ln.borrower] for ln in self.ledger.loans_of(key)
                if ln.borrower in self._seqs]
        running = [s for s in sched.running if s is not owner and sched.kv.num_blocks(s.request_id)]
        over = [s for s in running if self.ledger.has(s.request_id)
                and sched.kv.num_blocks(s.request_id) > self.ledger.claim(s.request_id)]
        others = [s for s in running if self.ledger.borrowed(s.request_id)]
        if owner.online:  # an online owner may also take offline KV
            others += [s for s in running if not s.online]
        if younger_only:
            young = lambda s: s.arrival > owner.arrival
            mine, over = [], [s for s in over if young(s)]
            others = [s for s in running if young(s) and s.online == owner.online]
        order = sorted(mine, key=lambda s: -s.arrival) + sorted(over, key=lambda s: -s.arrival) \
            + sorted(others, key=lambda s: -s.arrival)
        seen = set()
        for v in order:
            if sched.kv.num_free >= n:
                return
            if v.request_id in seen or v.status is not SeqStatus.RUNNING or (v.online and not owner.online):
                continue
            seen.add(v.request_id)
            for ln in self.ledger.borrowed(v.request_id):
                self.ledger.settle(ln, recalled=True)
            self._drop(v)
            sched.evict(v)
            self.recalls += 1

    def order_waiting(self, sched: "Scheduler", seqs: list) -> list:
        run_lens = sorted(self._plans[s.request_id].pred.point for s in sched.running
                          if s.request_id in self._plans)
        typical = run_lens[len(run_lens) // 2] if run_lens else None

        def key(s: "Sequence"):
            plan = self._plans.get(s.request_id)
            if plan is None or not self.planned(s):
                return (1, 0, 0, 0.0, s.arrival)
            if self._aged(s):
                return (0, 0, 0, 0.0, s.arrival)
            if s.num_generated > 0:
                return (1, 0, 0, 0.0, s.arrival)
            heavy = -int(math.log2(max(1, self._footprint_tokens(s, plan))))
            group = 0.0 if typical is None else abs(math.log2((plan.pred.point + 1) / (typical + 1)))
            return (2, heavy, 0, group, s.arrival)

        return sorted(seqs, key=key)

    def admit(self, sched: "Scheduler", seq: "Sequence", end: int) -> Optional[bool]:
        """May the waiting `seq` start now? Reserves (and, if needed, borrows) its KV.
        When it does not fit: None (skip it, smaller requests behind it may start) unless
        it has aged, then False (nobody behind it starts before it)."""
        plan = self._plans.get(seq.request_id)
        if plan is None or not self.planned(seq):
            return True
        bs = self._bs(sched)
        if plan.predicted_total <= seq.num_generated:  # resumed past its prediction
            plan.predicted_total = self.predictor.extend(plan.features, seq.num_generated)
        need = blocks_needed(max(end, self._footprint_tokens(seq, plan)), bs)
        reserve = self._reserve_blocks(sched, seq.online)
        need = max(blocks_needed(end, bs), min(need, sched.kv.capacity - reserve))
        avail = self.available(sched, seq.online)
        if need <= avail:
            return self._reserve(seq, need)
        if not sched.running:
            # alone: a request bigger than the cache still runs (no waiting for ever)
            return self._reserve(seq, max(blocks_needed(end, bs),
                                          min(need, sched.kv.num_free - self.earmarked(sched))))
        if self.cfg.lending and self._borrow(sched, seq, self._run_iters(seq, plan),
                                             need - max(0, avail)):
            return self._reserve(seq, need)
        # an aged request holds the queue until memory frees; a young one lets smaller
        # requests behind it start (backfill)
        return False if self._aged(seq) else None

    def _aged(self, seq: "Sequence") -> bool:
        limit = (self.cfg.online_aging_frac * (seq.request.slo.ttft_s or self.cfg.default_ttft_s)
                 if seq.online else self.cfg.offline_aging_s)
        return self.clock() - seq.arrival > limit

    def _reserve(self, seq: "Sequence", blocks: int) -> bool:
        self.ledger.reserve(seq.request_id, blocks)
        self._seqs[seq.request_id] = seq
        return True

    def _borrow(self, sched: "Scheduler", seq: "Sequence", run: int, deficit: int) -> bool:
        """Cover `deficit` blocks for `seq` (predicted to run `run` more iterations) with
        loans from decoding owners of its class: first what they are owed but do not hold
        (earmarked), then the top of what they hold. All or nothing."""
        bs = self._bs(sched)
        horizon = int(math.ceil(self.cfg.lend_safety * run)) + 1
        offers = []
        for o in sched.running:
            k = o.request_id
            if o is seq or not self.ledger.has(k) or o.in_prefill or o.online != seq.online:
                continue
            keep = blocks_needed(len(o.token_ids) + horizon, bs)
            spare = self.ledger.claim(k) - self.ledger.lent(k) - keep
            if spare > 0:
                offers.append((spare, o))
        if sum(x for x, _ in offers) < deficit:
            return False
        if not self.ledger.has(seq.request_id):
            self._reserve(seq, 0)  # the borrower must hold a key before loans name it
        for spare, o in sorted(offers, key=lambda t: -t[0]):
            if deficit <= 0:
                break
            k = o.request_id
            take = min(spare, deficit)
            owed = max(0, self.ledger.claim(k) - sched.kv.num_blocks(o.request_id) - self.ledger.lent(k))
            trim = max(0, take - owed)
            if trim:
                sched.kv.trim(o.request_id, (sched.kv.num_blocks(o.request_id) - trim) * bs)
            self.ledger.lend(k, seq.request_id, take)
            deficit -= take
        return True

    def _run_iters(self, seq: "Sequence", plan: _Plan) -> int:
        prefill = -(-max(0, len(seq.token_ids) - seq.num_computed) // self.max_prefill_tokens)
        return prefill + max(1, plan.predicted_total - seq.num_generated)

    def kv_tokens_for(self, sched: "Scheduler", seq: "Sequence", end: int) -> int:
        """Tokens of KV `seq` should hold to run positions up to `end`: its reservation,
        grown when it is about to outlive it (from free memory, then unused reservations
        of lower-priority requests, then loans; as a last resort the reservations of owners
        whose returned loans wait in free memory shrink)."""
        bs = self._bs(sched)
        key = seq.request_id
        if not self.planned(seq) or not self.ledger.has(key):
            if sched.kv.extra_blocks(seq.request_id, end) > sched.kv.num_free:
                self._reclaim(sched, seq, sched.kv.extra_blocks(seq.request_id, end))
            return end
        claim = self.ledger.claim(key)
        plan = self._plans.get(key)
        if end + 1 > claim * bs and plan is not None:  # about to outlive its prediction
            plan.predicted_total = self.predictor.extend(plan.features, seq.num_generated)
            want = blocks_needed(max(end + 1, self._footprint_tokens(seq, plan)), bs)
            must = blocks_needed(end, bs)
            extra = want - claim
            # free blocks nobody else is owed, minus what `seq` itself is owed
            room = sched.kv.num_free - self.earmarked(sched)
            if extra > room:
                self._reclaim(sched, seq, extra - room)
                room = sched.kv.num_free - self.earmarked(sched)
            if extra > room and self.cfg.lending and self._borrow(
                    sched, seq, self._run_iters(seq, plan), extra - max(0, room)):
                room = extra
            if must - claim > room:
                self._shrink_earmarked(sched, must - claim - max(0, room))
                room = sched.kv.num_free - self.earmarked(sched)
            if must - claim > room:  # no KV for it without breaking a promise: wait
                self._stalled[key] = seq
                return None
            grown = claim + max(0, min(extra, room))
            if grown > claim:
                self.ledger.grow(key, grown)
        return max(end, (self.ledger.claim(key) - self.ledger.lent(key)) * bs)

    def _shrink_earmarked(self, sched: "Scheduler", n: int) -> None:
        """Last resort for a request that outlived its reservation with no memory left:
        owners whose returned loans wait in free memory give up part of their claim,
        those whose need is furthest away first."""
        cands = []
        for k in self.ledger.holders():
            s = self._seqs.get(k)
            if s is None:
                continue
            owed = self.ledger.claim(k) - sched.kv.num_blocks(s.request_id) - self.ledger.lent(k)
            if owed > 0:
                cands.append((sched.kv.num_blocks(s.request_id) * self._bs(sched) - len(s.token_ids), owed, k))
        for _, owed, k in sorted(cands, reverse=True):
            if n <= 0:
                return
            take = min(owed, n)
            self.ledger.shrink(k, self.ledger.claim(k) - take)
            n -= take

    def _reclaim(self, sched: "Scheduler", seq: "Sequence", n: int) -> None:
        """Take unused reserved blocks (not lent, not about to be written) from planned
        holders of lower priority (offline, for an online `seq`), youngest first."""
        bs = self._bs(sched)
        cands = sorted((s for s in sched.running if s is not seq and self.ledger.has(s.request_id)
                        and (seq.online and not s.online)), key=lambda s: -s.arrival)
        for s in cands:
            if n <= 0:
                return
            keep = blocks_needed(len(s.token_ids) + 1, bs)
            spare = sched.kv.num_blocks(s.request_id) - keep
            if spare <= 0:
                continue
            take = min(spare, n)
            sched.kv.trim(s.request_id, (sched.kv.num_blocks(s.request_id) - take) * bs)
            self.ledger.shrink(s.request_id, sched.kv.num_blocks(s.request_id) + self.ledger.lent(s.request_id))
            n -= take

    # ---- stats ----------------------------------------------------------------------------------
    def stats(self, sched: "Scheduler") -> dict:
        """Called by `Engine.stats` from any thread: reads only, retried if the step loop
        changes a container while it is being read."""
        for _ in range(3):
            try:
                return self._stats(sched)
            except RuntimeError:  # "changed size during iteration"
                continue
        return {}

    def _stats(self, sched: "Scheduler") -> dict:
        bs = self._bs(sched)
        unused = 0
        for s in sched.running:
            unused += max(0, sched.kv.num_blocks(s.request_id) - blocks_needed(s.num_computed, bs))
        c, ps = self.ledger.counters, self.predictor.stats
        return {
            "kv_blocks_reserved_unused": unused + self.earmarked(sched),
            "kv_reservations_grown": c.grown,
            "kv_blocks_lent": c.lent_blocks,
            "kv_blocks_returned": c.returned_blocks + c.recalled_blocks,
            "kv_loans_recalled": self.recalls,
            "predictor_observed": ps.observed,
            "predictor_mae_tokens": ps.mae or 0.0,
            "predictor_within_25pct": ps.within_25_frac or 0.0,
            "predictor_baseline_mae_tokens": ps.baseline_mae or 0.0,
        }
