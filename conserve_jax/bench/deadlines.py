"""Offline deadlines benchmark (issue 27): `bench_coserve`'s online load plus three batch
jobs with completion windows, under three deadline policies, in one process.

Run as scripts/bench_deadlines.py. Per variant a fresh engine (the first engine's compiled
functions are reused, as in `coserve`) and an in-process `ServerApp` on it (gRPC on a free
loopback port, sqlite store in a temporary directory), so batches go through the real
admission, store, runner, deadline tracker and scheduler:

- t = 0: the online load starts (the Azure trace window of `coserve_workload`, submitted
  straight to the engine as in `coserve`, for --warm-s + --duration seconds) and a warm-up
  batch (no deadline) gives the harvest meter history;
- t = --warm-s: the warm-up batch is cancelled and three jobs are submitted over gRPC
  (in --submit-order, --stagger-s apart) with deadlines --windows x --duration
  from their own submission (tight, medium, loose; sizes --job-items, prompt
  and output lengths as coserve's offline requests); every variant accepts them
  (--accept-infeasible), so a job the estimator thinks cannot fit still runs, and the JSON
  says what admission would have answered;
- the run ends when every job has ended (completed, or expired at its deadline).

Variants: online-only (the reference: no batches at all), today (claim by deadline alone:
--no-deadline-order), isolate (at-risk jobs' items first; isolation never relaxed), borrow
(at-risk items may use online iterations' budget up to --isolation-max).

Reported per variant and job: state, finish time and slack, missed, the estimate at submit
and its error against the actual duration ((estimated - actual) / actual), the same for the
current estimate `SETTLE_S` after the last submission ("settled": the estimator's error once
it sees every job, apart from jobs that came after this one), items with exactly
one record (results streamed back and counted), the jobs submitted after it whose work went
before or beside its own (`overtaken_by`: under isolate and borrow those due before it, as
the engine serves deadlines in order; under today every later one, as their items run in
the engine beside its own whatever their deadlines), the harvest rate its life actually
had and the error the estimate would have had at that rate (what the model gets wrong,
apart from the online load to come).
Per variant: online p99 TTFT/TPOT over all requests and over those during which no job
was at risk (sampled every 0.5 s), their ratio to online-only's, offline processed
tokens/s over the online window, borrowed seconds, the tracker's harvest rate at submit,
and what the estimator worked from (harvest and prompt rates, median, lead and served-first
paces, offline duty, pace samples, latency correction) at each job's submission and every second
after the first (`estimator_timeline`: per job its estimate, at risk, urgent, hopeless,
items done). Targets: the issue's (`deadlines_report`, which also computes the per-job rates,
errors at them and overtaking, and prints the table). Sizes and windows are guesses for
this machine: read the estimates at submit and adjust --job-items / --windows so that one
job is infeasible without borrowing.

    python scripts/bench_deadlines.py --quick     # 4 variants x ~2 min
    python scripts/bench_deadlines.py             # 4 variants x ~6 min
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from typing import Optional

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from conserve_jax.bench import coserve, coserve_report as report, coserve_workload as wl
from conserve_jax.bench import deadlines_report as rep, script_io
from conserve_jax.bench.deadlines_report import JOBS
from conserve_jax.client import Client
from conserve_jax.engine.engine import Engine
from conserve_jax.engine_api import SLO
from conserve_jax.engine_args import add_engine_args
from conserve_jax.models.loader import load_model
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2_grpc as pb_grpc
from conserve_server.app import ServerApp
from conserve_server.config import DeadlineOptions, ServerConfig

VARIANTS = ("online-only", "today", "isolate", "borrow")
SETTLE_S = 5.0  # the settled estimate is read this long after the last submission


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="90 s jobs' phase after an 18 s warm-up, shorter outputs")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--duration", type=float, help="seconds of online arrivals after the "
                   "warm-up, the jobs' phase (s); 240, quick 90")
    p.add_argument("--rate", type=float, default=0.4, help="online requests/s")
    p.add_argument("--ttft", type=float, default=1.0, help="online TTFT objective (s)")
    p.add_argument("--tpot", type=float, default=0.2, help="online TPOT objective (s)")
    p.add_argument("--warm-s", type=float, help="online load and harvest history before the "
                   "jobs (s), also the harvest window; default the server's harvest window "
                   "(120), quick 0.2 x duration")
    p.add_argument("--windows", default="0.3,0.6,1.2",
                   help="tight,medium,loose completion windows as fractions of --duration")
    p.add_argument("--job-items", default="12,16,24", help="items of tight,medium,loose")
    p.add_argument("--submit-order", default="tight,medium,loose",
                   help="the order the jobs are submitted in (a permutation of tight,medium,loose)")
    p.add_argument("--stagger-s", type=float, default=0.0,
                   help="seconds between two submissions (each window counts from its own "
                        "submission): a loose job submitted first fills the claim window and "
                        "the engine's queue before a tight one arrives")
    p.add_argument("--offline-prompt", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--offline-output", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--kv-seqs", type=int, default=4, help="KV memory in full contexts")
    # dest is not `warmup`: engine_config_from_args would take it for the engine's knob
    p.add_argument("--warmup", dest="warmup_buckets", choices=["all", "none"], default="all",
                   help="all: the first engine compiles every shape bucket")
    p.add_argument("--json", default="out/bench_deadlines.json")
    add_engine_args(p, defaults=coserve.ENGINE_DEFAULTS, exclude=coserve.NOT_FLAGS)
    return p


def parse_args(argv=None):
    parser = build_parser()
    a = script_io.parse_checked(parser, argv, policy="conserve")
    a.duration = a.duration or (90.0 if a.quick else 240.0)
    if a.warm_s is None:  # full: the window the server measures over by default
        a.warm_s = 0.2 * a.duration if a.quick else DeadlineOptions().harvest_window_s
    a.online_s = a.warm_s + a.duration
    a.offline_prompt = a.offline_prompt or [512, 1024]
    a.offline_output = a.offline_output or ([32, 64] if a.quick else [64, 128])
    a.drain = a.ttft + 64 * a.tpot + 2.0  # as coserve: an SLO-meeting request is never cut
    a.variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad or not a.variants:
        parser.error(f"--variants: unknown {bad}; known: {list(VARIANTS)}")
    try:
        a.windows = [float(x) for x in a.windows.split(",")]
        a.job_items = [int(x) for x in a.job_items.split(",")]
    except ValueError:
        parser.error("--windows and --job-items take three comma-separated numbers")
    if len(a.windows) != 3 or len(a.job_items) != 3 or min(a.windows) <= 0 or min(a.job_items) < 1:
        parser.error("--windows and --job-items take three positive numbers (tight,medium,loose)")
    a.submit_order = [x.strip() for x in a.submit_order.split(",")]
    if sorted(a.submit_order) != sorted(JOBS):
        parser.error(f"--submit-order must be a permutation of {','.join(JOBS)}, got {a.submit_order}")
    if a.stagger_s < 0:
        parser.error("--stagger-s must be >= 0")
    return a


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _secs(ts) -> Optional[float]:
    return ts.ToNanoseconds() / 1e9 if ts.seconds or ts.nanos else None


def _job_requests(work: wl.Workload, a) -> dict:
    """Each job's items: coserve's offline requests, cut into the three jobs in order."""
    out, k = {}, 0
    for name, n in zip(JOBS, a.job_items):
        reqs = []
        for r in work.offline[k:k + n]:
            reqs.append(pb.GenerateRequest(
                request_id=r.request_id, token_ids=pb.TokenIds(ids=r.prompt),
                sampling=pb.SamplingParams(max_tokens=r.output_len, temperature=0.0,
                                           ignore_eos=True),
                expected_output_tokens=r.output_len))
        out[name] = reqs
        k += n
    return out


def run_variant(a, variant: str, loaded, work: wl.Workload, shared, ref) -> dict:
    borrow = variant == "borrow"
    cfg = coserve.engine_config(a, "conserve", deadline_policy="borrow" if borrow else "isolate")
    eng = Engine(cfg, loaded=loaded)
    shared.adopt(eng)
    slo, stop = SLO(a.ttft, a.tpot), threading.Event()
    tmp = tempfile.TemporaryDirectory(prefix="bench_deadlines_")
    app = None
    if variant != "online-only":
        opts = DeadlineOptions(accept_infeasible=True, deadline_order=variant != "today",
                               harvest_window_s=max(10.0, a.warm_s),
                               harvest_min_history_s=min(5.0, a.warm_s / 2))
        app = ServerApp(eng, ServerConfig(port=0, data_dir=tmp.name, deadlines=opts),
                        engine_config=cfg)
        app.start()
    base = eng.stats()
    t0 = time.monotonic()
    box: dict = {}
    driver = threading.Thread(target=lambda: box.update(r=coserve.drive_online(
        eng, work.online, slo, stop, t0, a.online_s, a.drain)), daemon=True)
    driver.start()
    jobs: dict = {}
    spans: list = []  # (start, end) monotonic times while some job was at risk
    rate, timeline = None, []
    if app is not None:
        jobs, spans, rate, timeline = _run_jobs(a, app, work, t0,
                                                deadline_order=variant != "today")
    driver.join()
    stop.set()
    clients, st_win, win_s, t_end, st = box["r"]
    reqs = [report.request_record(c, t0, t_end, a.ttft, a.tpot) for c in clients]
    for r, c in zip(reqs, clients):
        r["start"] = c.submit_t if c.submit_t is not None else t0
        r["end"] = c.finish_t if c.finish_t is not None else t_end
    processed = ((st_win.offline_tokens_total - base.offline_tokens_total)
                 + (st_win.offline_prefill_tokens_total - base.offline_prefill_tokens_total))
    out = {"variant": variant, **rep.online_stats(reqs, spans, ref),
           "offline_processed_tokens_per_s": processed / win_s if variant != "online-only" else None,
           "borrowed_s": eng.stats().deadline_borrowed_s, "jobs": jobs,
           "at_risk_seconds": sum(e - s for s, e in spans), "harvest_rate_at_submit": rate,
           "estimator_timeline": timeline}
    if app is not None:
        d = _tracker_outcomes(app.deadlines, len(jobs))
        out["tracker"] = {"met": d.met, "missed": d.missed, "refused": d.refused,
                          "accepted_infeasible": d.accepted_infeasible,
                          "estimate_errors": d.estimate_errors}
        app.stop(drain_timeout_s=0.0)
    else:
        eng.shutdown()
    coserve.release(eng)
    tmp.cleanup()
    return out


def _tracker_outcomes(tracker, jobs: int, wait_s: float = 5.0):
    """The tracker's statistics once it has counted the outcome of every one of `jobs`
    ended jobs, or after `wait_s`: it counts a batch on its first deadline check after the
    batch ended, and a job that ends after the online load does is read here within a few
    milliseconds of its end."""
    give_up = time.monotonic() + wait_s
    while True:
        d = tracker.snapshot()
        if sum(d.met.values()) + sum(d.missed.values()) >= jobs or time.monotonic() >= give_up:
            return d
        time.sleep(0.1)


def _inputs(tracker) -> dict:
    """What the deadline estimator works from now (the tracker's own reads)."""
    paces = tracker.paces()
    return {"harvest_rate": tracker.rate(), "prompt_rate": tracker.prompt_rate(),
            "tpot_median_s": paces.median, "tpot_lead_s": paces.lead,
            "tpot_served_s": paces.served, "offline_duty": tracker.meter.duty(),
            "pace_samples": tracker.pace.count(),
            "latency_correction": tracker.engine.stats().latency_correction}


def _look(tracker, ids: dict, t_first: float, infos: list) -> dict:
    """One row of the estimator's timeline: its inputs and, per job, the estimated seconds
    to go, at risk / urgent / hopeless, items done."""
    now, urgent = time.time(), set(tracker.urgent_batches())
    st = tracker.engine.stats()
    row = {"t": round(now - t_first, 2), **_inputs(tracker), "iterations": st.iterations,
           "offline_running": st.offline_running, "offline_waiting": st.offline_waiting,
           "offline_tokens": st.offline_tokens_total,
           "offline_prefill_tokens": st.offline_prefill_tokens_total,
           # cumulative seconds of timed iterations with offline work, and of those with
           # offline tokens and no offline prompt (the prompt rate's and the duty's inputs)
           "offline_busy_s": round(st.offline_busy_s, 3),
           "offline_free_s": round(st.offline_free_s, 3)}
    for (name, bid), info in zip(ids.items(), infos):
        e = tracker.estimate_of(bid)
        row[name] = {"to_go_s": None if e is None or e.finish_at is None else
                     round(e.finish_at - now, 2),
                     "at_risk": bool(e and e.at_risk), "hopeless": bool(e and e.hopeless),
                     "urgent": bid in urgent, "done": info.done,
                     "own_pace_s": tracker.pace.own(bid, None)}
    return row


def _run_jobs(a, app: ServerApp, work: wl.Workload, t0: float, deadline_order: bool = True):
    """Warm-up batch, then the three jobs; wait until every job ended. Returns the jobs'
    records (with the estimator's inputs at each submission), the (monotonic) spans during
    which some job was at risk, the harvest rate when the jobs were submitted and the
    estimator's timeline (`_look`, every second from the first submission)."""
    target = f"127.0.0.1:{app.port}"
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.CoServeStub(channel)
    client = Client(target)
    warm = [pb.GenerateRequest(request_id=f"warm-{r.request_id}",
                               token_ids=pb.TokenIds(ids=r.prompt),
                               sampling=pb.SamplingParams(max_tokens=r.output_len, temperature=0.0,
                                                          ignore_eos=True))
            for r in work.offline[sum(a.job_items):]]
    warm_id = stub.SubmitBatch(pb.SubmitBatchRequest(requests=warm)).batch_id if warm else None
    time.sleep(max(0.0, t0 + a.warm_s - time.monotonic()))
    if warm_id:
        stub.CancelBatch(pb.CancelBatchRequest(batch_id=warm_id))
    rate_at_submit = app.deadlines.snapshot().harvest_rate
    ids, submitted, inputs = {}, {}, {}
    windows, requests = dict(zip(JOBS, a.windows)), _job_requests(work, a)
    for k, name in enumerate(a.submit_order):
        if k:
            time.sleep(a.stagger_s)
        frac, reqs = windows[name], requests[name]
        now = time.time()
        resp = stub.SubmitBatch(pb.SubmitBatchRequest(requests=reqs,
                                                      deadline=_ts(now + frac * a.duration)))
        ids[name], submitted[name] = resp.batch_id, (now, _secs(resp.estimated_completion_at))
        inputs[name] = _inputs(app.deadlines)
    t_first, timeline, next_look = submitted[a.submit_order[0]][0], [], 0.0
    spans, risk_start = [], None
    settle_at, settled = time.monotonic() + SETTLE_S, {}
    give_up = time.monotonic() + max(a.windows) * a.duration + 60.0
    while time.monotonic() < give_up:
        if not settled and time.monotonic() >= settle_at:
            for name, bid in ids.items():
                b = stub.GetBatch(pb.GetBatchRequest(batch_id=bid))
                settled[name] = (_secs(b.estimated_completion_at)
                                 if b.HasField("estimated_completion_at") else None)
        risky = app.deadlines.at_risk()
        m = time.monotonic()
        if risky and risk_start is None:
            risk_start = m
        elif not risky and risk_start is not None:
            spans.append((risk_start, m))
            risk_start = None
        infos = [stub.GetBatch(pb.GetBatchRequest(batch_id=b)) for b in ids.values()]
        if m >= next_look:
            timeline.append(_look(app.deadlines, ids, t_first, infos))
            next_look = m + 1.0
        if all(i.state not in (pb.BATCH_STATE_QUEUED, pb.BATCH_STATE_RUNNING)
               and i.done == i.total for i in infos):
            break
        time.sleep(0.5)
    if risk_start is not None:
        spans.append((risk_start, time.monotonic()))
    jobs = {}
    for name, bid in ids.items():
        b = stub.GetBatch(pb.GetBatchRequest(batch_id=bid))
        sub_t, est = submitted[name]
        fin, dl = _secs(b.finished_at), _secs(b.deadline)
        records = [r.index for r in client.batch_results(bid, timeout=30)]
        completed = b.state == pb.BATCH_STATE_COMPLETED
        jobs[name] = {
            "batch_id": bid, "items": b.total, "window_s": dl - sub_t,
            "state": pb.BatchState.Name(b.state).removeprefix("BATCH_STATE_").lower(),
            "missed": not completed or fin is None or fin > dl,
            "finished_after_s": fin - sub_t if fin is not None else None,
            "slack_at_finish_s": dl - fin if fin is not None else None,
            "failed_items": b.failed,
            "estimate_at_submit_s": est - sub_t if est is not None else None,
            "predicted_feasible": est is not None and est <= dl,
            "estimate_error": ((est - sub_t) - (fin - sub_t)) / (fin - sub_t)
            if completed and est is not None and fin is not None and fin > sub_t else None,
            # the current estimate SETTLE_S after the last submission: what the estimator
            # says once it sees every job (and their priorities), apart from what arrived
            # after this job was submitted
            "estimate_settled_s": settled[name] - sub_t
            if settled.get(name) is not None else None,
            "estimate_error_settled": (settled[name] - fin) / (fin - sub_t)
            if completed and settled.get(name) is not None and fin is not None
            and fin > sub_t else None,
            "one_record_per_item": sorted(records) == list(range(b.total)),
            "estimator_at_submit": inputs[name],
            "overtaken_by": rep.overtaken_by(
                name, {o: submitted[o][0] for o in ids},
                {o: submitted[o][0] + windows[o] * a.duration for o in ids}, deadline_order),
            # offline work units a second between its submission and its end (expiry
            # included), beside estimator_at_submit's harvest_rate
            "harvest_rate_realized": rep.realized_rate(
                timeline, app.deadlines.cost, sub_t - t_first,
                (fin if fin is not None else time.time()) - t_first),
        }
        jobs[name]["estimate_error_at_realized_rate"] = rep.at_realized_rate(jobs[name])
    client.close()
    channel.close()
    return jobs, spans, rate_at_submit, timeline


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_start = time.perf_counter()
    loaded = load_model(a.model, seed=a.seed)
    n_off = sum(a.job_items) + max(a.job_items)  # the jobs, then the warm-up batch
    spec = wl.WorkloadSpec(duration_s=a.online_s, rate=a.rate, offline_requests=n_off,
                           offline_prompt_min=a.offline_prompt[0],
                           offline_prompt_max=a.offline_prompt[1],
                           offline_output_min=a.offline_output[0],
                           offline_output_max=a.offline_output[1], seed=a.seed)
    work = wl.build(spec, loaded.config.vocab_size, a.max_model_len)
    shared = coserve.SharedCompiled()
    first = Engine(coserve.engine_config(a, "conserve"), loaded=loaded)  # latency model
    first.shutdown()
    if a.warmup_buckets == "all":
        first.runner.warmup()
        first.checkpointer.transfer.warmup()
    shared.adopt(first)
    coserve.release(first)
    del first
    order = ["online-only"] + [v for v in a.variants if v != "online-only"] \
        if "online-only" in a.variants else a.variants
    V: dict = {}
    for v in order:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {v}", flush=True)
        V[v] = run_variant(a, v, loaded, work, shared, V.get("online-only"))
    res = {"model": loaded.source, "duration_s": a.duration, "warm_s": a.warm_s,
           "online_s": a.online_s,
           "windows": dict(zip(JOBS, a.windows)), "job_items": dict(zip(JOBS, a.job_items)),
           "submit_order": a.submit_order, "stagger_s": a.stagger_s,
           "slo": {"ttft_s": a.ttft, "tpot_s": a.tpot}, "workload": work.describe(),
           "machine": {"cpus": os.cpu_count()}, "variants": V, "targets": rep.targets(V),
           "total_s": time.perf_counter() - t_start}
    if a.json:
        script_io.write_json(a.json, res, announce=False)
    rep.print_table(V)
    print(f"total {res['total_s']:.0f}s; JSON: {a.json}")
    return res


if __name__ == "__main__":
    main()
