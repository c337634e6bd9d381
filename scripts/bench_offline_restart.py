"""Offline work across a graceful restart: time from restart to all done, with and without
the KV saved at SIGTERM (issue 13, item 5).

For each variant ("saved-kv": default server; "recompute": --offline-kv-max-mb 0) and each
repeat (variants interleaved): start a server on a fresh data dir, submit --items offline
items with --prompt-len-token prompts (greedy, --max-tokens each), SIGTERM once half of the
batch's work (prompt + output tokens) is done, then start the server again on the same data
dir and time until the batch is completed. Prints a table (medians and minimums, and the ratio of
the two runs of each repeat, which ran back to back: on a shared machine the load changes
between repeats) and writes JSON. The results of the two variants are also compared token by token.

    python scripts/bench_offline_restart.py --model default --json out/bench_offline_restart.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from conserve_jax.bench import script_io
from conserve_jax.entrypoints.client import Client

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(data: str, extra: list[str]):
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "-v", "serve", "--port", "0",
           "--http-port", "0", "--data-dir", data, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    port, log = [], []

    def out():
        for line in proc.stdout:
            if line.startswith("listening on ") and not port:
                port.append(int(line.rsplit(":", 1)[1]))
    threading.Thread(target=out, daemon=True).start()
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    while not port:
        if proc.poll() is not None:
            raise RuntimeError("server failed: " + "".join(log[-30:]))
        time.sleep(0.05)
    return proc, port[0], log


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far. Less disturbed by
    other processes on a shared machine than wall time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def items(n: int, prompt_len: int, max_tokens: int) -> list[dict]:
    return [{"token_ids": [100 + (37 * i + 11 * j) % 1900 for j in range(prompt_len)],
             "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            for i in range(n)]


def dir_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def one_run(args, variant: str) -> dict:
    data = tempfile.mkdtemp(prefix=f"bench-restart-{variant}-")
    extra = ["--model", args.model, *args.server_args.split()]
    if variant == "recompute":
        extra += ["--offline-kv-max-mb", "0"]
    work = args.items * (args.prompt_len + args.max_tokens)
    proc = None
    try:
        proc, port, log = spawn(data, extra)
        with Client(f"127.0.0.1:{port}") as c:
            bid = c.submit_batch(items(args.items, args.prompt_len, args.max_tokens))
            t_start = time.monotonic()
            while True:
                st = c.stats()
                done = st["offline_prefill_tokens_total"] + st["offline_tokens_total"]
                if done >= work / 2:
                    break
                time.sleep(0.1)
            t_half = time.monotonic() - t_start
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=600) == 0, "".join(log[-30:])
        t_shutdown = time.monotonic() - t0
        save_line = next((ln.strip() for ln in log if "unfinished batch items" in ln), "")
        saved_mb = dir_mb(os.path.join(data, "offline-kv"))
        t0 = time.monotonic()
        proc, port, log = spawn(data, extra)
        t_listen = time.monotonic() - t0
        cpu_listen = cpu_s(proc.pid)
        with Client(f"127.0.0.1:{port}") as c:
            results = list(c.batch_results(bid, timeout=3600))
            t_done = time.monotonic() - t0
            cpu_done = cpu_s(proc.pid)
            st = c.stats()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
        row = dict(variant=variant, first_half_s=t_half, shutdown_s=t_shutdown,
                   saved_mb=saved_mb, restart_listen_s=t_listen, restart_to_done_s=t_done,
                   after_listen_s=t_done - t_listen, cpu_restart_to_done_s=cpu_done,
                   cpu_after_listen_s=cpu_done - cpu_listen, restored_tokens=st["restored_tokens"],
                   prefill_tokens_after_restart=st["offline_prefill_tokens_total"],
                   resumed_items=sum("resumes:" in line for line in log), save_log=save_line,
                   tokens=[list(r.token_ids) for r in results])
        print(f"  {variant:9s} first half {t_half:6.1f} s  shutdown {t_shutdown:5.1f} s "
              f"(saved {saved_mb:6.1f} MB)  restart->listening {t_listen:5.1f} s  "
              f"restart->all done {t_done:6.1f} s (CPU {cpu_done:6.1f} s, after listening "
              f"{cpu_done - cpu_listen:6.1f} s)  restored {row['restored_tokens']} tok, "
              f"prefilled {row['prefill_tokens_after_restart']} tok", flush=True)
        if save_line:
            print("    " + save_line[save_line.find("saved"):], flush=True)
        return row
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--server-args", default="--max-model-len 2048 --drain-timeout 0",
                    help="extra serve flags, one string")
    ap.add_argument("--json", default="out/bench_offline_restart.json")
    args = ap.parse_args()
    rows = []
    for r in range(args.repeats):
        order = ["saved-kv", "recompute"] if r % 2 == 0 else ["recompute", "saved-kv"]
        print(f"repeat {r + 1}/{args.repeats}", flush=True)
        for v in order:
            rows.append(one_run(args, v))
    summary = {}
    for v in ("saved-kv", "recompute"):
        t = [x["restart_to_done_s"] for x in rows if x["variant"] == v]
        a = [x["after_listen_s"] for x in rows if x["variant"] == v]
        summary[v] = dict(restart_to_done_median_s=statistics.median(t),
                          restart_to_done_min_s=min(t), after_listen_median_s=statistics.median(a),
                          after_listen_min_s=min(a))
    pairs = [(rows[2 * r], rows[2 * r + 1]) for r in range(args.repeats)]
    ratios, cpu_ratios = [], []
    for a, b in pairs:  # the two variants of one repeat ran back to back: compare those
        sv, rc_ = (a, b) if a["variant"] == "saved-kv" else (b, a)
        ratios.append(rc_["restart_to_done_s"] / sv["restart_to_done_s"])
        cpu_ratios.append(rc_["cpu_after_listen_s"] / sv["cpu_after_listen_s"])
    summary["pair_ratios"] = ratios
    summary["pair_ratio_median"] = statistics.median(ratios)
    summary["cpu_after_listen_ratios"] = cpu_ratios
    summary["cpu_after_listen_ratio_median"] = statistics.median(cpu_ratios)
    s, rc = summary["saved-kv"], summary["recompute"]
    summary["speedup_median"] = rc["restart_to_done_median_s"] / s["restart_to_done_median_s"]
    summary["speedup_after_listen_median"] = rc["after_listen_median_s"] / s["after_listen_median_s"]
    ref = rows[0]["tokens"]
    summary["all_runs_token_identical"] = all(x["tokens"] == ref for x in rows)
    print(f"\n{args.items} items x {args.prompt_len}-token prompts, {args.max_tokens} output "
          f"tokens, model {args.model}, interrupted at half the work; {args.repeats} repeats")
    for v in ("saved-kv", "recompute"):
        x = summary[v]
        print(f"  {v:9s} restart -> all done: median {x['restart_to_done_median_s']:6.1f} s, "
              f"min {x['restart_to_done_min_s']:6.1f} s   (after listening: median "
              f"{x['after_listen_median_s']:6.1f} s)")
    print(f"  recompute / saved-kv: {summary['speedup_median']:.2f}x (restart -> done), "
          f"{summary['speedup_after_listen_median']:.2f}x (after listening); token-identical "
          f"across runs: {summary['all_runs_token_identical']}")
    print(f"  per repeat (back-to-back pairs) recompute / saved-kv: "
          f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {summary['pair_ratio_median']:.2f}x")
    print(f"  server CPU seconds after listening, recompute / saved-kv: "
          f"{', '.join(f'{r:.2f}x' for r in cpu_ratios)}; median "
          f"{summary['cpu_after_listen_ratio_median']:.2f}x")
    for x in rows:
        x.pop("tokens")
    script_io.write_json(args.json, dict(config=vars(args), runs=rows, summary=summary), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
