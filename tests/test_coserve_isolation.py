"""Isolation (issue 7), deterministic: a fake latency model and a fake clock, the real
scheduler and policy, no device work and no timing assertions.

- With isolation F, no iteration with online work is planned whose predicted time exceeds
  F x the predicted time of its online work alone (and offline work does ride along).
- An online arrival during an offline-only iteration stops it at the next safepoint (one
  layer later); online requests the plan left waiting, and iterations with online work,
  are never preempted.
"""
import pytest

from conserve_jax.config import ConserveConfig, EngineConfig, parse_isolation
from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass, RequestStream
from conserve_jax.kv.kv_manager import KVManager
from conserve_jax.runtime.step_plan import SampledToken, StepResult
from conserve_jax.sampling_params import SamplingParams
from conserve_jax.scheduling.policies.conserve import ConservePolicy
from conserve_jax.scheduling.policies.registry import build
from conserve_jax.scheduling.latency_model import WorkShape
from conserve_jax.scheduling.scheduler import Scheduler
from conserve_jax.request import Sequence

LAYERS = 8


class FakeModel:
    """Predicted seconds: linear in tokens and in the context read (deterministic)."""

    num_layers = LAYERS

    def predict(self, w: WorkShape) -> float:
        rows = w.num_decodes + w.prefill_tokens
        return 0.010 + 0.0005 * rows + 2e-6 * w.max_context * (w.num_decodes + w.prefill_seqs)

    def observe(self, w, measured_s) -> None:
        pass


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make_seq(rid, n_prompt, online, arrival=0.0, ttft=None):
    cls = RequestClass.ONLINE if online else RequestClass.OFFLINE
    req = GenerationRequest(rid, [7] * n_prompt, SamplingParams(max_tokens=10_000), cls,
                            SLO(ttft, None))
    return Sequence(req, RequestStream(rid), 0, token_ids=[7] * n_prompt, prompt_len=n_prompt,
                    arrival=arrival)


def make_sched(isolation, waiting=None, clock=None, num_blocks=512, safepoint_interval=1):
    cfg = EngineConfig(model="random:tiny", max_num_seqs=16, max_prefill_tokens=256,
                       max_prefill_seqs=1,
                       conserve=ConserveConfig(isolation=isolation,
                                               safepoint_interval=safepoint_interval))
    waiting = waiting if waiting is not None else []
    pol = ConservePolicy(cfg.max_num_seqs, cfg.max_prefill_tokens, FakeModel(),
                         default_ttft_s=2.0, default_tpot_s=0.2,
                         online_waiting=lambda: list(waiting), knobs=cfg.conserve,
                         clock=clock or FakeClock())
    return Scheduler(cfg, KVManager(num_blocks, 16), pol), pol


def online_alone(step) -> WorkShape:
    """The work shape of the step's online entries only (before commit)."""
    w = WorkShape()
    for e in step.entries:
        if e.seq.online:
            end = e.seq.num_computed + e.num_tokens
            w = w.add_decode(end) if e.decode else w.add_prefill(e.num_tokens, end, e.samples)
    return w


def commit(sched, step):
    n = len(step.plan.sampled_specs())
    sched.commit(step, StepResult([SampledToken(9, 0.0, [])] * n, LAYERS))


def run_mix(isolation, iterations=80):
    """Offline backlog from the start; online requests arrive at iterations 5, 20, 21, 40 and
    each leaves after 12 tokens. Returns [(step, online-alone shape)] per planned step."""
    sched, pol = make_sched(isolation)
    for i in range(6):
        sched.add(make_seq(f"off{i}", 300 + 40 * i, online=False))
    arrivals = {5: [40], 20: [200, 30], 40: [120]}
    steps, online = [], []
    for it in range(iterations):
        for j, n in enumerate(arrivals.get(it, [])):
            s = make_seq(f"on{it}-{j}", n, online=True)
            sched.add(s)
            online.append(s)
        step = sched.schedule()
        steps.append((step, online_alone(step)))
        commit(sched, step)
        for s in online:
            if s.status.value == "running" and s.num_generated >= 12:
                sched.remove(s)
    return steps, pol.model


@pytest.mark.parametrize("F", [1.05, 1.2, 2.0])
def test_isolation_budget_bounds_every_online_iteration(F):
    steps, model = run_mix(F)
    mixed = [(s, w) for s, w in steps if s.has_online]
    assert mixed, "the workload has iterations with online work"
    carried = 0
    for step, alone in mixed:
        assert model.predict(step.work) <= F * model.predict(alone) + 1e-12
        carried += any(not e.seq.online for e in step.entries)
    assert carried > 0, "offline work rides along inside the budget"
    # iterations without online work fill to the token budget (throughput limit)
    offline_only = [s for s, _ in steps if not s.has_online]
    assert max(s.plan.num_tokens for s in offline_only) >= 256


def test_isolation_off_fills_to_the_objective():
    """`off` keeps the old behaviour: offline tokens up to 0.9 x TPOT objective, far past
    1.2 x the online work's own time for this fake model."""
    steps, model = run_mix(None)
    ratios = [model.predict(s.work) / model.predict(w) for s, w in steps if s.has_online]
    assert max(ratios) > 1.2
    assert all(model.predict(s.work) <= 0.9 * 0.2 + 1e-12 for s, _ in steps
               if s.has_online and any(not e.seq.online for e in s.entries))


def offline_only_step(sched):
    for i in range(3):
        sched.add(make_seq(f"off{i}", 200, online=False))
    step = sched.schedule()
    assert step.entries and not step.has_online
    return step


def test_arrival_stops_offline_iteration_at_next_layer():
    clock, waiting = FakeClock(), []
    sched, pol = make_sched(1.2, waiting, clock)
    sp = pol.safepoints(offline_only_step(sched))
    assert sp is not None  # a check after every layer by default (the runner's interval)
    clock.t += 0.01
    assert sp.check(1) is False  # nobody waiting
    clock.t += 0.004
    waiting.append(make_seq("on", 40, online=True, arrival=clock.t))  # lands in layer 2
    clock.t += 0.01
    assert sp.check(2) is True  # the next layer boundary
    log = pol.preemption_log
    assert log.layers_done == [2]
    assert log.latencies_s == [pytest.approx(0.01)]
    assert log.layer_times_s == [pytest.approx(0.012)]


def test_check_before_the_first_layer_weighs_the_predicted_layer_time():
    """Called before any layer ran (after host restores): a new arrival stops the
    iteration; the log carries the predicted layer time."""
    clock, waiting = FakeClock(), []
    sched, pol = make_sched(1.2, waiting, clock)
    step = offline_only_step(sched)
    sp = pol.safepoints(step)
    assert sp.check(0) is False  # nobody waiting
    waiting.append(make_seq("on", 40, online=True, arrival=clock.t))
    clock.t += 0.05
    assert sp.check(0) is True
    log = pol.preemption_log
    assert log.layers_done == [0]
    assert log.layer_times_s == [pytest.approx(pol.model.predict(step.work) / LAYERS)]
    assert log.latencies_s == [pytest.approx(0.05)]
    before = sched.counters.preempted_tokens_discarded
    sched.abandon(step, ran=False)
    assert sched.counters.preempted_tokens_discarded == before  # nothing ran, nothing lost


def test_arrival_near_the_end_lets_the_last_layer_finish():
    """Within max((F-1) x own online-only TTFT, one layer) of the end: no preemption."""
    clock, waiting = FakeClock(), []
    sched, pol = make_sched(1.2, waiting, clock)
    sp = pol.safepoints(offline_only_step(sched))
    clock.t += 0.01 * (LAYERS - 1)
    waiting.append(make_seq("on", 40, online=True, arrival=clock.t))
    assert sp.check(LAYERS - 1) is False  # rest = 1 layer, waited 0
    assert pol.preemption_log.latencies_s == []


def test_request_left_waiting_by_the_plan_does_not_preempt():
    clock = FakeClock()
    waiting = []
    sched, pol = make_sched(1.2, waiting, clock, num_blocks=40)
    step = offline_only_step(sched)
    # an online request the scheduler saw but could not place: appears in the next plan
    stuck = make_seq("stuck", 40, online=True, arrival=clock.t)
    pol._not_placed = {id(stuck)}
    sp = pol.safepoints(step)
    waiting.append(stuck)
    clock.t += 0.02
    assert sp.check(1) is False
    fresh = make_seq("fresh", 40, online=True, arrival=clock.t)
    waiting.append(fresh)
    clock.t += 0.01
    assert sp.check(2) is True  # a new arrival still does


def test_iterations_with_online_work_have_no_safepoints():
    sched, pol = make_sched(1.2)
    sched.add(make_seq("off", 200, online=False))
    sched.add(make_seq("on", 40, online=True))
    step = sched.schedule()
    assert step.has_online
    assert pol.safepoints(step) is None


def test_no_safepoints_when_the_interval_is_none():
    """safepoint_interval None (LLM's default): offline-only iterations run through."""
    sched, pol = make_sched(1.2, safepoint_interval=None)
    assert pol.safepoints(offline_only_step(sched)) is None
    sched, pol = make_sched(1.2, safepoint_interval=3)
    assert pol.safepoints(offline_only_step(sched)) is not None


def test_isolation_off_preempts_only_for_the_ttft_objective():
    clock, waiting = FakeClock(), []
    sched, pol = make_sched(None, waiting, clock)
    sp = pol.safepoints(offline_only_step(sched))
    clock.t += 0.01
    waiting.append(make_seq("loose", 40, online=True, arrival=clock.t, ttft=5.0))
    clock.t += 0.01
    assert sp.check(2) is False
    waiting.insert(0, make_seq("tight", 40, online=True, arrival=clock.t - 0.001, ttft=0.05))
    clock.t += 0.01
    assert sp.check(3) is True


def test_isolation_knob_parsing_names_the_field():
    assert parse_isolation("off") is None and parse_isolation(None) is None
    assert parse_isolation("1.5") == 1.5
    assert ConserveConfig(isolation="off").isolation is None
    assert EngineConfig().conserve.isolation == 1.2
    for bad in ("0.9", "fast", float("nan"), -1):
        with pytest.raises(ValueError, match="isolation"):
            ConserveConfig(isolation=bad)
    with pytest.raises(ValueError, match="online_waiting"):
        build(EngineConfig(policy="conserve"), FakeModel)
