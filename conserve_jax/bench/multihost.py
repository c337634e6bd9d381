"""Multi-process step time (issue 28): 2 processes x 2 CPU devices against 1 process x 4
devices on the same model and synthetic plans (the profiler's): decode at batch 1 and 8
(context 256) and a 512-token prefill, and the cost of sending each step to the other
process. Layouts: "1x4" (tp 4 in one process, the reference), "2x2" (tp 4 over both
processes' devices, gloo collectives, the plan channel) and "2x2pp" (`--pp 2`: a pipeline
stage of 2 layers per process at tp 2 over its own devices, the hidden rows sent to stage 1
and the sampled rows back, runtime/pipeline_*.py; its KV block count is 1x4's).

The orchestrator (`main`, run by scripts/bench_multihost.py) launches, per layout and
repeat (layouts interleaved: 1x4, 2x2, 2x2pp, 1x4, ...), the processes of one run as
`python -m conserve_jax.bench.multihost --worker ...` on 127.0.0.1 with a free port. Process
0 of a run builds the engine's runner (`pipeline_leader.make_runner`: in a 2x2 run its plan
channel sends every plan; in a 2x2pp run it is stage 0), executes each shape once to
compile it, then `--steps` times, and writes per shape the median and minimum step time
(the plan built to the sampled tokens on the host) and the time the sends to the other
process took inside each step (median, minimum) and the bytes sent per step; the other
process follows (`follow_if_follower`) until process 0 stops it. Prints a table per layout
of medians over repeats (and minimums over every step of every repeat) with the same-run
ratios to 1x4 and send / step, and writes JSON (with the machine, commit and date).

    python scripts/bench_multihost.py                 # random:small, 5 repeats x 30 steps
    python scripts/bench_multihost.py --layouts 1x4,2x2pp   # the reference and pp only
    python scripts/bench_multihost.py --model random:tiny --steps 3 --repeats 1 \
        --json /tmp/bench_multihost_smoke.json          # a smoke run, under a minute
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from conserve_jax.bench import script_io
from conserve_jax.bench.worker_procs import add_worker_args, free_port, run_workers

SHAPES = {"decode b1": (1, 0, 256), "decode b8": (8, 0, 256), "prefill 512": (0, 512, 512)}
# name -> (processes, CPU devices each, pipeline stages): "2x2" tensor parallel over both
# processes (tp 4, gloo); "2x2pp" a pipeline stage per process (pp 2, tp 2 inside each)
LAYOUTS = {"1x4": (1, 4, 1), "2x2": (2, 2, 1), "2x2pp": (2, 2, 2)}


class _TimedSends:
    """Wraps the leader's plan channel (or a pipeline's link to stage 1): seconds spent in
    its sends (one thread)."""

    def __init__(self, channel) -> None:
        self._channel, self.seconds = channel, 0.0

    def __getattr__(self, name):
        fn = getattr(self._channel, name)
        if not name.startswith("send"):
            return fn

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def _engine_config(args, processes: int, devices: int, pp: int, pid: int, port: int):
    from conserve_jax.engine_args import engine_config

    multi = processes > 1
    kw = {}
    if pp > 1:  # tp inside each stage; the 1x4 runner's KV block count (memory alike)
        kw = dict(tp=devices, pp=pp, num_blocks=_blocks_at_tp4(args.model))
    return engine_config(**{**dict(
        model=args.model, tp=4, warmup=False, max_model_len=1024, max_num_seqs=8,
        max_prefill_tokens=512, cpu_devices=devices, num_processes=processes,
        process_id=pid, coordinator_address=f"127.0.0.1:{port}" if multi else None), **kw})


def _blocks_at_tp4(model: str) -> int:
    """The KV blocks a 1x4 runner of `model` allocates from the default memory budget."""
    from conserve_jax.config import CacheConfig
    from conserve_jax.models.loader import load_model_config
    from conserve_jax.runtime.model_runner import kv_bytes_per_block
    from conserve_jax.runtime.sharding import kv_repeat_for

    cfg, cache = load_model_config(model), CacheConfig()
    heads = cfg.num_kv_heads * kv_repeat_for(4, cfg.num_kv_heads, cfg.num_heads)
    return max(2, cache.kv_memory_bytes // kv_bytes_per_block(cfg, heads, cache.block_size,
                                                              "float32"))


def worker(args) -> None:
    """One process of one run (module docstring)."""
    from conserve_jax.runtime import distributed
    from conserve_jax.runtime.follower import follow_if_follower

    processes, devices, pp = LAYOUTS[args.layout]
    config = _engine_config(args, processes, devices, pp, args.process_id, args.port)
    if follow_if_follower(config) is not None:  # a follower or a later pipeline stage
        return
    config = distributed.start(config)
    from conserve_jax.models.loader import load_model
    from conserve_jax.runtime.pipeline_leader import make_runner
    from conserve_jax.scheduling.profiler import synthetic_plan

    loaded = load_model(config.model, seed=config.seed)
    runner = make_runner(loaded.config, loaded.params, config)
    sends = None
    if getattr(runner, "channel", None) is not None:
        sends = runner.channel = _TimedSends(runner.channel)
    out = {}
    for name, (dec, pre, ctx) in SHAPES.items():
        plan, _ = synthetic_plan(runner, dec, pre, ctx)
        runner.execute(plan)  # compile (a pipeline: the first step also links the stages)
        if pp > 1 and sends is None:  # time the frame to stage 1 (the reply: in the step)
            sends = runner.ring.outbound = _TimedSends(runner.ring.outbound)
        steps, sent, nbytes = [], [], []
        for _ in range(args.steps):
            before = sends.seconds if sends else 0.0
            bytes_before = sends.sent_bytes if sends else 0
            t0 = time.perf_counter()
            runner.execute(plan)
            steps.append(time.perf_counter() - t0)
            sent.append((sends.seconds if sends else 0.0) - before)
            nbytes.append((sends.sent_bytes if sends else 0) - bytes_before)
        out[name] = {"step_s": statistics.median(steps), "step_min_s": min(steps),
                     "send_s": statistics.median(sent), "send_min_s": min(sent),
                     "send_bytes": statistics.median(nbytes), "steps_s": steps}
    runner.close()
    with open(args.out, "w") as f:
        json.dump(out, f)


def _run(args, layout: str, tmp: str) -> dict:
    processes = LAYOUTS[layout][0]
    port, out = free_port(), os.path.join(tmp, f"{layout}.json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmds = [[sys.executable, "-m", "conserve_jax.bench.multihost", "--worker",
             "--layout", layout, "--process-id", str(pid), "--port", str(port),
             "--model", args.model, "--steps", str(args.steps), "--out", out]
            for pid in range(processes)]
    return run_workers(cmds, env, args.timeout, out, layout)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:small")
    p.add_argument("--steps", type=int, default=30, help="timed steps per shape and run")
    p.add_argument("--repeats", type=int, default=5, help="runs per layout, interleaved")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--json", default="results/bench_multihost.json")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="layouts to run, interleaved (1x4 is the reference; always run)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    add_worker_args(p)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    layouts = ["1x4"] + [n for n in args.layouts.split(",") if n in LAYOUTS and n != "1x4"]
    runs = {name: [] for name in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for layout in layouts:
                print(f"repeat {r + 1}/{args.repeats}: {layout}", flush=True)
                runs[layout].append(_run(args, layout, tmp))
    table = summarize(runs)
    print_table(table)
    result = {"model": args.model, "steps": args.steps, "repeats": args.repeats,
              "shapes": {k: dict(zip(("decodes", "prefill", "context"), v))
                         for k, v in SHAPES.items()},
              "layouts": {k: dict(zip(("processes", "devices_each", "pp"), LAYOUTS[k]))
                          for k in layouts},
              "machine": {"cpus": os.cpu_count(),
                          "processor": platform.processor() or platform.machine()},
              "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "table": table, "runs": runs}
    script_io.write_json(args.json, result)
    return result


def summarize(runs: dict) -> dict:
    """Per shape and layout L other than 1x4: medians over repeats of each run's median
    (`L_step_s`), minimums over every step of every run (`L_step_min_s`), the L / 1x4
    ratios of both (`L_ratio`, `L_ratio_min`; for 2x2 also `ratio`, `ratio_min`), and the
    send's cost in one L step (2x2: the plan channel's sends; 2x2pp: the frame to stage 1,
    the hidden rows and batch arrays)."""
    table = {}
    for shape in SHAPES:
        med = lambda rs, key: statistics.median(r[shape][key] for r in rs)
        low = lambda rs, key: min(r[shape][key] for r in rs)
        row = {"1x4_step_s": med(runs["1x4"], "step_s"),
               "1x4_step_min_s": low(runs["1x4"], "step_min_s")}
        for name, rs in runs.items():
            if name == "1x4":
                continue
            row[f"{name}_step_s"], row[f"{name}_step_min_s"] = med(rs, "step_s"), low(
                rs, "step_min_s")
            row[f"{name}_ratio"] = row[f"{name}_step_s"] / row["1x4_step_s"]
            row[f"{name}_ratio_min"] = row[f"{name}_step_min_s"] / row["1x4_step_min_s"]
            row[f"{name}_send_s"], row[f"{name}_send_min_s"] = med(rs, "send_s"), low(
                rs, "send_min_s")
            row[f"{name}_send_bytes"] = med(rs, "send_bytes")
            row[f"{name}_send_share"] = row[f"{name}_send_s"] / row[f"{name}_step_s"]
        if "2x2" in runs:  # the names earlier results used
            row.update(ratio=row["2x2_ratio"], ratio_min=row["2x2_ratio_min"],
                       send_s=row["2x2_send_s"], send_min_s=row["2x2_send_min_s"],
                       send_bytes=row["2x2_send_bytes"], send_share=row["2x2_send_share"])
        table[shape] = row
    return table


def print_table(table: dict) -> None:
    names = sorted({k[:-len("_ratio")] for r in table.values() for k in r
                    if k.endswith("_ratio") and k != "ratio"})
    for name in names:
        print(f"{'shape':<12} {'1x4 ms':>8} {name + ' ms':>10} {'ratio':>6} {'1x4 min':>8} "
              f"{name + ' min':>10} {'min ratio':>9} {'send ms':>8} {'send/step':>9} "
              f"{'bytes':>7}")
        for shape, r in table.items():
            print(f"{shape:<12} {r['1x4_step_s'] * 1e3:>8.2f} {r[name + '_step_s'] * 1e3:>10.2f} "
                  f"{r[name + '_ratio']:>6.2f} {r['1x4_step_min_s'] * 1e3:>8.2f} "
                  f"{r[name + '_step_min_s'] * 1e3:>10.2f} {r[name + '_ratio_min']:>9.2f} "
                  f"{r[name + '_send_s'] * 1e3:>8.3f} {r[name + '_send_share']:>9.3f} "
                  f"{r[name + '_send_bytes']:>7.0f}")
    print("medians over repeats of each run's median step; min: the fastest step of any run; "
          "send: 2x2 the plan channel's sends, 2x2pp the frame to stage 1, inside one step")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    main()
