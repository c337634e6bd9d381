"""Prefix caching, host side: the key chain, the block pool's reference counts and LRU
order, the KV manager's prefix match, the scheduler taking hits (and giving them back),
offline grouping by shared prefix, and the checkpointer's gaps. No device: fast."""
import time

import numpy as np
import pytest

from conserve_jax.config import EngineConfig
from conserve_jax.engine_api import GenerationRequest, RequestClass, RequestStream
from conserve_jax.kv.block_allocator import BlockAllocator
from conserve_jax.kv.checkpointer import KVCheckpointer
from conserve_jax.kv.kv_manager import KVManager
from conserve_jax.kv.prefix_hash import block_key, extend_chain, root_key
from conserve_jax.request import Sequence
from conserve_jax.runtime.step_plan import SampledToken, StepResult
from conserve_jax.sampling_params import SamplingParams
from conserve_jax.scheduling.policies.base import Policy
from conserve_jax.scheduling.prefix_groups import PrefixGroups
from conserve_jax.scheduling.scheduler import Scheduler

BS = 4
ROOT = root_key({"model": "m"})


# ---- what KV content depends on ---------------------------------------------------------
def test_cache_root_and_checkpoint_layout_follow_every_kv_content_field():
    """The prefix cache's root and a saved checkpoint's layout both change with each field
    the KV values depend on (the layout used to miss the weights' dtype)."""
    from conserve_jax.engine.offline_suspension import OfflineSuspension
    base = EngineConfig(model="random:tiny", seed=1)
    variants = [base.__class__(**{**base.__dict__, **kw}) for kw in (
        {"weight_dtype": "bfloat16"}, {"dtype": "bfloat16"}, {"seed": 2}, {"model": "random:small"})]
    roots = {root_key(c.kv_content(), None) for c in [base] + variants}
    layouts = [OfflineSuspension(c, None, 100, 64).layout() for c in [base] + variants]
    assert len(roots) == 5
    assert all(a != b for i, a in enumerate(layouts) for b in layouts[i + 1:])
    assert set(base.kv_content()) <= set(layouts[0])


# ---- key chain ------------------------------------------------------------------------
def test_chain_depends_on_every_earlier_token_and_the_salt():
    a = extend_chain([], ROOT, list(range(12)), BS, 3)
    b = extend_chain([], ROOT, [99] + list(range(1, 12)), BS, 3)
    assert len(a) == 3 and len(set(a)) == 3
    assert all(x != y for x, y in zip(a, b))  # a change in block 0 changes every key
    c = extend_chain([], ROOT, list(range(8)) + [50, 51, 52, 53], BS, 3)
    assert c[:2] == a[:2] and c[2] != a[2]
    salted = extend_chain([], root_key({"model": "m"}, "tenant-a"), list(range(12)), BS, 3)
    assert not set(salted) & set(a)
    assert root_key({"model": "m"}, "t") == root_key({"model": "m"}, "t")  # stable, no hash()
    assert root_key({"model": "m2"}) != ROOT
    assert block_key(ROOT, [1, 2, 3, 4]) == block_key(ROOT, np.array([1, 2, 3, 4]))


def test_extend_chain_is_incremental():
    toks = list(range(20))
    part = extend_chain([], ROOT, toks, BS, 2)
    assert extend_chain(part, ROOT, toks, BS, 5) == extend_chain([], ROOT, toks, BS, 5)


# ---- block pool -----------------------------------------------------------------------
def test_keyed_blocks_become_cached_free_and_are_reused_last():
    a = BlockAllocator(6)  # 5 usable
    x, y = a.allocate(2)
    assert a.register(x, b"kx", online=False) and a.register(y, b"ky", online=False)
    a.free([x, y])  # a table in position order: its last block (y) is reused first
    assert a.num_free == 5 and a.num_cached_free == 2
    plain = a.allocate(3)
    assert x not in plain and y not in plain  # plain free blocks go first
    assert a.lookup(b"kx") == x
    got = a.allocate(1)
    assert got == [y] and a.lookup(b"ky") is None and a.evictions == 1
    assert a.lookup(b"kx") == x


def test_hit_takes_a_reference_and_offline_blocks_are_evicted_before_online_ones():
    a = BlockAllocator(4)  # 3 usable
    on, off, other = a.allocate(3)
    a.register(on, b"on", online=True)
    a.register(off, b"off", online=False)
    a.free([off, on])  # on freed last: most recently used, yet online goes after offline
    a.free([other])
    a.hit(off, online=False)
    a.hit(off, online=False)
    assert a.ref_count(off) == 2 and a.num_free == 2
    a.free([off])
    assert a.ref_count(off) == 1  # still held: not free
    a.free([off])
    a.allocate(1)  # the plain block
    assert a.allocate(1) == [off]  # offline before online, whatever the recency
    assert a.lookup(b"on") == on


def test_register_refuses_duplicates_and_double_free_raises():
    a = BlockAllocator(4)
    x, y = a.allocate(2)
    assert a.register(x, b"k", online=False)
    assert not a.register(y, b"k", online=False)  # the same content computed twice
    a.free([y])
    assert a.num_cached_free == 0  # y had no key: plain free
    a.free([x])
    with pytest.raises(ValueError):
        a.free([x])


# ---- KV manager ---------------------------------------------------------------------------
def _kv(n=16):
    return KVManager(n, BS, prefix_caching=True)


def test_match_attach_register_and_release():
    kv = _kv()
    toks = list(range(14))  # 3 full blocks + 2 tokens
    chain: list = []
    assert kv.match_prefix(toks, chain, ROOT, len(toks) - 1) == []
    assert kv.grow("a", False, 14)
    assert kv.register_full("a", toks, chain, ROOT, 14) == 3
    table = kv.blocks("a")
    other: list = []
    hits = kv.match_prefix(toks + [5], other, ROOT, 14)
    assert hits == table[:3]
    # at most max_tokens: a prompt that is exactly 3 blocks reuses only 2 (its last token
    # must run again, and it would write into the shared third block)
    assert kv.match_prefix(toks[:12], [], ROOT, 11) == table[:2]
    kv.attach_prefix("b", True, hits)
    assert kv.num_registered("b") == 3 and kv.blocks("b") == hits
    assert kv.used_online == 3 and kv.used_offline == 4
    kv.release("a")
    assert kv.allocator.num_cached_free == 0  # still held by b
    kv.release("b")
    assert kv.allocator.num_cached_free == 3 and kv.num_free == kv.capacity
    assert kv.match_prefix(toks, [], ROOT, 14) == hits  # still cached after both left


def test_prefix_caching_off_matches_nothing():
    kv = KVManager(16, BS)
    kv.grow("a", False, 12)
    kv.register_full("a", list(range(12)), [], ROOT, 12)
    assert kv.match_prefix(list(range(12)), [], ROOT, 11) == []
    assert kv.allocator.num_cached == 0


# ---- scheduler --------------------------------------------------------------------------
def _seq(rid, toks, online=False, arrival=None):
    req = GenerationRequest(rid, list(toks), SamplingParams(max_tokens=4),
                            RequestClass.ONLINE if online else RequestClass.OFFLINE)
    return Sequence(req, RequestStream(rid), 0, token_ids=list(toks), prompt_len=len(toks),
                    arrival=time.monotonic() if arrival is None else arrival, cache_root=ROOT)


def _sched(num_blocks=64, max_prefill_seqs=4, prefill=64, hold_s=10.0):
    cfg = EngineConfig(model="random:tiny", max_num_seqs=8, max_prefill_tokens=prefill,
                       max_prefill_seqs=max_prefill_seqs, prefix_group_hold_s=hold_s)
    pol = Policy(cfg.max_num_seqs, cfg.max_prefill_tokens)
    return Scheduler(cfg, KVManager(num_blocks, BS, prefix_caching=True), pol)


def _commit(sched, step):
    n = len(step.plan.sampled_specs())
    return sched.commit(step, StepResult([SampledToken(9, 0.0, [])] * n, 1))


def test_a_hit_starts_the_prompt_past_its_cached_blocks():
    sched = _sched()
    shared = list(range(100, 116))  # 4 blocks
    a = _seq("a", shared + [1, 2, 3])
    sched.add(a)
    _commit(sched, sched.schedule())
    assert a.num_cached_tokens == 0 and a.num_computed == 19
    b = _seq("b", shared + [7, 8], online=True)
    sched.add(b)
    step = sched.schedule()
    (pre,) = step.plan.prefills
    assert pre.start == 16 and pre.tokens == [7, 8]  # only the uncached part runs
    assert pre.block_table[:4] == sched.kv.blocks("a")[:4]
    assert b.num_cached_tokens == 16
    assert sched.counters.prefix_hit_tokens == [0, 16]
    assert sched.counters.prefix_query_tokens == [19, 18]
    _commit(sched, step)
    sched.remove(a)
    sched.remove(b)
    assert sched.kv.num_free == sched.kv.capacity


def test_a_waiting_request_that_cannot_start_gives_its_hits_back():
    sched = _sched(num_blocks=9)  # 8 usable
    shared = list(range(100, 116))
    a = _seq("a", shared + [1])
    sched.add(a)
    _commit(sched, sched.schedule())  # a: 5 blocks
    big = _seq("big", shared + list(range(40)), arrival=a.arrival + 1.0)  # hits 4, needs 10 more
    sched.add(big)
    step = sched.schedule()
    assert all(e.seq is not big for e in step.entries)
    assert sched.kv.num_blocks("big") == 0 and big.num_computed == 0
    assert sched.kv.allocator.ref_count(sched.kv.blocks("a")[0]) == 1


def test_offline_twins_wait_for_the_leader_then_hit():
    sched = _sched(prefill=64, max_prefill_seqs=4)
    shared = list(range(100, 116))
    lead, other, twin = _seq("lead", shared + [1, 2]), _seq("x", range(300, 320)), \
        _seq("twin", shared + [5, 6])
    for s in (lead, other, twin):
        sched.add(s)
    ran = []
    for _ in range(2):
        step = sched.schedule()
        ran.append({e.seq.request_id: e.num_tokens for e in step.entries})
        _commit(sched, step)
    # first iteration: room for all three, but the twin waits for the prefix it shares
    assert ran[0] == {"lead": 18, "x": 20}
    assert ran[1]["twin"] == 2 and twin.num_cached_tokens == 16  # then hits all 4 blocks


def test_hold_ends_after_hold_s():
    sched = _sched(prefill=64, hold_s=0.0)
    shared = list(range(100, 116))
    sched.add(_seq("lead", shared + [1]))
    sched.add(_seq("twin", shared + [2]))
    step = sched.schedule()  # no hold: both compute the prefix at once
    assert {e.seq.request_id for e in step.entries} == {"lead", "twin"}


def test_groups_order_gathers_a_prefix_group_at_its_first_member():
    g = PrefixGroups(BS, 10.0)
    p, q = list(range(100, 108)), list(range(200, 208))
    seqs = [_seq("p1", p + [1]), _seq("q1", q + [1]), _seq("short", [1, 2]),
            _seq("p2", p + [2]), _seq("q2", q + [2])]
    assert [s.request_id for s in g.order(seqs)] == ["p1", "p2", "q1", "q2", "short"]


# ---- checkpointer gaps ------------------------------------------------------------------
class _Transfer:
    block_shape = (1, 1, 1, BS, 1)  # [L, 2, kvh, bs, hd]
    dtype = np.float32
    block_size = BS
    max_blocks_per_call = 8

    def __init__(self):
        self.dev = {}

    def gather(self, ids):
        return np.stack([self.dev.get(i, np.full(self.block_shape, float(i), np.float32))
                         for i in ids], axis=3)  # [L, 2, kvh, n, bs, hd]

    def padded_count(self, n):
        return n

    def scatter(self, ids, blocks):
        for j, i in enumerate(ids):
            self.dev[i] = np.asarray(blocks)[j]


def test_checkpoint_fills_the_gap_of_hit_blocks_recomputed_after_an_eviction():
    """Two hit blocks left out; the cache then evicts them and the resumed request hits
    only the first, recomputing the second: the second is copied now, so the host copy
    runs from block 1 to the end without a gap (a later restore reaches past it)."""
    ck = KVCheckpointer(_Transfer(), pool_bytes=64 * 4 * BS * 4)
    try:
        ck.checkpoint_new_blocks([("r", [11, 12, 13, 14], 16, 2)])
        ck.wait_pending()
        assert ck.saved_run("r", 1) == 0  # block 1 is a gap
        ck.checkpoint_new_blocks([("r", [11, 22, 13, 14, 15], 20, 1)])  # 1 hit now
        ck.wait_pending()
        assert ck.saved_run("r", 1) == 4 and ck.saved_run("r", 0) == 0
        ck.restore("r", [30, 31], first=1)
        assert float(ck.transfer.dev[30].ravel()[0]) == 22.0  # the recomputed block
        assert float(ck.transfer.dev[31].ravel()[0]) == 13.0
        ck.release("r")
        assert ck.pool.num_free == ck.pool.num_slots
    finally:
        ck.close()


def test_checkpoint_skips_hit_blocks_and_restores_after_them():
    ck = KVCheckpointer(_Transfer(), pool_bytes=64 * 4 * BS * 4)
    try:
        ck.checkpoint_new_blocks([("r", [11, 12, 13, 14], 16, 2)])  # 2 hits left out
        ck.wait_pending()
        assert ck.num_saved_blocks("r") == 4
        assert ck.saved_run("r", 0) == 0 and ck.saved_run("r", 2) == 2
        assert ck.kept_tokens("r", 16, 17) == 16
        assert ck.export_blocks("r", 16).shape[0] == 0  # gap at block 0: nothing exported
        got = ck.export_blocks("r", 16, table=[11, 12, 13, 14])  # hits read from device
        assert [float(b.ravel()[0]) for b in got] == [11.0, 12.0, 13.0, 14.0]
        ck.restore("r", [20, 21], first=2)
        assert float(ck.transfer.dev[20].ravel()[0]) == 13.0
        with pytest.raises(RuntimeError):
            ck.restore("r", [20], first=0)
        ck.release("r")
        assert ck.pool.num_free == ck.pool.num_slots
    finally:
        ck.close()
