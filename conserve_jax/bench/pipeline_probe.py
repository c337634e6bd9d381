"""Pipeline parallelism across processes, measured (a spike for issue 28's target: 2 x 2
step time within 1.5x of 1 x 4): does splitting the model's layers between two processes,
tensor parallelism inside each, get there where tensor parallelism over gloo does not?

Layouts, all on random:small (4 layers; bench/multihost.py's model, engine sizes and
synthetic plans: decode b1 and b8 at context 256, a 512-token prefill):

- "1x4": one process, 4 CPU devices, the engine's `ModelRunner` at tp 4 (the reference;
  `execute(plan)`, as bench_multihost times it).
- "1x2": the same at tp 2 on 2 devices: the whole model as one stage computes it, so that
  pipeline - 1x2 is the cost of the split itself and 1x2 - 1x4 that of the device count.
- "pp": two processes, 2 CPU devices each, no `jax.distributed`. Process 0 is stage 0
  (embedding, layers 0-1), process 1 stage 1 (layers 2-3, final norm, head, sampler), each
  the engine's runner over its layers at tp 2 on its own devices (bench/pipeline_stage.py).
  A step: stage 0 builds the batch, runs its layers, sends the batch arrays and the hidden
  rows [T, hidden] over TCP; stage 1 runs its layers and the sampler and returns the
  sampled rows. No overlap between the stages (one batch in flight).
- "pp+dist": "pp" with `jax.distributed.initialize` (the engine needs its key-value store;
  the stages find their link through it) and `jax_cpu_collectives_implementation` set to
  None: the local tp 2 collectives stay in-process.
- "pp+gloo": "pp" with `jax.distributed.initialize` and JAX's default CPU collectives
  (gloo in JAX 0.10.2): even the local collectives go over gloo's loopback TCP.
- "2x2 tp4": today's engine, tp 4 over both processes' devices with gloo
  (bench/multihost.py's own worker, run in the same interleaving).

Every run is fresh processes (`python -m conserve_jax.bench.pipeline_probe --worker ...`),
layouts interleaved per repeat. A run first checks the computation: a 48-token prompt then
8 greedy decode steps with 20 logprobs each, on fresh caches (skipped by "2x2 tp4"); the
orchestrator compares each layout's tokens and logprobs with "1x4"'s. Then per shape one
step to compile and `--steps` timed steps: process 0 records each step's wall time (the
batch built to the sampled tokens on the host) and, in a pipeline, its parts
(`pipeline_stage.StepTimes`: stage 0, the send, the wait, stage 1's own time and the rest
of the wait, the transfers). Prints tables of medians over repeats of each run's median
(minimums: the fastest step of any run) and ratios to "1x4", and writes JSON.

    python scripts/bench_pipeline_probe.py                    # 3 repeats x 30 steps
    python scripts/bench_pipeline_probe.py --model random:tiny --steps 3 --repeats 1 \
        --layouts 1x4,pp --json /tmp/pp_smoke.json              # a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

from conserve_jax.bench import script_io
from conserve_jax.bench.multihost import SHAPES, _commit
from conserve_jax.bench.worker_procs import add_worker_args, free_port, run_workers

CHECK_PROMPT, CHECK_DECODES, CHECK_LOGPROBS = 48, 8, 20
LOGPROB_TOLERANCE = 1e-4
LINK_PORT_KEY = "pipeline_probe/link_port"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one run is laid out: `processes` x `devices` CPU devices; `kind` "ref" (one
    runner, tp = all devices), "pp" (two stages, tp = devices each) or "tp" (the engine
    over every process, bench/multihost.py's worker); `collectives`, for "pp": None (no
    jax.distributed), "local" (jax.distributed, in-process collectives) or "gloo"."""

    kind: str
    processes: int
    devices: int
    collectives: Optional[str] = None


LAYOUTS = {"1x4": Layout("ref", 1, 4), "1x2": Layout("ref", 1, 2), "pp": Layout("pp", 2, 2),
           "pp+dist": Layout("pp", 2, 2, "local"), "pp+gloo": Layout("pp", 2, 2, "gloo"),
           "2x2 tp4": Layout("tp", 2, 2)}


# ---- a worker process -------------------------------------------------------------------
def _start_jax(layout: Layout, pid: int, port: int) -> None:
    """Set the CPU device count and, for pp+dist / pp+gloo, join the coordinator."""
    import jax

    jax.config.update("jax_num_cpu_devices", layout.devices)
    if layout.collectives is None:
        return
    jax.config.update("jax_cpu_collectives_implementation",
                      None if layout.collectives == "local" else "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=layout.processes, process_id=pid)


def _engine_config(args, layout: Layout):
    """bench/multihost.py's engine sizes (the KV blocks: `_with_blocks`)."""
    from conserve_jax.engine_args import engine_config

    return engine_config(model=args.model, tp=layout.devices, warmup=False,
                         max_model_len=1024, max_num_seqs=8, max_prefill_tokens=512)


def _with_blocks(config, model_cfg, args):
    """`config` with `--num-blocks`, or by default the KV blocks the 1 x 4 runner gets (its
    memory budget at tp 4), so that every layout has the same block count."""
    from conserve_jax.runtime.model_runner import kv_bytes_per_block
    from conserve_jax.runtime.sharding import kv_repeat_for

    blocks = args.num_blocks
    if not blocks:
        heads = model_cfg.num_kv_heads * kv_repeat_for(4, model_cfg.num_kv_heads,
                                                       model_cfg.num_heads)
        blocks = max(2, config.cache.kv_memory_bytes // kv_bytes_per_block(
            model_cfg, heads, config.cache.block_size, config.dtype))
    return dataclasses.replace(config, cache=dataclasses.replace(config.cache,
                                                                 num_blocks=blocks))


def check_plans(vocab: int, block_size: int, step: Callable) -> dict:
    """Run the check sequence through `step(plan) -> pipeline_stage.Sampled` and return
    its greedy tokens and logprobs (chosen, top ids, top logprobs) per step."""
    import numpy as np

    from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan

    spec = SampleSpec(0.0, 0, 1.0, 0, 0, CHECK_LOGPROBS)
    prompt = [int(t) for t in np.random.default_rng(0).integers(4, vocab, CHECK_PROMPT)]
    table = list(range(1, 1 + -(-(CHECK_PROMPT + CHECK_DECODES) // block_size)))
    out = {"tokens": [], "chosen": [], "top_ids": [], "top_lp": []}
    plan = StepPlan(prefills=[PrefillItem(prompt, 0, table, spec)])
    for i in range(CHECK_DECODES + 1):
        s = step(plan)
        out["tokens"].append(int(s.tokens[0]))
        out["chosen"].append(float(s.chosen[0]))
        out["top_ids"].append(s.top_ids[0].tolist())
        out["top_lp"].append(s.top_lp[0].tolist())
        plan = StepPlan(decodes=[DecodeItem(int(s.tokens[0]), CHECK_PROMPT + i, table, spec)])
    return out


def _sampled_of(result):
    """A runner's `StepResult` as `pipeline_stage.Sampled`."""
    import numpy as np

    from conserve_jax.bench.pipeline_stage import Sampled

    t = result.tokens
    return Sampled(np.array([s.token for s in t], np.int32),
                   np.array([s.logprob for s in t], np.float32),
                   np.array([[i for i, _ in s.top] for s in t], np.int32),
                   np.array([[lp for _, lp in s.top] for s in t], np.float32))


def _time_shapes(runner, steps: int, step: Callable) -> dict:
    """Per shape: one step to compile, `steps` timed; `step(plan)` returns the seconds of
    the step's parts (a dict, maybe empty)."""
    from conserve_jax.scheduling.profiler import synthetic_plan

    out = {}
    for name, (dec, pre, ctx) in SHAPES.items():
        plan, _ = synthetic_plan(runner, dec, pre, ctx)
        step(plan)
        walls, parts = [], {}
        for _ in range(steps):
            t0 = time.perf_counter()
            p = step(plan)
            walls.append(time.perf_counter() - t0)
            for k, v in p.items():
                parts.setdefault(k, []).append(v)
        row = {"step_s": statistics.median(walls), "step_min_s": min(walls), "steps_s": walls}
        for k, vs in parts.items():
            row[f"{k}_s"] = statistics.median(vs)
            row[f"{k}_min_s"] = min(vs)
        out[name] = row
    return out


def _link_port(layout: Layout, args) -> int:
    """The stage link's port: with jax.distributed, stage 0 publishes `--link-port` in
    the coordinator's key-value store and stage 1 reads it there (as the engine's plan
    channel does: it shows the store works in that mode); else the flag's value."""
    if layout.collectives is None:
        return args.link_port
    from jax._src import distributed as jd

    client = jd.global_state.client
    if args.process_id == 0:
        client.key_value_set(LINK_PORT_KEY, str(args.link_port))
        return args.link_port
    return int(client.blocking_key_value_get(LINK_PORT_KEY, int(args.timeout * 1000)))


def _reference_worker(args, layout: Layout) -> dict:
    from conserve_jax.models.loader import load_model
    from conserve_jax.runtime.model_runner import ModelRunner

    config = _engine_config(args, layout)
    loaded = load_model(config.model, seed=config.seed)
    config = _with_blocks(config, loaded.config, args)
    runner = ModelRunner(loaded.config, loaded.params, config)
    check = check_plans(loaded.config.vocab_size, runner.block_size,
                        lambda plan: _sampled_of(runner.execute(plan)))

    def step(plan) -> dict:
        runner.execute(plan)
        return {}

    shapes = _time_shapes(runner, args.steps, step)
    return {"check": check, "shapes": shapes, "num_blocks": runner.num_blocks}


def _pipeline_worker(args, layout: Layout) -> Optional[dict]:
    """Stage `--process-id` of a two-stage pipeline; stage 0 returns the result."""
    from conserve_jax.bench.pipeline_stage import (Stage, StageLink, pipelined_step,
                                                   serve_last_stage)
    from conserve_jax.models.loader import load_model
    from conserve_jax.runtime.batch_arrays import build_batch

    config = _engine_config(args, layout)
    loaded = load_model(config.model, seed=config.seed)
    n = loaded.config.num_layers
    config = _with_blocks(config, loaded.config, args)
    lo, hi = (0, n // 2) if args.process_id == 0 else (n // 2, n)
    stage = Stage(loaded.config, loaded.params, config, lo, hi)
    if args.process_id == 1:
        link = StageLink.connect(_link_port(layout, args), args.timeout)
        serve_last_stage(stage, link)
        link.close()
        return None
    link = StageLink.listen_and_accept(_link_port(layout, args), args.timeout)
    runner = stage.runner

    def num_top(plan) -> int:
        return config.max_logprobs if any(s.num_logprobs for s in plan.sampled_specs()) else 0

    def batch(plan):
        return build_batch(plan, runner.buckets, runner.block_size)

    check = check_plans(loaded.config.vocab_size, runner.block_size,
                        lambda plan: pipelined_step(stage, link, batch(plan), num_top(plan))[0])
    sent = []

    def step(plan) -> dict:
        t0, before = time.perf_counter(), link.sent_bytes
        _, t = pipelined_step(stage, link, batch(plan), num_top(plan), t0)
        sent.append(link.sent_bytes - before)
        return {"first": t.first, "send": t.send, "wait": t.wait, "last": t.last,
                "transfer": t.transfer}

    shapes = _time_shapes(runner, args.steps, step)
    link.send(b"")  # stop
    link.close()
    return {"check": check, "shapes": shapes, "num_blocks": runner.num_blocks,
            "frame_bytes_max": max(sent)}


def worker(args) -> None:
    """One process of one run (module docstring); process 0 writes the JSON."""
    layout = LAYOUTS[args.layout]
    _start_jax(layout, args.process_id, args.port)
    out = (_reference_worker if layout.kind == "ref" else _pipeline_worker)(args, layout)
    if out is not None:
        with open(args.out, "w") as f:
            json.dump(out, f)


# ---- the orchestrator -------------------------------------------------------------------
def _run(args, name: str, tmp: str) -> dict:
    layout = LAYOUTS[name]
    port, link_port = free_port(), free_port()
    out = os.path.join(tmp, f"{name.replace(' ', '_')}.json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if layout.kind == "tp":  # today's engine: bench/multihost.py's 2x2 worker
        cmds = [[sys.executable, "-m", "conserve_jax.bench.multihost", "--worker",
                 "--layout", "2x2", "--process-id", str(pid), "--port", str(port),
                 "--model", args.model, "--steps", str(args.steps), "--out", out]
                for pid in range(layout.processes)]
        shapes = run_workers(cmds, env, args.timeout, out, name)
        return {"check": None, "shapes": shapes}
    cmds = [[sys.executable, "-m", "conserve_jax.bench.pipeline_probe", "--worker",
             "--layout", name, "--process-id", str(pid), "--port", str(port),
             "--link-port", str(link_port), "--model", args.model, "--steps",
             str(args.steps), "--num-blocks", str(args.num_blocks), "--timeout",
             str(args.timeout), "--out", out]
            for pid in range(layout.processes)]
    return run_workers(cmds, env, args.timeout, out, name)


def compare_checks(runs: dict) -> dict:
    """Per layout: whether every run's check tokens equal the first "1x4" run's, and the
    largest |logprob difference| (chosen and top ids' logprobs, where the ids agree)."""
    ref = runs["1x4"][0]["check"]
    out = {}
    for name, rs in runs.items():
        checks = [r["check"] for r in rs if r["check"] is not None]
        if not checks:
            continue
        same, worst = True, 0.0
        for c in checks:
            same &= c["tokens"] == ref["tokens"] and c["top_ids"] == ref["top_ids"]
            pairs = list(zip(c["chosen"], ref["chosen"]))
            for a, b in zip(c["top_lp"], ref["top_lp"]):
                pairs += list(zip(a, b))
            worst = max([worst] + [abs(x - y) for x, y in pairs])
        out[name] = {"same_tokens": same, "max_abs_logprob_diff": worst,
                     "ok": same and worst <= LOGPROB_TOLERANCE}
    return out


def summarize(runs: dict) -> dict:
    """Per shape and layout: medians over runs of each run's medians (every recorded
    part), minimums over runs of each run's minimum, the median of every step of every
    run (`pooled_s`), and the ratios of all three to "1x4"'s."""
    table = {}
    for shape in SHAPES:
        rows = {}
        for name, rs in runs.items():
            keys = [k for k in rs[0]["shapes"][shape] if k.endswith("_s") and k != "steps_s"]
            row = {}
            for k in keys:
                vals = [r["shapes"][shape][k] for r in rs]
                row[k] = min(vals) if k.endswith("_min_s") else statistics.median(vals)
            row["pooled_s"] = statistics.median(
                x for r in rs for x in r["shapes"][shape]["steps_s"])
            rows[name] = row
        ref = rows.get("1x4")
        if ref:
            for row in rows.values():
                row["ratio"] = row["step_s"] / ref["step_s"]
                row["ratio_min"] = row["step_min_s"] / ref["step_min_s"]
                row["ratio_pooled"] = row["pooled_s"] / ref["pooled_s"]
        table[shape] = rows
    return table


def print_table(table: dict, checks: dict) -> None:
    names = list(next(iter(table.values())))
    print(f"{'shape':<12}" + "".join(f"{n + ' ms':>13}{'x':>6}" for n in names))
    for shape, rows in table.items():
        print(f"{shape:<12}" + "".join(
            f"{rows[n]['step_s'] * 1e3:>13.2f}{rows[n].get('ratio', 0):>6.2f}" for n in names))
    print(f"{'min':<12}")
    for shape, rows in table.items():
        print(f"{shape:<12}" + "".join(
            f"{rows[n]['step_min_s'] * 1e3:>13.2f}{rows[n].get('ratio_min', 0):>6.2f}"
            for n in names))
    print(f"{'pooled':<12}")
    for shape, rows in table.items():
        print(f"{shape:<12}" + "".join(
            f"{rows[n]['pooled_s'] * 1e3:>13.2f}{rows[n].get('ratio_pooled', 0):>6.2f}"
            for n in names))
    print("medians over repeats of each run's median step (x: / 1x4); min: fastest step; "
          "pooled: median of every step of every run")
    parts = ("first", "send", "last", "transfer")
    for n in names:
        if "first_s" not in next(iter(table.values()))[n]:
            continue
        print(f"\n{n}: where a step goes (ms, medians)")
        print(f"{'shape':<12}{'step':>8}" + "".join(f"{p:>10}" for p in parts))
        for shape, rows in table.items():
            r = rows[n]
            print(f"{shape:<12}{r['step_s'] * 1e3:>8.2f}"
                  + "".join(f"{r[p + '_s'] * 1e3:>10.3f}" for p in parts))
    print("first: batch + embed + stage 0 layers + hidden to host; send: the frame written; "
          "last: stage 1 (receipt to reply); transfer: the wait minus last")
    for n, c in checks.items():
        print(f"check {n}: tokens {'equal' if c['same_tokens'] else 'DIFFER'}, max |d logprob| "
              f"{c['max_abs_logprob_diff']:.2e} ({'ok' if c['ok'] else 'FAILED'})")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:small")
    p.add_argument("--steps", type=int, default=30, help="timed steps per shape and run")
    p.add_argument("--repeats", type=int, default=3, help="runs per layout, interleaved")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"comma-separated, from {', '.join(LAYOUTS)} (1x4 always runs)")
    p.add_argument("--num-blocks", type=int, default=0,
                   help="KV blocks per runner (0: the 1x4 runner's default, for every layout)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--json", default="results/bench_pipeline_probe.json")
    p.add_argument("--layout", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    p.add_argument("--link-port", type=int, default=0, help=argparse.SUPPRESS)
    add_worker_args(p)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    names = ["1x4"] + [n for n in args.layouts.split(",") if n and n != "1x4"]
    unknown = set(names) - set(LAYOUTS)
    if unknown:
        p.error(f"unknown layouts {sorted(unknown)}")
    runs = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n in names:
                print(f"repeat {r + 1}/{args.repeats}: {n}", flush=True)
                t0 = time.perf_counter()
                runs[n].append(_run(args, n, tmp))
                print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    table, checks = summarize(runs), compare_checks(runs)
    print_table(table, checks)
    result = {"model": args.model, "steps": args.steps, "repeats": args.repeats,
              "shapes": {k: dict(zip(("decodes", "prefill", "context"), v))
                         for k, v in SHAPES.items()},
              "layouts": {n: dataclasses.asdict(LAYOUTS[n]) for n in names},
              "machine": {"cpus": os.cpu_count(),
                          "processor": platform.processor() or platform.machine()},
              "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "table": table, "checks": checks, "runs": runs}
    script_io.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
