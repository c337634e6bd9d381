"""Co-serving benchmark: every policy on the same online + offline workload, in one process.

Workload (coserve_workload says exactly how): a window of the Azure conversation
trace as online load (--rate 0.4 req/s over --duration s: 300 s, --quick 100 s = 40
requests; token counts /8, prompts in [16, 512], outputs in [8, 64]) plus a saturating
offline batch submitted at t=0 (0.6 x duration requests, prompts 512-1024, outputs 64-128;
--quick: 32-64). Engine (same for every policy): max_model_len 1280, 16 sequences, 512
prefill tokens and one prefill sequence per iteration, KV memory for 4 full contexts (321
blocks of 16: offline work fills it, so online arrivals must take blocks from it), 4 GB
host pool; SLOs TTFT 1 s, TPOT 0.2 s; conserve at --isolation (default 1.2) with a
safepoint after every layer of offline-only iterations.
Variants (coserve_pareto): online-only, conserve, priority-recompute, sarathi
(256 tokens), non-preemptive; --sweep adds conserve at isolation 1.05, 1.1, 1.5, 2, off and
sarathi at 64, 128, 512 tokens and draws the Pareto plot (--pareto-plot). Each variant gets
a fresh engine (in-process, one alive at a time); --repeats N runs the set N times, the
order rotated by one each repeat; per-variant numbers are medians over repeats (each
repeat under `runs`).

Measured per variant:
- online TTFT = first token received - submit; TPOT = (last - first token) / (tokens - 1);
  client-side (time.monotonic, one consumer thread per request); p50/p99 over requests.
  The drain after the arrival window lasts until every online request is done, at most
  --drain s (default TTFT + 64 * TPOT + 2, so no SLO-meeting request is cut); requests
  still unfinished count with a censored TTFT (a lower bound) and as SLO misses. SLO
  attainment = requests finished with TTFT <= --ttft and TPOT <= --tpot / all requests.
- offline tokens/s = offline output tokens generated in the arrival window / its length;
  offline_processed_tokens_per_s = offline prefill + decode tokens committed in the window
  / its length (the targets use this one; recomputation after an eviction counts again).
- online_busy_fraction: time of the window's iterations that carried online work / its
  length (online-only: the share of the machine the online load needs on its own).
- offline_riding_tokens_per_s: offline tokens committed by iterations carrying online
  work / the window; offline_rate_online_idle: offline tokens committed by offline-only
  iterations / the window's time outside online iterations (non-preemptive: its whole
  rate). Their split shows where offline throughput is lost against non-preemptive.
- offline_only_call_fraction: runner time (execute and resume calls, abandoned ones
  included) of offline-only iterations / the window; offline_only_call_tokens_per_s: their
  committed offline tokens per second of that time (per-iteration efficiency, against
  non-preemptive's); runner_idle_fraction: the window's time outside any runner call.
- preemptions (iterations stopped at a safepoint), of them resumed from their layer
  (`preemptions_resumed`), tokens discarded, preemption latency p50/p99 (conserve:
  arrival -> runner stopped, the policy's log, with each stop's layers run and measured time
  per layer), evictions, recomputed and restored tokens (checkpointing policies only; null
  elsewhere), whole run incl. drain.
Once per run, on a conserve engine whose step loop is stopped (this thread then owns its
runner and checkpointer; coserve_probes): resume_vs_recompute_ratio = (restore a
--resume-context-token request's blocks from the host pool + recompute the one token not
checkpointed) / (prefill all of it again); safepoint_cost = offline-only iterations run with
no safepoints, a no-op check every layer and every 4 layers (medians, alternating), and the
cost of one real conserve check with nobody waiting.
targets = issue 7's targets for conserve: value, threshold, met.
idle_harvest = each policy's offline processed tokens/s against an idle ceiling: non-preemptive's
rate x the share of the window online-only's runner was idle (coserve_report.idle_harvest).

Compiled code: each engine jits its own functions; to keep compiles out of the numbers the
first engine compiles every shape bucket (--warmup all) and later engines reuse its jitted
callables (same model and geometry, hence the same executables).

    python scripts/bench_coserve.py --quick            # 5 x ~2 min + set-up
    python scripts/bench_coserve.py --quick --sweep    # 13 x ~2 min + set-up
    python scripts/bench_coserve.py                    # 5 x ~5.5 min + set-up

Callers: scripts/bench_coserve.py (the entry point; also `python -m
conserve_jax.bench.coserve`); tests/test_bench_coserve.py runs `main` on a tiny model and
tests/test_bench_scripts_args.py checks `parse_args` and `engine_config`.

Engine knobs are the engine's own flags (add_engine_args: --model, --dtype, --block-size,
--isolation, --sarathi-token-budget, --host-pool-bytes, --latency-model-path, ...) with the
defaults above; --kv-seqs sizes the KV cache unless --num-blocks or --kv-cache-tokens is
given. Not flags here: --policy (each variant sets it), the engine's --warmup (see the
script's --warmup), --default-ttft-s/--default-tpot-s (--ttft/--tpot set them).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time

import numpy as np

from conserve_jax.bench import coserve_accounting as accounting
from conserve_jax.bench import coserve_pareto as pareto
from conserve_jax.bench import coserve_probes as probes
from conserve_jax.bench import coserve_report as report
from conserve_jax.bench import coserve_workload as wl
from conserve_jax.bench import script_io
from conserve_jax.config import EngineConfig, parse_isolation
from conserve_jax.engine.engine import Engine
from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass
from conserve_jax.engine_args import add_engine_args, engine_config_from_args
from conserve_jax.models.loader import load_model
from conserve_jax.sampling_params import SamplingParams

POLICIES = ["online-only", "conserve", "priority-recompute", "sarathi", "non-preemptive"]
VARIANT_NAMES = POLICIES + ["conserve-discard"]  # what --policies accepts
METRICS = ["online_ttft_p50_s", "online_ttft_p99_s", "online_tpot_p50_s", "online_tpot_p99_s",
           "slo_attainment", "offline_tokens_per_s", "offline_processed_tokens_per_s",
           "isolation", "preemptions", "preemptions_resumed", "preempted_tokens_discarded",
           "preemption_latency_p50_s",
           "preemption_latency_p99_s", "evictions", "recomputed_tokens", "restored_tokens",
           "online_requests", "online_busy_fraction", "offline_riding_tokens_per_s",
           "offline_rate_online_idle", "offline_only_call_fraction",
           "offline_only_call_tokens_per_s", "runner_idle_fraction"]
# the benchmark's engine (same for every variant), where it differs from the engine's defaults
ENGINE_DEFAULTS = {"max_model_len": 1280, "max_num_seqs": 16, "max_prefill_tokens": 512,
                   "block_size": 16, "host_pool_bytes": 4 << 30}
NOT_FLAGS = ("policy", "warmup", "default_ttft_s", "default_tpot_s")
RUNNER_FNS, CKPT_FNS = ("_groups", "_embed", "_select", "_head"), ("_gather", "_scatter")


# ---- engines ---------------------------------------------------------------------------
def engine_config(a, policy: str, **overrides) -> EngineConfig:
    """The engine flags with `policy`, the SLO as the engine's default objectives, KV for
    --kv-seqs full contexts unless --num-blocks says, and a variant's `overrides`. The
    engine's own warm-up is off: the script warms the first engine (--warmup) and hands its
    compiled functions to the others (`SharedCompiled`)."""
    nb = a.num_blocks or a.kv_seqs * -(-a.max_model_len // a.block_size) + 1
    return engine_config_from_args(a, policy=policy, num_blocks=nb, default_ttft_s=a.ttft,
                                   default_tpot_s=a.tpot, warmup=False, **overrides)


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
    fns = list(eng.runner._groups.values())  # layer-group executables, by group size
    fns += [getattr(eng.runner, n) for n in RUNNER_FNS if n != "_groups"]
    fns += [getattr(_transfer(eng), n) for n in CKPT_FNS] if eng.checkpointer else []
    return sum(f._cache_size() for f in fns)


def release(eng: Engine) -> None:
    """After shutdown: drop the device KV caches, the weights, the host pool and its
    staging buffer (up to ~0.5 GB). The checkpointer's copy thread never exits and keeps
    the runner alive (reported), so free the big arrays.
    `shutdown` waits at most 30 s for the step loop; on a loaded machine an iteration can
    take longer, so wait for it before taking its caches away."""
    eng._thread.join()
    eng.runner.caches = []
    eng.runner.layers, eng.runner.embed, eng.runner.head = [], None, None
    if eng.checkpointer is not None:
        eng.checkpointer.wait_pending()
        pool = eng.checkpointer.pool
        pool.data, pool._staging = np.zeros((0,)), np.zeros((0,))


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


def preemption_detail(policy) -> dict:
    """Per preemption (conserve): layers run before the stop, the iteration's measured time
    per layer, and arrival -> stop latency in units of that layer time."""
    log = policy.preemption_log
    return {"layers_done": list(log.layers_done), "layer_time_s": list(log.layer_times_s),
            "latency_over_layer_time": [x / y for x, y in zip(log.latencies_s, log.layer_times_s)
                                        if y > 0]}



def drive_online(eng, online: list, slo, stop: threading.Event, t0: float, duration: float,
                 drain: float):
    """Start each online request's client at its arrival (seconds after `t0`), wait out the
    window, then up to `drain` seconds for the clients to finish. Returns (clients, stats
    at the end of the window, the window's seconds, end time, stats at the end)."""
    clients = []
    for r in online:
        time.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
        clients.append(OnlineClient(eng, r, slo, stop))
        clients[-1].start()
    time.sleep(max(0.0, t0 + duration - time.monotonic()))
    st_win = eng.stats()
    win_s = time.monotonic() - t0
    deadline = time.monotonic() + drain
    for c in clients:
        c.join(timeout=max(0.0, deadline - time.monotonic()))
    return clients, st_win, win_s, time.monotonic(), eng.stats()

def run_policy(a, v: pareto.Variant, loaded, work: wl.Workload, shared: SharedCompiled,
               plot_path: str) -> dict:
    eng = Engine(engine_config(a, v.policy, **v.overrides), loaded=loaded)
    shared.adopt(eng)
    probe = accounting.Probe(eng)
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
    clients, st_win, win_s, t_end, st = drive_online(eng, work.online, slo, stop, t0,
                                                     a.duration, a.drain)
    stop.set()
    sampler.join()
    lat = list(getattr(getattr(eng.policy, "preemption_log", None), "latencies_s", []) or [])
    ck = eng.checkpointer
    restored = eng.scheduler.counters.restored_tokens if ck is not None else None
    compiles = compiled_count(eng) - compiled0
    eng.shutdown()
    release(eng)
    reqs = [report.request_record(c, t0, t_end, a.ttft, a.tpot) for c in clients]
    conserve = v.policy == "conserve"
    acc = probe.window(t0, win_s)
    out = {
        "online_ttft_p50_s": report.pct([r["ttft_s"] for r in reqs], 50),
        "online_ttft_p99_s": report.pct([r["ttft_s"] for r in reqs], 99),
        "online_tpot_p50_s": report.pct([r["tpot_s"] for r in reqs], 50),
        "online_tpot_p99_s": report.pct([r["tpot_s"] for r in reqs], 99),
        "slo_attainment": sum(r["slo_met"] for r in reqs) / max(1, len(reqs)),
        "offline_tokens_per_s": (st_win.offline_tokens_total - base.offline_tokens_total) / win_s,
        "preemptions": st.preemptions - base.preemptions,
        "preemption_latency_p50_s": report.pct(lat, 50) if conserve else None,
        "preemption_latency_p99_s": report.pct(lat, 99) if conserve else None,
        "evictions": st.evictions - base.evictions,
        "recomputed_tokens": st.recomputed_tokens - base.recomputed_tokens,
        "restored_tokens": restored,
        "online_requests": len(reqs),
        "online_unfinished": sum(not r["finished"] for r in reqs),
        "online_tokens": sum(r["tokens"] for r in reqs),
        "offline_tokens_in_window": st_win.offline_tokens_total - base.offline_tokens_total,
        "offline_waiting_at_window_end": st_win.offline_waiting,
        "preempted_tokens_discarded": st.preempted_tokens_discarded - base.preempted_tokens_discarded,
        "preemptions_resumed": st.preemptions_resumed - base.preemptions_resumed,
        "iterations": st.iterations - base.iterations,
        "window_s": win_s, "drain_s": t_end - t0 - win_s,
        "checkpointer": dataclasses.asdict(ck.counters) if ck is not None else None,
        "compiles_during_run": compiles,
        "preemption_detail": preemption_detail(eng.policy) if conserve else None,
        "offline_committed_tokens_per_s": acc["offline_processed_tokens_per_s"],  # older name
        "isolation": v.isolation if conserve else None,
        "sarathi_token_budget": v.overrides.get("sarathi_token_budget") if v.policy == "sarathi" else None,
        **acc,
    }
    if plot_path:
        report.plot_policy(plot_path, v.label, reqs, samples, a.ttft, a.tpot, a.duration)
    return out


# ---- entry point -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="100 s per policy (40 online requests), offline outputs 32-64")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="comma-separated; also conserve-discard (conserve with preempted "
                        "iterations discarded, not resumed)")
    p.add_argument("--sweep", action="store_true",
                   help="also conserve at isolation 1.05..2 and off, sarathi at 64..512 tokens; "
                        "Pareto plot of online p99 vs offline processed tokens/s")
    p.add_argument("--sweep-isolation", help="comma-separated isolation factors for --sweep "
                   "(default 1.05,1.1,1.2,1.5,2,off)")
    p.add_argument("--sweep-sarathi", help="comma-separated sarathi budgets for --sweep "
                   "(default 64,128,256,512)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--duration", type=float, help="online arrival window per policy (s); 300, quick 100")
    p.add_argument("--drain", type=float, help="max wait for online requests after it; default "
                   "ttft + online_output_max * tpot + 2 (an SLO-meeting request is never cut)")
    p.add_argument("--rate", type=float, default=0.4, help="online requests/s")
    p.add_argument("--ttft", type=float, default=1.0,
                   help="online TTFT objective (s); also the engine's default_ttft_s")
    p.add_argument("--tpot", type=float, default=0.2,
                   help="online TPOT objective (s); also the engine's default_tpot_s")
    p.add_argument("--offline-requests", type=int, help="default 0.6 x duration (saturating)")
    p.add_argument("--offline-prompt", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--offline-output", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--online-prompt-max", type=int, default=512)
    p.add_argument("--online-output-max", type=int, default=64)
    p.add_argument("--kv-seqs", type=int, default=4,
                   help="KV memory = this many full-length contexts (+1 scratch block); "
                        "--num-blocks or --kv-cache-tokens override it")
    p.add_argument("--resume-context", type=int, default=1024)
    # dest is not `warmup`: engine_config_from_args would take it for the engine's knob
    p.add_argument("--warmup", dest="warmup_buckets", choices=["all", "none"], default="all",
                   help="all: the first engine compiles every shape bucket")
    p.add_argument("--json", default="out/bench_coserve.json")
    p.add_argument("--plot-dir", default="out")
    p.add_argument("--pareto-plot", default="out/bench_coserve_pareto.png")
    add_engine_args(p, defaults=ENGINE_DEFAULTS, exclude=NOT_FLAGS)
    return p


def parse_args(argv=None):
    parser = build_parser()
    a = script_io.parse_checked(parser, argv, policy="conserve")
    q = a.quick
    a.duration = a.duration or (100.0 if q else 300.0)
    a.drain = a.drain if a.drain is not None else a.ttft + a.online_output_max * a.tpot + 2.0
    a.offline_requests = a.offline_requests or max(48, round(0.6 * a.duration))
    a.offline_prompt = a.offline_prompt or [512, 1024]
    a.offline_output = a.offline_output or ([32, 64] if q else [64, 128])
    a.policies = [x for x in a.policies.split(",") if x]
    unknown = [x for x in a.policies if x not in VARIANT_NAMES]
    if unknown or not a.policies:
        parser.error(f"--policies: unknown {unknown}; known: {VARIANT_NAMES}")
    if a.sweep_isolation:
        a.sweep_isolation = [parse_isolation(x) for x in a.sweep_isolation.split(",")]
    if a.sweep_sarathi:
        a.sweep_sarathi = [int(x) for x in a.sweep_sarathi.split(",")]
    return a


def aggregate(rs: list) -> dict:
    """Medians over repeats of every numeric field; each repeat kept under `runs`."""
    agg = {k: report.median_of([r[k] for r in rs]) for k in rs[0]
           if k != "checkpointer" and all(isinstance(r[k], (int, float, type(None))) for r in rs)}
    for k in ("restored_tokens", "preemption_latency_p50_s", "preemption_latency_p99_s",
              "isolation", "sarathi_token_budget"):
        if all(r[k] is None for r in rs):
            agg[k] = None
    return {**agg, "runs": rs}


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
    first = Engine(engine_config(a, "conserve"), loaded=loaded)  # profiles or loads latency model
    first.shutdown()  # stop its step loop: this thread now owns runner and checkpointer
    setup = {"model_load_and_latency_model_s": time.perf_counter() - t_start}
    t = time.perf_counter()
    if a.warmup_buckets == "all":
        first.runner.warmup()
        first.checkpointer.transfer.warmup()
    setup["warmup_s"] = time.perf_counter() - t
    shared.adopt(first)
    resume = probes.measure_resume(first, a.resume_context, a.seed, rounds=3)
    sp_cost = probes.measure_safepoint_cost(first, a.seed)
    lm = first.policy.model
    release(first)
    del first
    variants = pareto.variants(a.policies, a.isolation, a.sarathi_token_budget, a.sweep,
                               a.sweep_isolation, a.sweep_sarathi)
    runs: dict = {v.label: [] for v in variants}
    order = []
    for rep in range(a.repeats):
        k = rep % len(variants)  # rotate the run order across repeats
        for v in variants[k:] + variants[:k]:
            order.append(v.label)
            png = os.path.join(a.plot_dir, f"bench_coserve_{v.label}{'' if rep == 0 else f'_r{rep + 1}'}.png") \
                if a.plot_dir else None
            if png:
                os.makedirs(a.plot_dir, exist_ok=True)
            print(f"[{time.perf_counter() - t_start:6.0f}s] repeat {rep + 1}: {v.label}", flush=True)
            runs[v.label].append(run_policy(a, v, loaded, work, shared, png))
    offline_iters = [x for r in runs.get("conserve", []) for x in r["_offline_iter_s"]]
    stops = [x for r in runs.get("conserve", []) for x in r["preemption_detail"]["layer_time_s"]]
    sp = report.safepoint_interval(offline_iters, stops, a.safepoint_interval, loaded.config.num_layers)
    for rs in runs.values():
        for r in rs:
            r.pop("_offline_iter_s")
    policies = {label: aggregate(rs) for label, rs in runs.items()}
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
        "safepoint_cost": sp_cost,
        "setup": setup,
    }
    if a.sweep:
        res["sweep"] = pareto.sweep_points(variants, policies)
        res["sweep_dominance"] = pareto.dominance(res["sweep"])
        if a.pareto_plot:
            os.makedirs(os.path.dirname(os.path.abspath(a.pareto_plot)), exist_ok=True)
            pareto.plot(a.pareto_plot, res["sweep"],
                        f"{os.path.basename(loaded.source.rstrip(')'))}: online p99 vs offline processed tokens/s "
                        f"({res['mode']}, {a.duration:.0f} s, {a.repeats} repeat(s))")
    res["targets"] = report.targets(policies, resume["ratio"], sp_cost)
    res["idle_harvest"] = report.idle_harvest(policies)
    res["setup"]["total_s"] = time.perf_counter() - t_start
    if a.json:
        script_io.write_json(a.json, res, announce=False)
    report.print_table(res)
    print(f"total {res['setup']['total_s']:.0f}s; JSON: {a.json}")
    return res


if __name__ == "__main__":
    main()
