"""One real replica co-serving on sqlite and on PostgreSQL: is the batch store on the step's path?

Issue 26's target: "with one real replica on PostgreSQL, co-serving numbers within noise of
sqlite". The in-process co-serving benchmark (coserve.py) runs engines without any store,
so this one measures real servers: for each run, in an interleaved order of sides (default
sqlite, postgres, postgres, sqlite), it starts `conserve-jax serve --model M --port 0` with a
fresh `--data-dir` (and, for postgres, `--batch-store` naming a database of its own, created
for the run and dropped after it: no run claims an earlier run's batches), waits until it
listens, then runs `conserve-jax loadtest` as a subprocess against it: the Azure
conversation trace as online load (--trace-window 9 trace seconds at --rate-scale 0.075,
i.e. 120 s of arrivals, token counts x 0.125; SLOs TTFT 2 s, TPOT 0.25 s) for --duration s,
plus --offline-requests offline requests submitted as a batch at the start (loadtest's
defaults: prompts of 128 tokens, 64 output tokens; unfinished ones cancelled at the end).
Then it stops the server (SIGTERM, and waits for it).

Reported per side (median, min and max over its runs) from each run's loadtest report:
online TTFT p50/p99, TPOT p99, SLO attainment, online requests done, offline items done,
offline tokens/s and when the offline batch was all done (if it was; a batch that finishes
inside the window makes items done and tokens/s equal on both sides); and for each metric the ratio of the medians, postgres / sqlite, beside a
crude noise band (the larger within-side spread, (max - min) / median, of the two sides).
PostgreSQL is a throwaway local cluster (`conserve_server.batch.pg_local.PgCluster`), or the
server --pg-url names (its user must be allowed to CREATE DATABASE).

    python scripts/bench_store_coserve.py --quick                       # 4 x (start + 30 s + drain)
    python scripts/bench_store_coserve.py --json out/bench_store_coserve.json
    python scripts/bench_store_coserve.py --model mock --quick -- --mock-token-delay 0.005

Flags after `--` go to every `serve`. Each run's server log and loadtest report are kept in
`<json without .json>_runs/`. Runs alone: the server and the load tester are the only
processes that should be busy. Imports no JAX (everything heavy is in the subprocesses).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Optional
from urllib.parse import urlsplit

from conserve_jax.bench.script_io import write_json

SIDES = ("sqlite", "postgres")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACE = os.path.join(REPO, "data", "traces", "azure_llm_2023_conv.csv")

# (key, label, how to read it from a loadtest report)
METRICS = (
    ("ttft_p50_s", "online TTFT p50 (s)", lambda r: r["online"]["ttft_s"]["p50"]),
    ("ttft_p99_s", "online TTFT p99 (s)", lambda r: r["online"]["ttft_s"]["p99"]),
    ("tpot_p99_s", "online TPOT p99 (s)", lambda r: r["online"]["tpot_s"]["p99"]),
    ("slo_attainment", "SLO attainment", lambda r: r["online"]["slo"]["attainment"]),
    ("online_done", "online requests done", lambda r: r["online"]["completed"]),
    ("offline_done", "offline items done", lambda r: (r["offline"] or {}).get("completed_at_window_end")),
    ("offline_tokens_per_s", "offline tokens/s", lambda r: (r["offline"] or {}).get("tokens_per_s")),
    # None when the batch had not finished by the window's end (then done/tokens tell)
    ("offline_all_done_s", "offline all done at (s)",
     lambda r: (r["offline"] or {}).get("all_finished_at_s")),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="serve --model (default: default; "
                   "mock: the test engine)")
    p.add_argument("--duration", type=float, help="seconds of online arrivals per run "
                   "(loadtest --duration; default 120, --quick 30)")
    p.add_argument("--offline-requests", type=int, help="offline requests per run, one batch "
                   "submitted at the start (default 24, --quick 8)")
    p.add_argument("--quick", action="store_true", help="--duration 30 --offline-requests 8")
    p.add_argument("--order", default="sqlite,postgres,postgres,sqlite",
                   help="the runs, comma-separated sides (sqlite, postgres) in the order run")
    p.add_argument("--pg-url", help="a PostgreSQL server to use, as postgresql://user@host:port/db "
                   "(each postgres run gets a new database on it; default: start a throwaway "
                   "local cluster)")
    p.add_argument("--trace", default=TRACE, help="loadtest --trace (default: the Azure "
                   "conversation trace in data/traces)")
    p.add_argument("--trace-window", type=float, default=9.0, help="loadtest --trace-window")
    p.add_argument("--rate-scale", type=float, default=0.075, help="loadtest --rate-scale")
    p.add_argument("--token-scale", type=float, default=0.125, help="loadtest --token-scale")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="loadtest --slo-ttft (s)")
    p.add_argument("--slo-tpot", type=float, default=0.25, help="loadtest --slo-tpot (s)")
    p.add_argument("--start-timeout", type=float, default=1800.0,
                   help="seconds a server may take to listen (model load and warm-up)")
    p.add_argument("--stop-timeout", type=float, default=120.0,
                   help="seconds a server may take to stop after SIGTERM before it is killed")
    p.add_argument("--json", default="out/bench_store_coserve.json", help="output file")
    p.add_argument("serve_args", nargs="*", help="extra `serve` flags (after --)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    a.duration = a.duration if a.duration is not None else (30.0 if a.quick else 120.0)
    a.offline_requests = (a.offline_requests if a.offline_requests is not None
                          else (8 if a.quick else 24))
    a.sides = [s.strip() for s in a.order.split(",") if s.strip()]
    bad = sorted(set(a.sides) - set(SIDES))
    if bad or not a.sides:
        p.error(f"--order: sides are {', '.join(SIDES)}; got {a.order!r}")
    if a.duration <= 0 or a.offline_requests < 0:
        p.error("--duration must be > 0 and --offline-requests >= 0")
    return a


class Databases:
    """A new PostgreSQL database per postgres run, on the --pg-url server or on a throwaway
    local cluster started on first use; `drop` removes one, `close` stops the cluster."""

    def __init__(self, pg_url: Optional[str]) -> None:
        self.base = pg_url
        self.cluster = None

    def _admin(self):
        import psycopg

        if self.base is None:
            from conserve_server.batch.pg_local import PgCluster
            self.cluster = PgCluster()
            self.base = self.cluster.url()
        return psycopg.connect(self.base, autocommit=True)

    def new(self) -> str:
        name = "store_coserve_" + uuid.uuid4().hex[:12]
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return urlsplit(self.base)._replace(path="/" + name).geturl()

    def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        try:
            with self._admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as e:  # a leftover database is harmless; say so and go on
            print(f"could not drop database {name}: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()
            self.cluster = None


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _wait_listening(proc: subprocess.Popen, log_path: str, timeout: float) -> str:
    """The server's address from its `listening on HOST:PORT` line (stdout, into the log)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(log_path, errors="replace") as f:
            for line in f:
                if line.startswith("listening on "):
                    return line.split("listening on ", 1)[1].strip()
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening:\n"
                               f"{_tail(log_path)}")
        time.sleep(0.2)
    raise RuntimeError(f"server did not listen within {timeout:.0f} s:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """SIGTERM and wait; killed after `timeout` s (then None)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def serve_command(a: argparse.Namespace, data_dir: str, store_url: Optional[str]) -> list[str]:
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--model", a.model,
           "--port", "0", "--http-port", "0", "--data-dir", data_dir]
    if store_url:
        cmd += ["--batch-store", store_url]
    return cmd + list(a.serve_args)


def loadtest_command(a: argparse.Namespace, target: str, out: str) -> list[str]:
    return [sys.executable, "-m", "conserve_jax.entrypoints.cli", "loadtest", "--target", target,
            "--trace", a.trace, "--trace-window", str(a.trace_window),
            "--rate-scale", str(a.rate_scale), "--token-scale", str(a.token_scale),
            "--duration", str(a.duration), "--offline-requests", str(a.offline_requests),
            "--slo-ttft", str(a.slo_ttft), "--slo-tpot", str(a.slo_tpot),
            "--json", out, "--no-progress"]


def run_once(a: argparse.Namespace, i: int, side: str, dbs: Databases, runs_dir: str,
             scratch: str) -> dict:
    """One server, one load test; the run's summary (metrics from the loadtest report)."""
    from conserve_server.batch.base import redact_url

    data_dir = tempfile.mkdtemp(prefix=f"{i}-{side}-", dir=scratch)
    url = dbs.new() if side == "postgres" else None
    log_path = os.path.join(runs_dir, f"{i}_{side}.server.log")
    out = os.path.join(runs_dir, f"{i}_{side}.loadtest.json")
    if os.path.exists(out):
        os.remove(out)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve_command(a, data_dir, url), stdout=log,
                                stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        target = _wait_listening(proc, log_path, a.start_timeout)
        listen_s = time.perf_counter() - t0
        print(f"run {i} ({side}): listening on {target} after {listen_s:.1f} s; load for "
              f"{a.duration:.0f} s", flush=True)
        lt = subprocess.run(loadtest_command(a, target, out), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            timeout=a.duration + 900)
        with open(os.path.join(runs_dir, f"{i}_{side}.loadtest.txt"), "w") as f:
            f.write(lt.stdout)
    finally:
        stop_rc = _stop(proc, a.stop_timeout)
        if url:
            dbs.drop(url)
        shutil.rmtree(data_dir, ignore_errors=True)
    if not os.path.exists(out):
        raise RuntimeError(f"run {i} ({side}): loadtest exited {lt.returncode} without a "
                           f"report:\n{lt.stdout[-3000:]}")
    with open(out) as f:
        report = json.load(f)
    return {"run": i, "side": side, "store": redact_url(url) if url else "sqlite (--data-dir)",
            "listen_s": round(listen_s, 2), "loadtest_rc": lt.returncode, "server_stop_rc": stop_rc,
            "online_failed": report["online"]["failed"],
            "online_issued": report["online"]["issued"],
            "offline_submit_errors": (report["offline"] or {}).get("submit_errors", {}),
            "preemptions": report["server"]["preemptions"],
            "loadtest_json": out, "server_log": log_path,
            "metrics": {k: get(report) for k, _, get in METRICS}}


def _stats(values: list) -> dict:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "runs": values}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": values}


def summarize(runs: list[dict]) -> dict:
    """Per side and metric: median/min/max over the runs; per metric: postgres / sqlite of
    the medians, the noise band (larger within-side (max - min) / median) and whether the
    ratio's distance from 1 is inside it (None when a side is missing)."""
    sides = {s: {k: _stats([r["metrics"][k] for r in runs if r["side"] == s])
                 for k, _, _ in METRICS}
             for s in SIDES if any(r["side"] == s for r in runs)}
    ratio, noise, within = {}, {}, {}
    for k, _, _ in METRICS:
        ratio[k] = noise[k] = within[k] = None
        if len(sides) < 2:
            continue
        sq, pg = sides["sqlite"][k], sides["postgres"][k]
        if sq["median"] and pg["median"] is not None:
            ratio[k] = pg["median"] / sq["median"]
        spreads = [(st["max"] - st["min"]) / st["median"] for st in (sq, pg) if st["median"]]
        if spreads:
            noise[k] = max(spreads)
        if ratio[k] is not None and noise[k] is not None:
            within[k] = abs(ratio[k] - 1.0) <= noise[k]
    return {"sides": sides, "ratio_postgres_over_sqlite": ratio, "noise": noise,
            "within_noise": within}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or (float(v).is_integer() and abs(v) >= 1):
        return f"{v:.0f}"
    return f"{v:.3f}"


def format_table(summary: dict) -> str:
    sides = summary["sides"]
    head = f"{'metric':<24}" + "".join(f"{s + ' med (min)':>22}" for s in sides)
    if len(sides) == 2:
        head += f"{'pg/sqlite':>11}{'noise':>8}"
    lines = [head]
    for k, label, _ in METRICS:
        row = f"{label:<24}"
        for s in sides:
            st = sides[s][k]
            row += f"{_fmt(st['median']) + ' (' + _fmt(st['min']) + ')':>22}"
        if len(sides) == 2:
            r, n = summary["ratio_postgres_over_sqlite"][k], summary["noise"][k]
            row += f"{'-' if r is None else f'{r:.3f}':>11}{'-' if n is None else f'{n:.3f}':>8}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    stem = a.json[:-5] if a.json.endswith(".json") else a.json
    runs_dir = stem + "_runs"
    os.makedirs(runs_dir, exist_ok=True)
    dbs = Databases(a.pg_url)
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="store-coserve-") as scratch:
            for i, side in enumerate(a.sides):
                runs.append(run_once(a, i, side, dbs, runs_dir, scratch))
                m = runs[-1]["metrics"]
                print(f"run {i} ({side}): " + ", ".join(f"{k} {_fmt(m[k])}" for k, _, _ in METRICS),
                      flush=True)
    finally:
        dbs.close()
    summary = summarize(runs)
    print(format_table(summary))
    write_json(a.json, {
        "model": a.model, "order": a.sides, "duration_s": a.duration,
        "offline_requests": a.offline_requests, "serve_args": list(a.serve_args),
        "loadtest": {"trace": os.path.relpath(a.trace, REPO) if a.trace.startswith(REPO) else a.trace,
                     "trace_window": a.trace_window, "rate_scale": a.rate_scale,
                     "token_scale": a.token_scale, "slo_ttft_s": a.slo_ttft, "slo_tpot_s": a.slo_tpot},
        "postgres": "--pg-url" if a.pg_url else "throwaway local cluster (PgCluster)",
        **summary, "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "note": "one real server per run (fresh --data-dir; postgres: a database of its own), "
                "conserve-jax loadtest in its own process; medians over each side's runs; "
                "noise = the larger within-side (max - min) / median"})
    failed = [r["run"] for r in runs if r["loadtest_rc"] != 0]
    if failed:
        print(f"loadtest failed (exit != 0) in runs {failed}", file=sys.stderr)
    return 1 if failed else 0
