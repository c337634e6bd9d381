"""Multi-process step time (issue 28): 2 processes x 2 CPU devices against 1 process x 4
devices, tp 4 both, on the same model and synthetic plans (the profiler's): decode at batch
1 and 8 (context 256) and a 512-token prefill, and the cost of sending each step's plan to
the followers.

The orchestrator (`main`, run by scripts/bench_multihost.py) launches, per layout and
repeat (layouts interleaved: 1x4, 2x2, 1x4, 2x2, ...), the processes of one run as
`python -m conserve_jax.bench.multihost --worker ...` on 127.0.0.1 with a free port. Process
0 of a run builds a `ModelRunner` (in a 2x2 run its plan channel sends every plan),
executes each shape once to compile it, then `--steps` times, and writes per shape the
median and minimum step time and, in a 2x2 run, the time the plan channel's sends took
inside each step (median, minimum) and the bytes sent per step; the other process follows
(`run_follower`) until process 0 stops it. Prints a table of medians over repeats (and
minimums over every step of every repeat) with the same-run ratios 2x2 / 1x4 and send /
step, and writes JSON (with the machine, commit and date).

    python scripts/bench_multihost.py                 # random:small, 5 repeats x 30 steps
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
LAYOUTS = {"1x4": (1, 4), "2x2": (2, 2)}  # name -> (processes, CPU devices each)


class _TimedSends:
    """Wraps the leader's plan channel: seconds spent in its sends (one thread)."""

    def __init__(self, channel) -> None:
        self._channel, self.seconds = channel, 0.0

    def __getattr__(self, name):
        fn = getattr(self._channel, name)
        if not name.startswith("send_"):
            return fn

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def _engine_config(args, processes: int, devices: int, pid: int, port: int):
    from conserve_jax.engine_args import engine_config

    multi = processes > 1
    return engine_config(model=args.model, tp=4, warmup=False, max_model_len=1024,
                         max_num_seqs=8, max_prefill_tokens=512, cpu_devices=devices,
                         num_processes=processes, process_id=pid,
                         coordinator_address=f"127.0.0.1:{port}" if multi else None)


def worker(args) -> None:
    """One process of one run (module docstring)."""
    from conserve_jax.runtime import distributed
    from conserve_jax.runtime.follower import run_follower

    processes, devices = LAYOUTS[args.layout]
    config = _engine_config(args, processes, devices, args.process_id, args.port)
    if distributed.is_follower(config):
        run_follower(config)
        return
    config = distributed.start(config)
    from conserve_jax.models.loader import load_model
    from conserve_jax.runtime.model_runner import ModelRunner
    from conserve_jax.scheduling.profiler import synthetic_plan

    loaded = load_model(config.model, seed=config.seed)
    runner = ModelRunner(loaded.config, loaded.params, config)
    sends = None
    if runner.channel is not None:
        sends = runner.channel = _TimedSends(runner.channel)
    out = {}
    for name, (dec, pre, ctx) in SHAPES.items():
        plan, _ = synthetic_plan(runner, dec, pre, ctx)
        runner.execute(plan)  # compile
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
    processes, _ = LAYOUTS[layout]
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
    p.add_argument("--layout", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    add_worker_args(p)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    runs = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for layout in LAYOUTS:
                print(f"repeat {r + 1}/{args.repeats}: {layout}", flush=True)
                runs[layout].append(_run(args, layout, tmp))
    table = summarize(runs)
    print_table(table)
    result = {"model": args.model, "steps": args.steps, "repeats": args.repeats,
              "shapes": {k: dict(zip(("decodes", "prefill", "context"), v))
                         for k, v in SHAPES.items()},
              "layouts": {k: dict(zip(("processes", "devices_each"), v))
                          for k, v in LAYOUTS.items()},
              "machine": {"cpus": os.cpu_count(),
                          "processor": platform.processor() or platform.machine()},
              "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "table": table, "runs": runs}
    script_io.write_json(args.json, result)
    return result


def summarize(runs: dict) -> dict:
    """Per shape: medians over repeats of each run's median, minimums over every step of
    every run, the 2x2 / 1x4 ratios of both, and the plan send's cost in a 2x2 step."""
    table = {}
    for shape in SHAPES:
        one, two = runs["1x4"], runs["2x2"]
        med = lambda rs, key: statistics.median(r[shape][key] for r in rs)
        low = lambda rs, key: min(r[shape][key] for r in rs)
        row = {"1x4_step_s": med(one, "step_s"), "2x2_step_s": med(two, "step_s"),
               "1x4_step_min_s": low(one, "step_min_s"), "2x2_step_min_s": low(two, "step_min_s"),
               "send_s": med(two, "send_s"), "send_min_s": low(two, "send_min_s"),
               "send_bytes": med(two, "send_bytes")}
        row["ratio"] = row["2x2_step_s"] / row["1x4_step_s"]
        row["ratio_min"] = row["2x2_step_min_s"] / row["1x4_step_min_s"]
        row["send_share"] = row["send_s"] / row["2x2_step_s"]
        table[shape] = row
    return table


def print_table(table: dict) -> None:
    print(f"{'shape':<12} {'1x4 ms':>8} {'2x2 ms':>8} {'2x2/1x4':>8} {'1x4 min':>8} "
          f"{'2x2 min':>8} {'min ratio':>9} {'send ms':>8} {'send/step':>9} {'bytes':>7}")
    for shape, r in table.items():
        print(f"{shape:<12} {r['1x4_step_s'] * 1e3:>8.2f} {r['2x2_step_s'] * 1e3:>8.2f} "
              f"{r['ratio']:>8.2f} {r['1x4_step_min_s'] * 1e3:>8.2f} "
              f"{r['2x2_step_min_s'] * 1e3:>8.2f} {r['ratio_min']:>9.2f} "
              f"{r['send_s'] * 1e3:>8.3f} {r['send_share']:>9.3f} {r['send_bytes']:>7.0f}")
    print("medians over repeats of each run's median step; min: the fastest step of any run; "
          "send: the plan channel's sends inside one 2x2 step")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    main()
