"""Offline deadlines in the scheduler (issue 27, items 2-3 of "What to build"),
deterministic: the fake latency model and clock of the isolation tests, the real scheduler
and conserve policy, no device work.

- Urgent offline sequences (at-risk jobs' items) go first among offline work; online work
  still goes first.
- deadline_policy "isolate": urgent work never takes an iteration past F x its online
  work's predicted time, and nothing is recorded as borrowed.
- deadline_policy "borrow": urgent work may take an iteration up to isolation_max x, only
  while it is urgent, and the predicted seconds beyond F x are recorded as borrowed.
"""
import pytest

from conserve_jax.config import ConserveConfig, EngineConfig
from conserve_jax.engine_api import urgent_ranks
from conserve_jax.kv.kv_manager import KVManager
from conserve_jax.scheduling.policies.conserve import ConservePolicy
from conserve_jax.scheduling.scheduler import Scheduler
from tests.test_coserve_isolation import FakeClock, FakeModel, commit, make_seq, online_alone

F, F_MAX = 1.2, 1.5


def make_sched(policy="isolate", isolation=F, isolation_max=F_MAX):
    cfg = EngineConfig(model="random:tiny", max_num_seqs=16, max_prefill_tokens=256,
                       max_prefill_seqs=1,
                       conserve=ConserveConfig(isolation=isolation, safepoint_interval=1,
                                               deadline_policy=policy,
                                               isolation_max=isolation_max))
    pol = ConservePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens, FakeModel(),
                         default_ttft_s=2.0, default_tpot_s=0.2, online_waiting=lambda: [],
                         knobs=cfg.conserve, clock=FakeClock())
    return Scheduler(cfg, KVManager(512, 16), pol), pol


def small_sched(num_blocks=9, max_num_seqs=16):
    """A conserve scheduler with little memory (9 blocks of 16: two 60-token prompts, not
    three) and the fake latency model."""
    cfg = EngineConfig(model="random:tiny", max_num_seqs=max_num_seqs, max_prefill_tokens=256,
                       max_prefill_seqs=1, conserve=ConserveConfig(isolation=F))
    pol = ConservePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens, FakeModel(),
                         default_ttft_s=2.0, default_tpot_s=0.2, online_waiting=lambda: [],
                         knobs=cfg.conserve, clock=FakeClock())
    return Scheduler(cfg, KVManager(num_blocks, 16), pol)


def test_urgent_offline_work_goes_first_after_online():
    def fresh(urgent=()):
        sched, _ = make_sched()
        for i in range(4):
            sched.add(make_seq(f"off{i}", 100, online=False, arrival=i))
        sched.urgent = urgent_ranks(urgent)
        return sched
    # the throughput order (arrival here) without urgency: off0's prompt
    assert [e.seq.request_id for e in fresh().schedule().entries] == ["off0"]
    assert [e.seq.request_id for e in fresh({"off2"}).schedule().entries] == ["off2"]
    sched = fresh({"off2"})
    sched.add(make_seq("on", 40, online=True, arrival=10))
    step = sched.schedule()  # urgent offline work never goes before online work
    assert [e.seq.request_id for e in step.entries][0] == "on"


def test_while_an_urgent_item_generates_no_other_offline_prompt_goes_in_beside_it():
    """An urgent item gets one token per iteration; a chunk of another job's prompt would
    make that iteration several decodes long, so it waits (other offline decodes go on)."""
    sched, _ = make_sched()
    for rid, n in (("calm_run", 20), ("hurry", 20), ("calm_wait", 400)):
        sched.add(make_seq(rid, n, online=False, arrival=len(sched.waiting_offline)))
    for _ in range(2):  # calm_run's and hurry's prompts go in, one per iteration
        commit(sched, sched.schedule())
    assert {s.request_id for s in sched.running} == {"calm_run", "hurry"}
    assert all(not s.in_prefill for s in sched.running)

    kinds = lambda step: {(e.seq.request_id, e.decode) for e in step.entries}
    calm = sched.schedule()  # nothing urgent: calm_wait's prompt goes in beside the decodes
    assert kinds(calm) == {("calm_run", True), ("hurry", True), ("calm_wait", False)}

    sched.urgent = urgent_ranks({"hurry"})
    step = sched.schedule()
    assert kinds(step) == {("hurry", True), ("calm_run", True)}  # the prompt waits
    commit(sched, step)

    # an urgent item's own prompt still goes in beside other urgent work: only the
    # generating of urgent items holds other jobs' prompts back
    sched.urgent = urgent_ranks({"calm_wait"})
    assert ("calm_wait", False) in kinds(sched.schedule())


def test_while_an_urgent_item_generates_a_later_ranks_prompts_wait_its_decodes_go():
    """Urgent jobs due later (higher rank) do not put prompts beside a lower rank's
    generating items either; their own generating items still get their token, and the
    lower rank's own prompts still go in."""
    sched, _ = make_sched()
    for rid, n in (("first_run", 20), ("second_run", 20), ("second_wait", 300)):
        sched.add(make_seq(rid, n, online=False, arrival=len(sched.waiting_offline)))
    for _ in range(2):
        commit(sched, sched.schedule())
    assert {s.request_id for s in sched.running} == {"first_run", "second_run"}

    kinds = lambda step: {(e.seq.request_id, e.decode) for e in step.entries}
    sched.urgent = urgent_ranks({"first_run": 0, "second_run": 1, "second_wait": 1})
    step = sched.schedule()
    assert kinds(step) == {("first_run", True), ("second_run", True)}  # rank 1's prompt waits
    sched.add(make_seq("first_wait", 300, online=False, arrival=9))
    sched.urgent = urgent_ranks({"first_run": 0, "first_wait": 0, "second_run": 1,
                                 "second_wait": 1})
    assert ("first_wait", False) in kinds(sched.schedule())  # rank 0's own prompt goes in

    # nothing of rank 0 generating (its items are prompts): rank 1's prompt may go in
    sched2, _ = make_sched()
    for rid, n in (("second_run", 20), ("second_wait", 300)):
        sched2.add(make_seq(rid, n, online=False, arrival=len(sched2.waiting_offline)))
    commit(sched2, sched2.schedule())
    sched2.urgent = urgent_ranks({"second_run": 1, "second_wait": 1})
    assert ("second_wait", False) in kinds(sched2.schedule())


def test_urgent_waiting_work_goes_before_running_offline_work_and_takes_its_memory():
    """An at-risk job's item that arrives after other offline work already holds the KV
    (the engine runs that work first by arrival) is not stuck behind it: it is scheduled
    first and evicts the latest-started offline sequence it needs memory from. Without
    urgency it waits."""
    def fill(urgent):
        sched = small_sched()  # room for two 60-token prompts, not three
        early = [make_seq(f"early{i}", 60, online=False, arrival=i) for i in range(2)]
        for s in early:
            sched.add(s)
        for _ in range(2):
            commit(sched, sched.schedule())  # both prompts computed, memory full
        assert all(s.status.value == "running" for s in early)
        late = make_seq("late", 60, online=False, arrival=5)
        sched.add(late)
        sched.urgent = urgent_ranks({"late"} if urgent else ())
        return sched, early, late, sched.schedule()

    sched, early, late, step = fill(urgent=False)
    assert late.status.value == "waiting"
    assert {e.seq.request_id for e in step.entries} == {"early0", "early1"}

    sched, early, late, step = fill(urgent=True)
    ids = [e.seq.request_id for e in step.entries]
    assert ids[0] == "late" and late.status.value == "running"
    assert early[1].status.value == "waiting"  # the latest started made room
    assert early[0].status.value == "running" and sched.counters.evictions == 1


def test_urgent_work_goes_in_rank_order_and_a_lower_rank_takes_memory_from_a_higher():
    """Two at-risk jobs: the one due first (rank 0) goes before the other (rank 1) though
    its item arrived later, and takes the memory the other one's running item holds."""
    def two_running_then(early_rank, late_rank):
        sched = small_sched()
        early = [make_seq(f"early{i}", 60, online=False, arrival=i) for i in range(2)]
        for s in early:
            sched.add(s)
        sched.urgent = urgent_ranks({"early0": early_rank, "early1": early_rank})
        for _ in range(2):
            commit(sched, sched.schedule())
        late = make_seq("late", 60, online=False, arrival=5)
        sched.add(late)
        sched.urgent = urgent_ranks({"early0": early_rank, "early1": early_rank,
                                     "late": late_rank})
        return sched, early, late, sched.schedule()

    sched, early, late, step = two_running_then(early_rank=1, late_rank=0)
    assert step.entries[0].seq is late and late.status.value == "running"
    assert early[1].status.value == "waiting" and sched.counters.evictions == 1
    # the other way round, the later arrival of a higher rank waits
    sched, early, late, step = two_running_then(early_rank=0, late_rank=1)
    assert late.status.value == "waiting" and sched.counters.evictions == 0


def test_online_work_takes_memory_from_non_urgent_offline_work_first():
    """Online work evicts the latest-started offline sequence, unless that one is urgent:
    then a non-urgent one goes (an evicted urgent item could not come back next to online
    work, which would cost it its window)."""
    sched = small_sched()
    calm, hurry = (make_seq(n, 60, online=False, arrival=i) for i, n in enumerate(("calm", "hurry")))
    for s in (calm, hurry):
        sched.add(s)
    for _ in range(3):
        commit(sched, sched.schedule())
    assert calm.status.value == "running" and hurry.status.value == "running"
    sched.urgent = urgent_ranks({"hurry": 0})  # at risk now: it started last
    sched.add(make_seq("on", 60, online=True, arrival=10))
    sched.schedule()
    assert hurry.status.value == "running" and calm.status.value == "waiting"


def test_urgent_work_takes_a_slot_from_other_offline_work():
    sched = small_sched(num_blocks=512, max_num_seqs=2)
    for i in range(2):
        sched.add(make_seq(f"early{i}", 20, online=False, arrival=i))
    for _ in range(2):
        commit(sched, sched.schedule())
    late = make_seq("late", 20, online=False, arrival=5)
    sched.add(late)
    commit(sched, sched.schedule())
    assert late.status.value == "waiting"  # every slot taken, not urgent: it waits
    sched.urgent = urgent_ranks({"late"})
    step = sched.schedule()
    assert late.status.value == "running" and step.entries[0].seq is late
    assert sched.counters.evictions == 1


def run(policy, urgent_from=None, urgent_until=None, iterations=90):
    """Offline backlog; online requests arrive every 10 iterations and leave after 8 tokens;
    every offline request is urgent in iterations [urgent_from, urgent_until). Returns
    [(step, online-alone shape, urgent?)] and the policy."""
    sched, pol = make_sched(policy)
    offs = [make_seq(f"off{i}", 300 + 40 * i, online=False, arrival=i) for i in range(8)]
    for s in offs:
        sched.add(s)
    online, out = [], []
    for it in range(iterations):
        if it % 10 == 3:
            s = make_seq(f"on{it}", 60, online=True, arrival=100 + it)
            sched.add(s)
            online.append(s)
        urgent = urgent_from is not None and urgent_from <= it < urgent_until
        sched.urgent = urgent_ranks(s.request_id for s in offs) if urgent else {}
        step = sched.schedule()
        out.append((step, online_alone(step), urgent))
        before = pol.borrowed_s
        pol.on_step_done(step, 0.0)
        step.borrowed = pol.borrowed_s - before
        commit(sched, step)
        for s in online:
            if s.status.value == "running" and s.num_generated >= 8:
                sched.remove(s)
    return out, pol


def test_isolate_never_exceeds_the_isolation_budget():
    steps, pol = run("isolate", urgent_from=0, urgent_until=10**9)
    mixed = [(s, w) for s, w, _ in steps if s.has_online]
    assert mixed and any(any(not e.seq.online for e in s.entries) for s, _ in mixed)
    for step, alone in mixed:
        assert pol.model.predict(step.work) <= F * pol.model.predict(alone) + 1e-12
    assert pol.borrowed_s == 0.0


def test_borrow_only_while_at_risk_and_within_isolation_max():
    steps, pol = run("borrow", urgent_from=30, urgent_until=60)
    model = pol.model
    borrowed = 0.0
    exceeded = 0
    for step, alone, urgent in steps:
        if not step.has_online:
            assert step.borrowed == 0.0
            continue
        t, base = model.predict(step.work), model.predict(alone)
        if urgent:
            assert t <= F_MAX * base + 1e-12
            exceeded += t > F * base + 1e-12
            assert step.borrowed == pytest.approx(max(0.0, t - F * base))
        else:  # not at risk: the plain isolation budget, nothing borrowed
            assert t <= F * base + 1e-12
            assert step.borrowed == 0.0
        borrowed += step.borrowed
    assert exceeded > 0, "urgent work did borrow online budget"
    assert pol.borrowed_s == pytest.approx(borrowed) and pol.borrowed_s > 0


def test_deadline_policy_knobs_name_the_field():
    with pytest.raises(ValueError, match="deadline_policy"):
        ConserveConfig(deadline_policy="always")
    with pytest.raises(ValueError, match="isolation_max"):
        ConserveConfig(isolation=1.2, isolation_max=1.1, deadline_policy="borrow")
    ConserveConfig(isolation=2.0, isolation_max=1.5)  # irrelevant under isolate
    with pytest.raises(ValueError, match="isolation_max"):
        ConserveConfig(isolation_max=float("inf"))
    assert ConserveConfig().deadline_policy == "isolate"
