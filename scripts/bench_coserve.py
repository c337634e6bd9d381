"""Co-serving benchmark: every policy on the same online + offline workload, in one process.

Workload (scripts/coserve_workload.py says exactly how): a window of the Azure conversation
trace as online load (--rate 0.4 req/s over --duration s, token counts /8, prompts in
[16, 512], outputs in [8, 64]) plus a saturating offline batch submitted at t=0 (96
requests, prompts 512-1024, outputs 64-128; --quick: 30 s, 48 requests, outputs 32-64).
Engine (same for every policy): max_model_len 1280, 16 sequences, 512 prefill tokens and 2
prefill sequences per iteration, safepoint every 4 layers, KV memory for 4 full contexts
(321 blocks of 16: offline work fills it, so online arrivals must take blocks from it),
4 GB host pool; SLOs TTFT 1 s, TPOT 0.2 s (online-only meets both with room; with TTFT 2 s
no offline iteration here is long enough for conserve to need a preemption).
Each policy gets a fresh engine (in-process, one alive at a time). Order: online-only,
conserve, priority-recompute, sarathi, non-preemptive; --repeats N runs the set N times,
odd repeats reversed; per-policy numbers are medians over repeats (each repeat in `runs`).

Measured per policy:
- online TTFT = first token received - submit; TPOT = (last - first token) / (tokens - 1);
  client-side (time.monotonic, one consumer thread per request); p50/p99 over requests.
  The drain after the arrival window lasts until every online request is done, at most
  --drain s (default TTFT + 64 * TPOT + 2, so no SLO-meeting request is cut); requests
  still unfinished count with a censored TTFT (a lower bound) and as SLO misses. SLO
  attainment = requests finished with TTFT <= --ttft and TPOT <= --tpot / all requests.
- offline tokens/s = offline output tokens (EngineStats.offline_tokens_total, so partial
  progress counts) in the arrival window [0, --duration] / its length. Also reported:
  offline_committed_tokens_per_s (prefill + decode tokens of offline requests committed).
- preemptions (iterations abandoned at a safepoint), preemption latency p50/p99 (conserve:
  arrival -> runner stopped, the policy's log), evictions, recomputed and restored tokens
  (checkpointing policies only; null elsewhere), whole run incl. drain.
Once per run, on a conserve engine whose step loop is stopped (this thread then owns its
runner and checkpointer): resume_vs_recompute_ratio = (restore a --resume-context-token
request's blocks from the host pool + recompute the one token not checkpointed) / (prefill
all of it again, chunked as the scheduler does); medians of 5 alternating rounds.
safepoint_interval_s = time-weighted median completed offline-only iteration of
conserve (the iteration an arrival lands in) * 4 / layers.
targets = issue 3's targets for conserve: value, threshold, met.

Compiled code: each engine jits its own functions; to keep compiles out of the numbers the
first engine compiles every shape bucket (--warmup all) and later engines reuse its jitted
callables (same model and geometry, hence the same executables).

    python scripts/bench_coserve.py --quick       # ~4 min (+~3 min on cold XLA caches)
    python scripts/bench_coserve.py               # ~12 min; --repeats 2: ~23 min
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import coserve_workload as wl  # noqa: E402
from conserve_jax.config import CacheConfig, EngineConfig  # noqa: E402
from conserve_jax.engine import Engine  # noqa: E402
from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass  # noqa: E402
from conserve_jax.kv.checkpointer import KVCheckpointer  # noqa: E402
from conserve_jax.models.loader import load_model  # noqa: E402
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan  # noqa: E402
from conserve_jax.sampling_params import SamplingParams  # noqa: E402

POLICIES = ["online-only", "conserve", "priority-recompute", "sarathi", "non-preemptive"]
METRICS = ["online_ttft_p50_s", "online_ttft_p99_s", "online_tpot_p50_s", "online_tpot_p99_s",
           "slo_attainment", "offline_tokens_per_s", "preemptions", "preemption_latency_p50_s",
           "preemption_latency_p99_s", "evictions", "recomputed_tokens", "restored_tokens",
           "online_requests"]
RUNNER_FNS, CKPT_FNS = ("_layer", "_embed", "_select", "_head"), ("_gather", "_scatter")


# ---- engines ---------------------------------------------------------------------------
def engine_config(a, policy: str) -> EngineConfig:
    nb = a.num_blocks or a.kv_seqs * -(-a.max_model_len // 16) + 1
    return EngineConfig(model=a.model, policy=policy, max_model_len=a.max_model_len,
                        max_num_seqs=a.max_num_seqs, max_prefill_tokens=a.max_prefill_tokens,
                        max_prefill_seqs=a.max_prefill_seqs,
                        safepoint_interval=a.safepoint_interval, default_ttft_s=a.ttft,
                        default_tpot_s=a.tpot, latency_model_path=a.latency_model,
                        seed=a.seed, cache=CacheConfig(block_size=16, num_blocks=nb,
                                                       host_pool_bytes=int(a.host_pool_gb * 2**30)))


class SharedCompiled:
    """Jitted callables of the first engine, handed to later ones. Engines have no hook for
    this, so the attributes are swapped right after construction (the step loop is idle
    until the first submit). Equivalent: same model config and buckets."""

    def __init__(self) -> None:
        self.fns: dict = {}

    def adopt(self, eng: Engine) -> None:
        for obj, names in ((eng.runner, RUNNER_FNS), (_transfer(eng), CKPT_FNS)):
            for n in names if obj is not None else ():
                if n in self.fns:
                    setattr(obj, n, self.fns[n])
                else:
                    self.fns[n] = getattr(obj, n)


def _transfer(eng: Engine):
    return eng.checkpointer.transfer if eng.checkpointer is not None else None


def compiled_count(eng: Engine) -> int:
    fns = [getattr(eng.runner, n) for n in RUNNER_FNS]
    fns += [getattr(_transfer(eng), n) for n in CKPT_FNS] if eng.checkpointer else []
    return sum(f._cache_size() for f in fns)


def release(eng: Engine) -> None:
    """After shutdown: drop the device KV caches and host pool. The checkpointer's copy
    thread never exits and keeps the runner alive (reported), so free the big arrays."""
    eng.runner.caches = []
    if eng.checkpointer is not None:
        eng.checkpointer.wait_pending()
        eng.checkpointer.pool.data = np.zeros((0,))


# ---- one policy run --------------------------------------------------------------------
class OnlineClient(threading.Thread):
    """Submits one online request and timestamps every token it receives."""

    def __init__(self, eng: Engine, req: wl.Req, slo: SLO, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.eng, self.req, self.slo, self.stop = eng, req, slo, stop
        self.submit_t = None
        self.times: list = []
        self.finish_t = self.reason = self.error = None

    def run(self) -> None:
        r = self.req
        g = GenerationRequest(r.request_id, r.prompt, SamplingParams(
            max_tokens=r.output_len, temperature=0.0, ignore_eos=True),
            RequestClass.ONLINE, self.slo)
        self.submit_t = time.monotonic()
        try:
            stream = self.eng.submit(g)
        except Exception as e:  # counted as an SLO miss
            self.error, self.finish_t = f"{type(e).__name__}: {e}", time.monotonic()
            return
        while True:
            try:
                out = stream.get(timeout=0.25)
            except Exception:
                if self.stop.is_set():
                    return
                continue
            now = time.monotonic()
            self.times += [now] * len(out.token_ids)
            if out.finished:
                self.finish_t, self.reason = now, out.finish_reason
                return


class Probe:
    """Instrumentation through the policy's hooks (each wrapper calls the original):
    iteration times and offline tokens committed (on_step_done), and every safepoint
    check of conserve with the online arrival it was about (safepoint)."""

    def __init__(self, eng: Engine) -> None:
        self.iters, self.checks = [], []  # (t, elapsed, has_online, offline tokens); checks
        self.stop_intervals = []  # per preemption: (time to the stop) / layers done * k
        k = eng.config.safepoint_interval
        pol = eng.policy
        done, sp = pol.on_step_done, pol.safepoint

        def on_step_done(step, elapsed, engine):
            self.iters.append((time.monotonic(), elapsed, step.has_online,
                               sum(e.num_tokens for e in step.entries if not e.seq.online)))
            done(step, elapsed, engine)

        def safepoint(step, engine):
            check = sp(step, engine)
            if check is None:
                return None
            t_it = time.monotonic()

            def wrapped(layers: int) -> bool:
                stopped = check(layers)
                arr = engine.earliest_online_arrival()
                if arr is not None:
                    self.checks.append((id(arr[0]), arr[1] - t_it, layers, stopped))
                if stopped:
                    self.stop_intervals.append((time.monotonic() - t_it) / layers * k)
                return stopped
            return wrapped

        pol.on_step_done, pol.safepoint = on_step_done, safepoint

    def preemption_detail(self) -> dict:
        """Per preemption: safepoints that let the waiting online request pass before the
        one that stopped (0 = stopped at the first safepoint after its arrival)."""
        passed, waited = {}, []
        for sid, arr_rel, layers, stopped in self.checks:
            if stopped:
                waited.append(passed.pop(sid, 0))
            else:
                passed[sid] = passed.get(sid, 0) + 1
        arrived_before = sum(1 for _, r, _, s in self.checks if s and r < 0)
        return {"safepoints_passed_before_stop": waited,
                "measured_safepoint_interval_s": self.stop_intervals,
                "stopped_at_first_safepoint": sum(w == 0 for w in waited),
                "arrived_before_iteration_start": arrived_before}


def run_policy(a, name: str, loaded, work: wl.Workload, shared: SharedCompiled,
               plot_path: str) -> dict:
    eng = Engine(engine_config(a, name), loaded=loaded)
    shared.adopt(eng)
    probe = Probe(eng)
    compiled0 = compiled_count(eng)
    slo, stop = SLO(a.ttft, a.tpot), threading.Event()
    base = eng.stats()
    t0 = time.monotonic()
    if eng.policy.accepts(GenerationRequest("x", [5], request_class=RequestClass.OFFLINE)):
        for r in work.offline:
            eng.submit(GenerationRequest(r.request_id, r.prompt, SamplingParams(
                max_tokens=r.output_len, temperature=0.0, ignore_eos=True), RequestClass.OFFLINE))
    samples = [(0.0, 0)]

    def sample_loop():
        while not stop.wait(0.5):
            samples.append((time.monotonic() - t0,
                            eng.stats().offline_tokens_total - base.offline_tokens_total))

    sampler = threading.Thread(target=sample_loop, daemon=True)
    sampler.start()
    clients = []
    for r in work.online:
        time.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
        clients.append(OnlineClient(eng, r, slo, stop))
        clients[-1].start()
    time.sleep(max(0.0, t0 + a.duration - time.monotonic()))
    st_win = eng.stats()
    win_s = time.monotonic() - t0
    deadline = time.monotonic() + a.drain
    for c in clients:
        c.join(timeout=max(0.0, deadline - time.monotonic()))
    t_end = time.monotonic()
    st = eng.stats()
    stop.set()
    sampler.join()
    lat = list(getattr(getattr(eng.policy, "preemption_log", None), "latencies_s", []) or [])
    ck = eng.checkpointer
    restored = eng.scheduler.counters.restored_tokens if ck is not None else None
    compiles = compiled_count(eng) - compiled0
    eng.shutdown()
    release(eng)
    reqs = [wl.request_record(c, t0, t_end, a.ttft, a.tpot) for c in clients]
    conserve = name == "conserve"
    out = {
        "online_ttft_p50_s": wl.pct([r["ttft_s"] for r in reqs], 50),
        "online_ttft_p99_s": wl.pct([r["ttft_s"] for r in reqs], 99),
        "online_tpot_p50_s": wl.pct([r["tpot_s"] for r in reqs], 50),
        "online_tpot_p99_s": wl.pct([r["tpot_s"] for r in reqs], 99),
        "slo_attainment": sum(r["slo_met"] for r in reqs) / max(1, len(reqs)),
        "offline_tokens_per_s": (st_win.offline_tokens_total - base.offline_tokens_total) / win_s,
        "preemptions": st.preemptions - base.preemptions,
        "preemption_latency_p50_s": wl.pct(lat, 50) if conserve else None,
        "preemption_latency_p99_s": wl.pct(lat, 99) if conserve else None,
        "preemption_latency_over_own_interval": [x / y for x, y in zip(lat, probe.stop_intervals)]
        if conserve else None,
        "evictions": st.evictions - base.evictions,
        "recomputed_tokens": st.recomputed_tokens - base.recomputed_tokens,
        "restored_tokens": restored,
        "online_requests": len(reqs),
        "online_unfinished": sum(not r["finished"] for r in reqs),
        "online_tokens": sum(r["tokens"] for r in reqs),
        "offline_tokens_in_window": st_win.offline_tokens_total - base.offline_tokens_total,
        "offline_waiting_at_window_end": st_win.offline_waiting,
        "preempted_tokens_discarded": st.preempted_tokens_discarded - base.preempted_tokens_discarded,
        "iterations": st.iterations - base.iterations,
        "window_s": win_s, "drain_s": t_end - t0 - win_s,
        "checkpointer": dataclasses.asdict(ck.counters) if ck is not None else None,
        "compiles_during_run": compiles,
        "preemption_detail": probe.preemption_detail() if conserve else None,
        "offline_committed_tokens_per_s": sum(n for t, _, _, n in probe.iters if t <= t0 + win_s) / win_s,
        "_offline_iter_s": [e for _, e, online, _ in probe.iters if not online],
    }
    if plot_path:
        wl.plot_policy(plot_path, name, reqs, samples, a.ttft, a.tpot, a.duration)
    return out


# ---- resume vs recompute ---------------------------------------------------------------
def measure_resume(eng: Engine, ctx: int, seed: int, rounds: int = 5) -> dict:
    """On a conserve engine whose step loop is stopped. A request with a `ctx`-token
    prompt is prefilled (chunks of max_prefill_tokens, as the scheduler does) and samples
    its first token; its full blocks are checkpointed. Then, alternating, (a) resume:
    restore the checkpointed blocks into fresh blocks + recompute what was not
    checkpointed (the sampled token: one decode), vs (b) recompute: prefill the prompt and
    the sampled token into fresh blocks. Both end with the same next token (checked)."""
    r, alloc = eng.runner, eng.kv.allocator
    # the engine's own checkpointer stopped with its step loop: use a fresh one, sized for
    # this request, with the engine's compiled gather/scatter
    block_bytes = eng.checkpointer.pool.data[0].nbytes if eng.checkpointer.pool.num_slots else 0
    ck = KVCheckpointer(eng.checkpointer.transfer, (-(-(ctx + 1) // r.block_size) + 1) * block_bytes)
    bs, chunk = r.block_size, eng.config.max_prefill_tokens
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, None)
    prompt = [int(x) for x in np.random.default_rng(seed + 7).integers(5, r.cfg.vocab_size, ctx)]
    nb = -(-(ctx + 1) // bs)

    def run(tokens, start, table) -> int:
        while True:
            if len(tokens) == 1 and start > 0:
                plan = StepPlan(decodes=[DecodeItem(tokens[0], start, table, spec)])
            else:
                piece = tokens[:chunk]
                last = len(piece) == len(tokens)
                plan = StepPlan(prefills=[PrefillItem(piece, start, table, spec if last else None)])
            res = r.execute(plan)
            n = plan.num_tokens
            tokens, start = tokens[n:], start + n
            if not tokens:
                return res.tokens[0].token

    b1 = alloc.allocate(nb)
    tok1 = run(prompt, 0, b1)
    ck.checkpoint_new_blocks([("resume", b1, ctx)])
    kept = ck.kept_tokens("resume", ctx, ctx + 1)
    saved = ck.num_saved_blocks("resume")
    full = prompt + [tok1]
    ta, tb, toks = [], [], set()
    for i in range(rounds + 1):  # round 0 warms both paths up
        for which in ("ab" if i % 2 == 0 else "ba"):
            blocks = alloc.allocate(nb)
            t = time.perf_counter()
            if which == "a":
                ck.restore("resume", blocks[:saved])
                tok = run(full[kept:], kept, blocks)
            else:
                tok = run(full, 0, blocks)
            dt = time.perf_counter() - t
            alloc.free(blocks)
            toks.add(tok)
            if i:
                (ta if which == "a" else tb).append(dt)
    toks.add(run([tok1], ctx, b1))  # the request continuing without eviction
    alloc.free(b1)
    ck.release("resume")
    ck.close()
    ra, rb = float(np.median(ta)), float(np.median(tb))
    return {"context_tokens": ctx, "restored_blocks": saved,
            "recomputed_on_resume_tokens": len(full) - kept, "resume_s": ra, "recompute_s": rb,
            "resume_s_all": ta, "recompute_s_all": tb, "ratio": ra / rb,
            "tokens_match": len(toks) == 1, "rounds": rounds}


# ---- report ----------------------------------------------------------------------------
# ---- entry point -----------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--quick", action="store_true",
                   help="30 s per policy, offline outputs 32-64, 48 offline requests")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--duration", type=float, help="online arrival window per policy (s); 120, quick 30")
    p.add_argument("--drain", type=float, help="max wait for online requests after it; default "
                   "ttft + online_output_max * tpot + 2 (an SLO-meeting request is never cut)")
    p.add_argument("--rate", type=float, default=0.4, help="online requests/s")
    p.add_argument("--ttft", type=float, default=1.0)
    p.add_argument("--tpot", type=float, default=0.2)
    p.add_argument("--offline-requests", type=int)
    p.add_argument("--offline-prompt", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--offline-output", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--online-prompt-max", type=int, default=512)
    p.add_argument("--online-output-max", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1280)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=512)
    p.add_argument("--max-prefill-seqs", type=int, default=EngineConfig().max_prefill_seqs)
    p.add_argument("--kv-seqs", type=int, default=4,
                   help="KV memory = this many full-length contexts (+1 scratch block)")
    p.add_argument("--num-blocks", type=int, help="KV blocks (overrides --kv-seqs)")
    p.add_argument("--host-pool-gb", type=float, default=4.0)
    p.add_argument("--safepoint-interval", type=int, default=4)
    p.add_argument("--latency-model", help="file from `conserve-jax profile` (default: cached)")
    p.add_argument("--resume-context", type=int, default=1024)
    p.add_argument("--warmup", choices=["all", "none"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="out/bench_coserve.json")
    p.add_argument("--plot-dir", default="out")
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (30.0 if q else 120.0)
    a.drain = a.drain if a.drain is not None else a.ttft + a.online_output_max * a.tpot + 2.0
    a.offline_requests = a.offline_requests or (48 if q else 96)
    a.offline_prompt = a.offline_prompt or [512, 1024]
    a.offline_output = a.offline_output or ([32, 64] if q else [64, 128])
    a.policies = [x for x in a.policies.split(",") if x]
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_start = time.perf_counter()
    loaded = load_model(a.model, seed=a.seed)
    spec = wl.WorkloadSpec(duration_s=a.duration, rate=a.rate, prompt_max=a.online_prompt_max,
                           output_max=a.online_output_max, offline_requests=a.offline_requests,
                           offline_prompt_min=a.offline_prompt[0], offline_prompt_max=a.offline_prompt[1],
                           offline_output_min=a.offline_output[0], offline_output_max=a.offline_output[1],
                           seed=a.seed)
    work = wl.build(spec, loaded.config.vocab_size, a.max_model_len)
    shared = SharedCompiled()
    t = time.perf_counter()
    first = Engine(engine_config(a, "conserve"), loaded=loaded)  # profiles or loads latency model
    first.shutdown()  # stop its step loop: this thread now owns runner and checkpointer
    setup = {"model_load_and_latency_model_s": time.perf_counter() - t_start}
    t = time.perf_counter()
    if a.warmup == "all":
        first.runner.warmup()
        first.checkpointer.transfer.warmup()
    setup["warmup_s"] = time.perf_counter() - t
    shared.adopt(first)
    resume = measure_resume(first, a.resume_context, a.seed)
    lm = first.policy.model
    release(first)
    del first
    runs: dict = {n: [] for n in a.policies}
    order = []
    for rep in range(a.repeats):
        for name in (a.policies if rep % 2 == 0 else a.policies[::-1]):
            order.append(name)
            png = os.path.join(a.plot_dir, f"bench_coserve_{name}{'' if rep == 0 else f'_r{rep + 1}'}.png") \
                if a.plot_dir else None
            if png:
                os.makedirs(a.plot_dir, exist_ok=True)
            print(f"[{time.perf_counter() - t_start:6.0f}s] repeat {rep + 1}: {name}", flush=True)
            runs[name].append(run_policy(a, name, loaded, work, shared, png))
    offline_iters = [x for r in runs.get("conserve", []) for x in r["_offline_iter_s"]]
    stops = [x for r in runs.get("conserve", []) for x in
             r["preemption_detail"]["measured_safepoint_interval_s"]]
    sp = wl.safepoint_interval(offline_iters, stops, a.safepoint_interval, loaded.config.num_layers)
    policies = {}
    for name, rs in runs.items():
        for r in rs:
            r.pop("_offline_iter_s")
        agg = {k: wl.median_of([r[k] for r in rs]) for k in rs[0]
               if k != "checkpointer" and all(isinstance(r[k], (int, float, type(None))) for r in rs)}
        for k in ("restored_tokens", "preemption_latency_p50_s", "preemption_latency_p99_s"):
            if all(r[k] is None for r in rs):
                agg[k] = None
        policies[name] = {**agg, "runs": rs}
    cfg = dataclasses.asdict(engine_config(a, "conserve"))
    cfg.pop("policy")
    res = {
        "model": loaded.source, "num_layers": loaded.config.num_layers,
        "machine": {"cpus": os.cpu_count(), "backend": __import__("jax").default_backend()},
        "engine_config": cfg, "slo": {"ttft_s": a.ttft, "tpot_s": a.tpot},
        "latency_model_fit_error": lm.fit_error,
        "workload": work.describe(), "mode": "quick" if a.quick else "full",
        "duration_s": a.duration, "drain_s": a.drain, "repeats": a.repeats, "order": order,
        "policies": policies,
        "resume_vs_recompute_ratio": resume["ratio"], "resume_vs_recompute": resume,
        "safepoint_interval_s": sp["safepoint_interval_s"], "safepoint_interval": sp,
        "setup": setup,
    }
    res["targets"] = wl.targets(policies, resume["ratio"], sp["safepoint_interval_s"])
    res["setup"]["total_s"] = time.perf_counter() - t_start
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    wl.print_table(res)
    print(f"total {res['setup']['total_s']:.0f}s; JSON: {a.json}")
    return res


if __name__ == "__main__":
    main()
