"""`conserve-jax demo`: the main job end to end on the embedded default model.

Starts `conserve-jax serve` as a child process on a free loopback port, then, as a client:
streams a chat answer to the terminal (online), submits a small offline batch and collects
its results, prints the server's stats, and stops the server with SIGTERM (clean exit).
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--data-dir", default=None, help="batch database dir (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=600.0)


def _start_server(model: str, data_dir: str, timeout: float):
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--model", model, "--port", "0",
           "--http-port", "0", "--data-dir", data_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []

    def pump():
        for line in proc.stdout:
            if line.startswith("listening on") and not found:
                found.append(line.split()[-1])
            elif not found:
                sys.stderr.write("  server: " + line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start in time")
        time.sleep(0.1)
    return proc, found[0]


def run(args) -> int:
    from conserve_jax.entrypoints.client import Client

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="conserve-demo-")
    print(f"starting the server on model {args.model!r} (first start profiles the latency "
          f"model and compiles; later starts reuse the caches)...", file=sys.stderr)
    t0 = time.monotonic()
    proc, target = _start_server(args.model, data_dir, args.startup_timeout)
    print(f"server up at {target} after {time.monotonic() - t0:.1f} s\n", file=sys.stderr)
    try:
        with Client(target) as client:
            print(f"online (streamed chat)\n  user: {args.question}\n  assistant: ", end="")
            usage = None
            for chunk in client.generate(messages=[{"role": "user", "content": args.question}],
                                         max_tokens=64, temperature=0.0):
                print(chunk.text, end="", flush=True)
                usage = chunk.usage or usage
            print()
            if usage is not None:
                print(f"  [{usage.completion_tokens} tokens, TTFT {usage.ttft_s:.2f} s, "
                      f"{usage.tpot_s * 1000:.0f} ms per token]")
            questions = ["Name a primary colour.", "What is 2 + 2?", "Say hello in French."]
            batch_id = client.submit_batch([
                {"messages": [{"role": "user", "content": q}], "max_tokens": 24,
                 "temperature": 0.0} for q in questions])
            print(f"\noffline batch {batch_id} submitted ({len(questions)} requests)")
            ended = ("completed", "failed", "cancelled", "expired")
            while client.get_batch(batch_id).state not in ended:
                time.sleep(0.2)
            for r in client.batch_results(batch_id):
                print(f"  [{r.index}] {questions[r.index]} -> {r.text.strip()!r} ({r.finish_reason})")
            print("\nserver stats:")
            for k, v in client.stats().items():
                print(f"  {k}: {v}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        print(f"\nserver stopped with SIGTERM, exit code {code}", file=sys.stderr)
    return 0
