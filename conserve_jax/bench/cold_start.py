"""A fresh server under a steady online load: does its first minute pay for compiles?

Starts `conserve-jax serve` (default flags, so warm-up on) in a fresh HOME with a fresh
compilation cache, measures how long it takes to listen, then sends a steady Poisson
stream of online requests of every shape the issue names (single prompts of 5-1,100
tokens, bursts of 2/4/8 short requests) for `--duration-s`, and reports time to first
token per window of `--window-s` (a minute by default): p50/p99 of each, and the first
window's p99 over the last window's.
Also the process's memory mappings after warm-up and at the end (from /proc).

    python scripts/bench_cold_start.py --duration-s 600 --rate 0.5 --json out/cold_start.json

Runs alone (the server is the only other process); the client sends from a thread per
request, so client overhead stays out of the server's step loop.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from conserve_jax.bench.script_io import write_json


def _spawn(home: str, extra: list[str]):
    env = {**os.environ, "HOME": home}
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--port", "0",
           "--http-port", "0", "--data-dir", os.path.join(home, "data"),
           "--compilation-cache-dir", os.path.join(home, "xla"), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


def _maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


def _shapes(rng, longest: int) -> list[int]:
    """Prompt lengths of one arrival: a single prompt of 5-`longest` tokens (log-uniform),
    or a burst of 2, 4 or 8 short ones."""
    if rng.random() < 0.25:
        return [int(rng.integers(5, 40))] * int(rng.choice([2, 4, 8]))
    return [int(np.exp(rng.uniform(np.log(5), np.log(longest))))]


def run(args) -> dict:
    from conserve_jax.client import Client

    home = tempfile.mkdtemp(prefix="conserve-cold-")
    t0 = time.perf_counter()
    proc = _spawn(home, args.serve_args)
    target = None
    try:
        for line in proc.stdout:
            if line.startswith("listening on "):
                target = line.split()[-1]
                break
        if target is None:
            raise RuntimeError(f"server exited with {proc.wait()}")
        start_s = time.perf_counter() - t0
        maps_ready = _maps(proc.pid)
        print(f"listening after {start_s:.1f} s, {maps_ready} memory mappings", flush=True)
        rng = np.random.default_rng(args.seed)
        ttfts: list[tuple[float, float, int]] = []  # (sent, ttft, prompt tokens)
        errors: list[str] = []
        lock = threading.Lock()
        client = Client(target)

        def one(ids: list[int], sent: float) -> None:
            try:
                for _chunk in client.generate(token_ids=ids, max_tokens=args.max_tokens,
                                              temperature=0.0, timeout=300):
                    with lock:
                        ttfts.append((sent, time.perf_counter() - sent, len(ids)))
                    break
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(str(e)[:200])

        threads = []
        t_start = time.perf_counter()
        t_next = t_start
        while t_next - t_start < args.duration_s:
            time.sleep(max(0.0, t_next - time.perf_counter()))
            for n in _shapes(rng, args.longest_prompt):
                ids = [int(t) for t in rng.integers(10, args.max_token_id, n)]
                th = threading.Thread(target=one, args=(ids, time.perf_counter()), daemon=True)
                th.start()
                threads.append(th)
            t_next += rng.exponential(1.0 / args.rate)
        for th in threads:
            th.join(timeout=300)
        maps_end = _maps(proc.pid)
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    per_min = []
    w = args.window_s
    for m in range(int(-(-args.duration_s // w))):
        xs = sorted(t for s, t, _ in ttfts if m * w <= s - t_start < (m + 1) * w)
        if xs:
            per_min.append({"window": m + 1, "requests": len(xs),
                            "ttft_p50_s": statistics.median(xs),
                            "ttft_p99_s": float(np.percentile(xs, 99))})
    ratio = per_min[0]["ttft_p99_s"] / per_min[-1]["ttft_p99_s"] if len(per_min) > 1 else None
    return {"serve_args": args.serve_args, "rate": args.rate, "duration_s": args.duration_s,
            "window_s": w,
            "start_to_listening_s": start_s, "maps_when_listening": maps_ready,
            "maps_at_end": maps_end, "per_minute": per_min,
            "first_over_last_window_p99": ratio, "errors": errors[:20],
            "requests": len(ttfts), "failed": len(errors)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=600.0, help="length of the load")
    p.add_argument("--window-s", type=float, default=60.0, help="TTFT reported per window")
    p.add_argument("--rate", type=float, default=0.5, help="arrivals per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--longest-prompt", type=int, default=1100)
    p.add_argument("--max-token-id", type=int, default=20000, help="below the vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="out/cold_start.json")
    p.add_argument("serve_args", nargs="*", help="extra `serve` flags (after --)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    for m in res["per_minute"]:
        print(f"window {m['window']:2d}: {m['requests']:4d} requests  TTFT p50 "
              f"{m['ttft_p50_s']:.3f} s  p99 {m['ttft_p99_s']:.3f} s")
    r = res["first_over_last_window_p99"]
    print(f"first window's p99 / last window's: {r:.2f}" if r else "too short for a ratio")
    print(f"memory mappings: {res['maps_when_listening']} when listening, {res['maps_at_end']} "
          f"at the end; {res['failed']} failed requests")
    write_json(args.json, res)
    return 0
