"""Co-serving invariants: offline greedy outputs are identical whether a request ran alone,
was abandoned at a layer safepoint, was checkpointed and resumed, or was evicted and
recomputed; no KV block or host-pool slot leaks; online requests are never preempted."""
import pytest


from tests.coserve_helpers import (assert_no_leaks, collect, engine, prompts, req, wait_until)

OFFLINE = prompts(4, 60, seed=1)
ONLINE = prompts(3, 90, seed=2)
N_OFF, N_ON = 40, 12


@pytest.fixture(scope="module")
def alone():
    """Reference: every request alone in a roomy engine."""
    eng = engine(policy="fcfs", num_blocks=256)
    try:
        out = {}
        for i, p in enumerate(OFFLINE):
            out[f"off{i}"] = collect(eng.submit(req(f"off{i}", p, N_OFF)))[0]
        for i, p in enumerate(ONLINE):
            out[f"on{i}"] = collect(eng.submit(req(f"on{i}", p, N_ON, online=True)))[0]
        return out
    finally:
        eng.shutdown()


def _run_mix(eng, online_after_tokens=8):
    """Offline requests first; once they are decoding, online requests that need their
    memory arrive."""
    offs = {f"off{i}": eng.submit(req(f"off{i}", p, N_OFF)) for i, p in enumerate(OFFLINE)}
    wait_until(lambda: eng.stats().offline_tokens_total >= online_after_tokens)
    ons = {f"on{i}": eng.submit(req(f"on{i}", p, N_ON, online=True, ttft=30, tpot=30))
           for i, p in enumerate(ONLINE)}
    return {k: collect(s)[0] for k, s in {**offs, **ons}.items()}


def _record_evictions(eng):
    evicted = []
    orig = eng.scheduler.evict

    def evict(seq):
        evicted.append(seq)
        orig(seq)

    eng.scheduler.evict = evict
    return evicted


def test_checkpointed_and_resumed_matches_alone(alone):
    eng = engine(policy="conserve", num_blocks=30)  # too small for everything at once
    try:
        evicted = _record_evictions(eng)
        got = _run_mix(eng)
        st = eng.stats()
        assert evicted and all(not s.online for s in evicted)
        assert eng.scheduler.counters.restored_tokens > 0
        assert eng.checkpointer.counters.blocks_restored > 0
        assert got == alone
        assert_no_leaks(eng)
        assert st.evictions == len(evicted)
    finally:
        eng.shutdown()


def test_evicted_and_recomputed_matches_alone(alone):
    eng = engine(policy="priority-recompute", num_blocks=30)
    try:
        evicted = _record_evictions(eng)
        got = _run_mix(eng)
        assert evicted and all(not s.online for s in evicted)
        assert eng.scheduler.counters.recomputed_tokens > 0
        assert got == alone
        assert_no_leaks(eng)
    finally:
        eng.shutdown()


def test_host_pool_full_falls_back_to_recompute(alone):
    block_bytes = 4 * 2 * 2 * 16 * 32 * 4  # layers*2*kv_heads*block*head_dim*4 (random:small)
    eng = engine(policy="conserve", num_blocks=30, host_pool_bytes=3 * block_bytes)
    try:
        assert eng.checkpointer.pool.num_slots == 3
        got = _run_mix(eng)
        assert eng.checkpointer.counters.blocks_skipped_pool_full > 0
        assert eng.scheduler.counters.recomputed_tokens > 0
        assert got == alone
        assert_no_leaks(eng)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("resume", [True, False], ids=["resumed", "discarded"])
def test_abandoned_at_safepoint_matches_alone(alone, resume):
    """An online request arrives in the middle of an offline-only iteration (injected
    right after a safepoint check): the runner stops at the very next layer boundary, and
    the offline requests still produce exactly their solo tokens, whether the stopped
    iteration is parked and its prefill chunk continued from that layer once the online
    request is done while its decodes run on (the default; injected into an iteration
    with both), or dropped and recomputed (`resume_abandoned` off).
    isolation=1.0 makes the rule strict (any remaining offline work preempts)."""
    eng = engine(policy="conserve", num_blocks=256, isolation=1.0, resume_abandoned=resume)
    try:
        injected, checks = [], []  # checks: (iteration, layers_done, stopped, injected_before)
        current = [0]  # layers_done of the check in progress
        orig = eng.policy.online_waiting
        stopped_steps, resumed = [], []  # steps stopped at a safepoint; (step, start layer)
        for name in ("abandon", "park"):
            def record(step, *a, _orig=getattr(eng.scheduler, name), **kw):
                stopped_steps.append(step)
                _orig(step, *a, **kw)
            setattr(eng.scheduler, name, record)

        cur_step = [None]

        def ready():
            if resume:  # an iteration with decodes (cut loose) and a prefill chunk (kept)
                kinds = {e.decode for e in cur_step[0].entries}
                return kinds == {True, False}
            return eng.stats().offline_tokens_total >= 4  # after some progress

        def arrival():
            out = orig()
            # inject an online request once this check has looked
            if not injected and ready() and current[0] < eng.model_config.num_layers - 1:
                injected.append(eng.submit(req("on0", ONLINE[0], N_ON, online=True, tpot=30)))
            return out

        orig_safepoints = eng.policy.safepoints

        def safepoints(step, start_layer=0):
            sp = orig_safepoints(step, start_layer)
            if sp is None:
                return None
            cur_step[0] = step
            if start_layer:
                resumed.append((step, start_layer))
            it = len(stopped_steps), id(step)

            def check(layers):
                before, current[0] = bool(injected), layers
                stopped = sp.check(layers)
                checks.append((it, layers, stopped, before))
                return stopped
            return type(sp)(check)

        eng.policy.online_waiting = arrival
        eng.policy.safepoints = safepoints
        offs = {f"off{i}": eng.submit(req(f"off{i}", p, N_OFF)) for i, p in enumerate(OFFLINE)}
        got = {k: collect(s)[0] for k, s in offs.items()}
        wait_until(lambda: injected)
        got["on0"] = collect(injected[0])[0]
        st = eng.stats()
        assert st.preemptions >= 1
        assert stopped_steps and all(not s.has_online for s in stopped_steps)
        # the first check that saw the injected request is the one that stopped, and it
        # came right after the check during which it was submitted (one layer later)
        i = next(n for n, c in enumerate(checks) if c[3])
        assert checks[i][2] and checks[i - 1][0] == checks[i][0]
        assert checks[i][1] == checks[i - 1][1] + 1
        assert eng.policy.preemption_log.layers_done[0] == checks[i][1]
        if resume:  # continued from the layer it stopped at; only the decodes thrown away
            assert resumed[0] == (stopped_steps[0], checks[i][1])
            assert st.preemptions_resumed >= 1
            assert st.preempted_tokens_discarded == sum(e.decode for e in stopped_steps[0].entries)
        else:
            assert not resumed and st.preemptions_resumed == 0
            assert st.preempted_tokens_discarded > 0
        for k in got:
            assert got[k] == alone[k], k
        assert_no_leaks(eng)
    finally:
        eng.shutdown()


def test_arrival_during_restores_goes_first(alone):
    """An online request arriving while an offline-only iteration restores evicted KV from
    the host pool stops that iteration before its first layer (nothing discarded, the
    restored KV kept), and every output still equals its solo run."""
    eng = engine(policy="conserve", num_blocks=30)
    try:
        injected, stopped, executed = [], [], []
        restore, abandon, execute = (eng.checkpointer.restore, eng.scheduler.abandon,
                                     eng.runner.execute)

        def on_restore(rid, blocks, first=0):
            restore(rid, blocks, first)
            step = eng._cur_step
            if not injected and not step.has_online:
                injected.append((step, eng.submit(req("late", ONLINE[0], N_ON, online=True))))

        def on_abandon(step, ran=True):
            c = eng.scheduler.counters
            before = c.preempted_tokens_discarded
            abandon(step, ran)
            stopped.append((step, ran, c.preempted_tokens_discarded - before))

        def on_execute(plan, *a):
            executed.append(plan)
            return execute(plan, *a)

        eng.checkpointer.restore, eng.scheduler.abandon = on_restore, on_abandon
        eng.runner.execute = on_execute
        got = _run_mix(eng)
        assert injected, "no offline-only iteration restored KV"
        step, stream = injected[0]
        assert (step, False, 0) in stopped  # stopped before running: nothing discarded
        assert all(p is not step.plan for p in executed)  # not a single layer ran
        assert collect(stream)[0] == alone["on0"]
        assert got == alone
        assert_no_leaks(eng)
    finally:
        eng.shutdown()


def test_no_leaks_after_cancel_and_failure():
    eng = engine(policy="conserve", num_blocks=40)
    try:
        streams = [eng.submit(req(f"c{i}", p, 200)) for i, p in enumerate(OFFLINE)]
        wait_until(lambda: eng.stats().offline_tokens_total >= 10)
        for i in range(len(OFFLINE)):
            eng.cancel(f"c{i}")
        assert all(collect(s)[1] == "cancelled" for s in streams)
        assert_no_leaks(eng)
        # an iteration that fails again on its retry fails its requests and frees
        # everything they held (one failure before the commit is retried: StepGuard)
        orig = eng.runner.execute
        calls = []

        def boom(plan, *args, **kw):
            calls.append(1)
            if len(calls) in (3, 4):
                raise RuntimeError("injected device failure")
            return orig(plan, *args, **kw)

        eng.runner.execute = boom
        streams = [eng.submit(req(f"f{i}", p, 30)) for i, p in enumerate(OFFLINE)]
        reasons = [collect(s)[1] for s in streams]
        assert "error" in reasons
        assert_no_leaks(eng)
    finally:
        eng.shutdown()


def test_online_only_refuses_offline():
    eng = engine(policy="online-only")
    try:
        with pytest.raises(ValueError, match="offline"):
            eng.submit(req("x", OFFLINE[0], 4))
        assert collect(eng.submit(req("y", OFFLINE[0], 4, online=True)))[1] == "length"
    finally:
        eng.shutdown()


def test_non_preemptive_never_evicts_offline():
    # the offline requests fit together (30 blocks); with the online ones they do not
    eng = engine(policy="non-preemptive", num_blocks=40)
    try:
        evicted = _record_evictions(eng)
        got = _run_mix(eng)
        assert not [s for s in evicted if not s.online] and len(got) == 7
        assert_no_leaks(eng)
    finally:
        eng.shutdown()


def test_checkpoint_and_resume_with_tensor_parallel_cache(alone):
    """The host checkpoint gathers and restores blocks of a KV cache split over devices."""
    eng = engine(policy="conserve", num_blocks=30, tp=2)
    try:
        assert len(eng.runner.caches[0][0].sharding.device_set) == 2
        got = _run_mix(eng)
        assert eng.checkpointer.counters.blocks_restored > 0
        assert got == alone
        assert len(eng.runner.caches[0][0].sharding.device_set) == 2
        assert_no_leaks(eng)
    finally:
        eng.shutdown()
