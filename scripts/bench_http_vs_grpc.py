"""What the OpenAI-compatible HTTP front costs next to gRPC, measured with the load tester.

Starts one `conserve-jax serve --model mock --http-port free` subprocess (MockEngine with a
per-step delay, so latencies are dominated by the serving path, not a model), then replays
the same synthetic online workload through `conserve-jax loadtest --backend grpc` and
`--backend openai` (each run a subprocess), interleaved over `--repeats` rounds with the
order alternating. Prints per-backend medians and minimums of TTFT p50/p99, ITL p50 and
E2E p50, and their openai/grpc ratios (same run), and writes the JSON to `--out`.

    python scripts/bench_http_vs_grpc.py --repeats 3 --out out/bench_http_vs_grpc.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

from conserve_jax.bench import script_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = (("ttft_s", "p50"), ("ttft_s", "p99"), ("itl_s", "p50"), ("e2e_s", "p50"))


def spawn(data_dir: str, token_delay: float) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--model", "mock", "--port", "0",
           "--http-port", "free", "--data-dir", data_dir, "--mock-token-delay", str(token_delay)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ports = {}
    for line in proc.stdout:
        name, _, addr = line.strip().partition(" on ")
        ports[name] = addr
        if name == "listening":
            break
    return proc, ports


def loadtest(backend: str, target: str, args, out: str) -> dict:
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "loadtest", "--backend", backend,
           "--target", target, "--rate", str(args.rate), "--num-requests", str(args.num_requests),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--max-context", "512", "--seed", "1", "--no-progress", "--json", out,
           # ids 100..125 are the mock's bytes 'a'..'z': every token is one character of
           # text, so the OpenAI stream (which carries text, not ids) has one chunk per token
           "--prompt-token-range", "100", "126"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    with open(out) as f:
        return json.load(f)["online"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--token-delay", type=float, default=0.005, help="mock engine seconds per step")
    p.add_argument("--out", default="out/bench_http_vs_grpc.json")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"grpc": [], "openai": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, ports = spawn(os.path.join(tmp, "data"), args.token_delay)
        try:
            targets = {"grpc": ports["listening"], "openai": ports["http"]}
            for r in range(args.repeats):
                order = ("grpc", "openai") if r % 2 == 0 else ("openai", "grpc")
                for backend in order:
                    on = loadtest(backend, targets[backend], args, os.path.join(tmp, "r.json"))
                    row = {f"{k}_{q}": on[k][q] for k, q in KEYS}
                    row.update(completed=on["completed"], failed=on["failed"])
                    runs[backend].append(row)
                    print(f"round {r} {backend:6s} " + " ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                             if isinstance(v, float)), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    summary = {}
    for backend, rows in runs.items():
        summary[backend] = {key: {"median": statistics.median(r[key] for r in rows),
                                  "min": min(r[key] for r in rows)}
                            for key in rows[0] if key not in ("completed", "failed")}
        summary[backend]["failed"] = sum(r["failed"] for r in rows)
    ratios = {key: summary["openai"][key]["median"] / summary["grpc"][key]["median"]
              for key in summary["grpc"] if key != "failed"}
    print(f"\n{'metric':14s} {'grpc med':>10s} {'openai med':>11s} {'grpc min':>10s} "
          f"{'openai min':>11s} {'ratio(med)':>11s}")
    for key, ratio in ratios.items():
        g, o = summary["grpc"][key], summary["openai"][key]
        print(f"{key:14s} {g['median']:10.4f} {o['median']:11.4f} {g['min']:10.4f} {o['min']:11.4f} "
              f"{ratio:11.2f}")
    script_io.write_json(args.out, {"config": vars(args), "runs": runs, "summary": summary,
                                   "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
