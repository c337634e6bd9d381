"""Per-call latency of one cross-device collective (issue 28): a jitted psum (and an
all-gather) of a decode-sized array over every device of a run, for process layouts
`PxD` (P processes x D CPU devices each; P > 1 uses JAX's gloo collectives over
127.0.0.1), optionally with XLA flags (`--xla-flags`) and a CPU affinity (`--cpus`) per
process.

The orchestrator (`main`) launches, per layout and repeat (layouts interleaved), the
processes of one run as `python -m conserve_jax.bench.collectives --worker ...`. Every
process builds the same jitted calls and runs them `--calls` times after one call to
compile; process 0 writes per op the median and minimum wall time of one call, and its
CPU time over wall time for all calls (cores kept busy: above 1 means threads spin) (each call
waited for with block_until_ready). Ops: "psum" (the compiler's all-reduce, what tensor
parallelism's o/down projections get), "all_gather" (a sharded array made replicated),
"gather sum" (all-gather the partials, sum them), "a2a sum" (every device sends its
partial to every other one in one all-to-all, then sums); with P > 1 and D > 1, on a 2-D mesh
(proc x local), "hier psum" and "hier gather" (the same over the devices of one process,
then across processes: runtime/sharding.py's `row_parallel_for` uses "hier gather") and
"local psum" (within each process only; with gloo still a TCP exchange). Prints a table of
medians over repeats and writes JSON.

    python -m conserve_jax.bench.collectives --layouts 1x4,2x2,2x1 --repeats 3
    python -m conserve_jax.bench.collectives --layouts 2x2 --xla-flags \
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from conserve_jax.bench import script_io
from conserve_jax.bench.worker_procs import add_worker_args, free_port, run_workers


def _layout(name: str) -> tuple[int, int]:
    p, d = name.split("x")
    return int(p), int(d)


def worker(args) -> None:
    """One process of one run: time each op (module docstring)."""
    import jax

    processes, devices = _layout(args.layout)
    jax.config.update("jax_num_cpu_devices", devices)
    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=processes, process_id=args.process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = jax.device_count()
    rows, cols = args.rows, args.cols
    mesh = jax.make_mesh((n,), ("tp",), devices=jax.devices())
    x_sh = NamedSharding(mesh, P("tp"))
    host = np.ones((n * rows, cols), np.float32)
    x = jax.make_array_from_callback(host.shape, x_sh, lambda idx: host[idx])

    def psum(a):
        return jax.lax.psum(a, "tp")

    ops = {"psum": jax.jit(jax.shard_map(psum, mesh=mesh, in_specs=P("tp"), out_specs=P())),
           "all_gather": jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))}
    ops["gather sum"] = jax.jit(jax.shard_map(
        lambda a: jax.lax.all_gather(a, "tp").sum(0), mesh=mesh, in_specs=P("tp"),
        out_specs=P(), check_vma=False))

    def a2a_sum(a):  # every device sends its whole partial to every other one: one round
        tiled = jnp.broadcast_to(a[None], (n,) + a.shape)
        return jax.lax.all_to_all(tiled, "tp", 0, 0, tiled=True).sum(0)

    ops["a2a sum"] = jax.jit(jax.shard_map(a2a_sum, mesh=mesh, in_specs=P("tp"),
                                           out_specs=P(), check_vma=False))
    inputs = {"psum": x, "all_gather": x, "gather sum": x, "a2a sum": x}
    if processes > 1 and devices > 1:
        mesh2 = jax.make_mesh((processes, devices), ("proc", "local"), devices=jax.devices())
        x2 = jax.make_array_from_callback(host.shape, NamedSharding(mesh2, P(("proc", "local"))),
                                          lambda idx: host[idx])

        def hier(a):
            return jax.lax.psum(jax.lax.psum(a, "local"), "proc")

        ops["hier psum"] = jax.jit(jax.shard_map(hier, mesh=mesh2,
                                                 in_specs=P(("proc", "local")), out_specs=P()))
        def hier_gather(a):  # one hop each: gather the partials, sum them in order
            a = jax.lax.all_gather(a, "local").sum(0)
            return jax.lax.all_gather(a, "proc").sum(0)

        ops["hier gather"] = jax.jit(jax.shard_map(
            hier_gather, mesh=mesh2, in_specs=P(("proc", "local")), out_specs=P(),
            check_vma=False))
        inputs["hier gather"] = x2
        ops["local psum"] = jax.jit(jax.shard_map(
            lambda a: jax.lax.psum(a, "local"), mesh=mesh2, in_specs=P(("proc", "local")),
            out_specs=P("proc")))
        inputs["hier psum"] = inputs["local psum"] = x2
    out = {}
    for name, fn in ops.items():
        fn(inputs[name]).block_until_ready()  # compile
        times, cpu0, wall0 = [], time.process_time(), time.perf_counter()
        for _ in range(args.calls):
            t0 = time.perf_counter()
            fn(inputs[name]).block_until_ready()
            times.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        out[name] = {"median_s": statistics.median(times), "min_s": min(times), "cpu": cpu}
        if name == "psum" and args.hlo and args.process_id == 0:
            out[name]["hlo_collectives"] = [
                ln.strip()[:160] for ln in fn.lower(inputs[name]).compile().as_text().splitlines()
                if "all-reduce" in ln or "all-gather" in ln]
    if args.process_id == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)


def _run(args, layout: str, tmp: str) -> dict:
    processes, _ = _layout(layout)
    port, out = free_port(), os.path.join(tmp, f"{layout}.json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    cpus = args.cpus.split(";") if args.cpus else None
    cmds = []
    for pid in range(processes):
        cmd = [sys.executable, "-m", "conserve_jax.bench.collectives", "--worker", "--layout",
               layout, "--process-id", str(pid), "--port", str(port), "--calls",
               str(args.calls), "--rows", str(args.rows), "--cols", str(args.cols),
               "--out", out] + (["--hlo"] if args.hlo else [])
        if cpus:
            cmd = ["taskset", "-c", cpus[pid % len(cpus)]] + cmd
        cmds.append(cmd)
    return run_workers(cmds, env, args.timeout, out, layout)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="1x4,2x2,2x1,1x2")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", type=int, default=8, help="rows per device (decode batch)")
    p.add_argument("--cols", type=int, default=256, help="hidden size")
    p.add_argument("--xla-flags", default="", help="XLA_FLAGS for every process")
    p.add_argument("--cpus", default="", help="taskset CPU lists per process, ';'-separated")
    p.add_argument("--hlo", action="store_true", help="record the compiled psum's collectives")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", default="")
    p.add_argument("--layout", help=argparse.SUPPRESS)
    add_worker_args(p)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    layouts = args.layouts.split(",")
    runs = {name: [] for name in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for layout in layouts:
                runs[layout].append(_run(args, layout, tmp))
    print(f"array {args.rows}x{args.cols} float32 per device; XLA_FLAGS={args.xla_flags!r} "
          f"cpus={args.cpus!r}; ms per call, median over repeats of each run's median (min)")
    table = {}
    for layout, rs in runs.items():
        for op in rs[0]:
            med = statistics.median(r[op]["median_s"] for r in rs)
            low = min(r[op]["min_s"] for r in rs)
            cpu = statistics.median(r[op]["cpu"] for r in rs)
            table[f"{layout} {op}"] = {"median_s": med, "min_s": low, "cpu": cpu}
            print(f"{layout:<5} {op:<11} {med * 1e3:8.3f} ({low * 1e3:.3f})  process 0 "
                  f"busy {cpu:.2f} cores")
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
              "table": table, "runs": runs, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.json:
        script_io.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
