"""Soak test: a real server process under hostile-but-legal load for a fixed time.

Starts `conserve-jax serve` on 127.0.0.1 (loopback only) as a subprocess, then runs N
client threads, by default 2x the engine's running-set bound (`--max-num-seqs`), for
`--duration` seconds. Each thread loops over random actions: streaming Generate calls
(some cancelled after a few chunks, some with short deadlines, some disconnected by
closing the channel mid-stream, some with invalid input), batch submissions (some
cancelled soon after), and reads (GetBatch, ListBatches, GetServerStats, partial
StreamBatchResults). Afterwards it checks:

- every call ended OK or with a documented status for what it did (CANCELLED after a
  client cancel, DEADLINE_EXCEEDED after a client deadline, RESOURCE_EXHAUSTED when the
  online queue is full, INVALID_ARGUMENT for the invalid inputs);
- nothing is in flight once the clients stop (online and batch counters, engine queues);
- every batch item has exactly one result (read back through StreamBatchResults and
  counted in the database), and every batch reached a terminal state;
- server RSS and open file descriptors are flat: sampled after a warm-up, at the end of
  the load window and after the drain. A drain runs offline-only steps whose shapes the
  mixed load may never have compiled, so RSS can rise once there; `--probe-items` then
  submits that many batch items again and drains a second time: growth that repeats is a
  leak, growth that does not is one-time (compiled executables, allocator high-water).

`--verify-only --data-dir D` restarts a server on the data dir of an earlier run (e.g. one
whose drain outlasted `--quiet-timeout`), sends no load, lets every stored batch finish
and runs the same checks on all of them: batches resume from the database after a
restart, each item still with exactly one result.

It writes a JSON summary (calls, outcomes by code, RSS and fds at start/end, batches) and
exits 1 if any check fails.

    python scripts/soak.py --model mock --duration 1800 --json out/soak_mock.json
    python scripts/soak.py --model default --duration 600 --max-num-seqs 8 --json out/soak_default.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import grpc

from conserve_jax.bench import script_io
from conserve_jax.entrypoints.client import Client
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMINAL = {"completed", "cancelled", "failed"}
# what each kind of call may legitimately end with
ALLOWED = {
    "generate": {"OK", "RESOURCE_EXHAUSTED"},
    "generate_cancel": {"OK", "CANCELLED", "RESOURCE_EXHAUSTED"},
    "generate_deadline": {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},
    "generate_disconnect": {"OK", "CANCELLED", "RESOURCE_EXHAUSTED"},
    "generate_invalid": {"INVALID_ARGUMENT"},
    "submit_batch": {"OK"},
    "cancel_batch": {"OK"},
    "read": {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},  # capped result streams
}
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()


def proc_usage(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def start_server(args, data_dir: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "--log-level", "WARNING", "serve",
           "--model", args.model, "--host", "127.0.0.1", "--port", "0",
           "--http-port", "0", "--data-dir", data_dir,
           "--max-num-seqs", str(args.max_num_seqs), "--max-online-queue", str(args.max_online_queue),
           "--drain-timeout", "5"]
    if args.model == "mock":
        cmd += ["--mock-token-delay", str(args.mock_token_delay)]
    log = open(os.path.join(data_dir, "server.log"), "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    end = time.monotonic() + args.start_timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
            return proc, int(line.rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"server did not start; see {log.name}")


class Soak:
    def __init__(self, args, target: str) -> None:
        self.args = args
        self.target = target
        self.lock = threading.Lock()
        self.outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.unexpected: list[str] = []
        self.batches: dict[str, int] = {}  # batch id -> total items
        self.stop = threading.Event()
        self.tokens = 0

    # ---- bookkeeping ---------------------------------------------------------------------
    def record(self, kind: str, code: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[kind][code] += 1
            if code not in ALLOWED[kind] and len(self.unexpected) < 50:
                self.unexpected.append(f"{kind}: {code} {detail[:200]}")

    def _prompt(self, rng: random.Random) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, self.args.prompt_words)))

    # ---- actions -------------------------------------------------------------------------
    def generate(self, c: Client, rng: random.Random) -> Client:
        """One streaming call of a random flavour; returns the client to use next (a new
        one after a disconnect)."""
        flavour = rng.choices(["generate", "generate_cancel", "generate_deadline",
                               "generate_disconnect", "generate_invalid"],
                              weights=[55, 15, 10, 5, 5])[0]
        kw = dict(max_tokens=rng.randint(1, self.args.max_tokens), temperature=rng.choice([0.0, 0.8]),
                  seed=rng.randint(0, 1000))
        if flavour == "generate_invalid":
            kw = rng.choice([dict(max_tokens=0), dict(temperature=float("inf")), dict(top_p=2.0),
                             dict(stop=["x"] * 100)])
        timeout = rng.uniform(0.05, 1.0) if flavour == "generate_deadline" else 120.0
        stop_after = rng.randint(1, 3)
        code, detail, n = "OK", "", 0
        try:
            stream = c.generate(self._prompt(rng), timeout=timeout, **kw)
            for chunk in stream:
                n += len(chunk.token_ids)
                if flavour == "generate_cancel" and n >= stop_after:
                    stream.cancel()
                elif flavour == "generate_disconnect" and n >= stop_after:
                    c.close()  # the connection goes away mid-stream
                    c = Client(self.target)
                    code = "CANCELLED"
                    break
        except grpc.RpcError as e:
            code, detail = e.code().name, e.details() or ""
        with self.lock:
            self.tokens += n
        self.record(flavour, code, detail)
        if code == "RESOURCE_EXHAUSTED":  # back off as a well-behaved client would
            time.sleep(rng.uniform(0.05, 0.25))
        return c

    def batch(self, c: Client, rng: random.Random) -> None:
        n = rng.randint(1, self.args.batch_items)
        reqs = [{"prompt": self._prompt(rng), "max_tokens": rng.randint(1, self.args.max_tokens),
                 "temperature": 0.0} for _ in range(n)]
        try:
            bid = c.submit_batch(reqs, timeout=30)
        except grpc.RpcError as e:
            self.record("submit_batch", e.code().name, e.details() or "")
            return
        self.record("submit_batch", "OK")
        with self.lock:
            self.batches[bid] = n
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0.0, 0.5))
            try:
                c.cancel_batch(bid, timeout=30)
                self.record("cancel_batch", "OK")
            except grpc.RpcError as e:
                self.record("cancel_batch", e.code().name, e.details() or "")

    def read(self, c: Client, rng: random.Random) -> None:
        with self.lock:
            ids = list(self.batches)
        try:
            what = rng.randint(0, 3)
            if what == 0:
                c.stats(timeout=10)
            elif what == 1 and ids:
                c.get_batch(rng.choice(ids), timeout=10)
            elif what == 2:
                c._stub.ListBatches(pb.ListBatchesRequest(page_size=20), timeout=10)
            elif ids:
                for _ in zip(range(3), c.batch_results(rng.choice(ids), timeout=rng.uniform(0.2, 2))):
                    pass
            self.record("read", "OK")
        except grpc.RpcError as e:
            self.record("read", e.code().name, e.details() or "")

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        c = Client(self.target)
        try:
            share = self.args.batch_share
            while not self.stop.is_set():
                r = rng.random()
                if r < share:
                    self.batch(c, rng)
                elif r < share + 0.1:
                    self.read(c, rng)
                else:
                    c = self.generate(c, rng)
        finally:
            c.close()


def wait_quiet(c: Client, soak: Soak, timeout: float) -> tuple[bool, dict, dict]:
    """Wait until nothing is in flight and every batch is terminal."""
    end = time.monotonic() + timeout
    states: dict[str, str] = {}
    st: dict = {}
    while time.monotonic() < end:
        st = c.stats(timeout=10)
        idle = (st["online_in_flight"] == 0 and st["online_running"] == 0 and st["online_waiting"] == 0
                and st["batch_items_in_flight"] == 0 and st["batch_items_pending"] == 0
                and st["offline_running"] == 0 and st["offline_waiting"] == 0)
        if idle:  # then every batch must be terminal (one GetBatch each, once)
            states = {b: c.get_batch(b, timeout=10).state for b in soak.batches}
            if all(s in TERMINAL for s in states.values()):
                return True, st, states
        time.sleep(1.0)
    return False, st, states


def check_results(c: Client, soak: Soak, db_path: str) -> list[str]:
    """Every batch item exactly one result: via the API and in the database."""
    problems = []
    for bid, total in soak.batches.items():
        idx = [r.index for r in c.batch_results(bid, timeout=60)]
        if idx != list(range(total)):
            problems.append(f"{bid}: result indexes {idx[:10]}... != 0..{total - 1}")
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        for bid, total in soak.batches.items():
            done, dup = db.execute(
                "SELECT COUNT(*), COUNT(*) - COUNT(DISTINCT idx) FROM items WHERE batch_id=? "
                "AND state='done'", (bid,)).fetchone()
            row = db.execute("SELECT done, total FROM batches WHERE id=?", (bid,)).fetchone()
            if done != total or dup or row is None or row[0] != total:
                problems.append(f"{bid}: {done} done items, {dup} duplicates, batch row {row}")
    return problems


def drain_probe(c: Client, soak: Soak, items: int, rng: random.Random) -> None:
    """Submit `items` more batch items (4 per batch) and let them drain."""
    args = soak.args
    for k in range(0, items, 4):
        n = min(4, items - k)
        bid = c.submit_batch([{"prompt": soak._prompt(rng), "temperature": 0.0,
                               "max_tokens": rng.randint(1, args.max_tokens)} for _ in range(n)],
                             timeout=30)
        soak.batches[bid] = n


def main() -> int:
    ap = argparse.ArgumentParser(description="soak test a conserve-jax server (loopback only)")
    ap.add_argument("--model", default="mock")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="engine capacity (running set)")
    ap.add_argument("--clients", type=int, default=None, help="default: 2 x max-num-seqs")
    ap.add_argument("--max-online-queue", type=int, default=None,
                    help="default: 1.5 x max-num-seqs, so the 2x load also meets RESOURCE_EXHAUSTED")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--batch-items", type=int, default=8)
    ap.add_argument("--batch-share", type=float, default=0.1,
                    help="fraction of client actions that submit a batch")
    ap.add_argument("--mock-token-delay", type=float, default=0.005)
    ap.add_argument("--warmup", type=float, default=None, help="default: 10%% of the duration")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--quiet-timeout", type=float, default=600.0)
    ap.add_argument("--rss-growth-mb", type=float, default=64.0, help="flat: end - warm-up RSS below this")
    ap.add_argument("--fd-growth", type=int, default=8, help="flat: end - warm-up fds below this")
    ap.add_argument("--probe-items", type=int, default=0,
                    help="after the run, drain this many more batch items and compare RSS")
    ap.add_argument("--verify-only", action="store_true",
                    help="no load: restart on --data-dir, finish and check its stored batches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default="out/soak.json")
    args = ap.parse_args()
    args.clients = args.clients or 2 * args.max_num_seqs
    args.max_online_queue = args.max_online_queue or max(1, (3 * args.max_num_seqs) // 2)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="soak-")
    t_start = time.time()
    proc, port = start_server(args, data_dir)
    target = f"127.0.0.1:{port}"
    print(f"server pid {proc.pid} on {target}; {args.clients} clients for {args.duration:.0f} s", flush=True)
    soak = Soak(args, target)
    if args.verify_only:
        with sqlite3.connect(f"file:{os.path.join(data_dir, 'batches.sqlite3')}?mode=ro", uri=True) as db:
            soak.batches = dict(db.execute("SELECT id, total FROM batches").fetchall())
        args.duration, args.clients = 0.0, 0
    samples = [(0.0, *proc_usage(proc.pid))]
    threads = [threading.Thread(target=soak.client_loop, args=(args.seed * 1000 + i,), daemon=True)
               for i in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    warmup = args.warmup if args.warmup is not None else 0.1 * args.duration
    warm = None
    while (el := time.monotonic() - t0) < args.duration:
        time.sleep(min(10.0, args.duration - el))
        el = time.monotonic() - t0
        samples.append((round(el, 1), *proc_usage(proc.pid)))
        if warm is None and el >= warmup:
            warm = samples[-1]
        with soak.lock:
            calls = sum(sum(c.values()) for c in soak.outcomes.values())
        print(f"t={el:6.0f}s calls={calls} tokens={soak.tokens} rss={samples[-1][1] / 1024:.0f}MB "
              f"fds={samples[-1][2]}", flush=True)
    soak.stop.set()
    load_end = samples[-1]
    for t in threads:
        t.join(timeout=180)
    stuck = sum(t.is_alive() for t in threads)
    probe = None
    with Client(target) as c:
        quiet, st, states = wait_quiet(c, soak, args.quiet_timeout)
        end = proc_usage(proc.pid)
        if quiet and args.probe_items:
            drain_probe(c, soak, args.probe_items, random.Random(args.seed + 7))
            quiet, st, states = wait_quiet(c, soak, args.quiet_timeout)
            probe = proc_usage(proc.pid)
            print(f"drain probe: rss {end[0] / 1024:.0f} -> {probe[0] / 1024:.0f} MB, "
                  f"fds {end[1]} -> {probe[1]}", flush=True)
        problems = check_results(c, soak, os.path.join(data_dir, "batches.sqlite3")) if quiet else []
    warm = warm or samples[-1]
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed"
    by_code = collections.Counter()
    for kind, cnt in soak.outcomes.items():
        by_code.update(cnt)
    rss_growth_mb = (load_end[1] - warm[1]) / 1024  # over the load window
    fd_growth = max(end[1], (probe or end)[1]) - warm[2]
    checks = {
        "every call ended OK or with a documented status": not soak.unexpected,
        "no client thread stuck": stuck == 0,
        "nothing in flight, every batch terminal": quiet,
        "every batch item exactly one result": quiet and not problems,
        f"RSS flat under load (warm-up -> end of load < {args.rss_growth_mb} MB)":
            rss_growth_mb < args.rss_growth_mb,
        f"fds flat (growth after warm-up < {args.fd_growth})": fd_growth < args.fd_growth,
        "server exited 0 on SIGTERM": rc == 0,
    }
    if probe is not None:
        checks[f"RSS flat over a second drain (< {args.rss_growth_mb} MB)"] = \
            (probe[0] - end[0]) / 1024 < args.rss_growth_mb
    summary = {
        "model": args.model, "duration_s": args.duration, "clients": args.clients,
        "max_num_seqs": args.max_num_seqs, "max_online_queue": args.max_online_queue,
        "max_tokens": args.max_tokens, "batch_share": args.batch_share,
        "wall_s": round(time.time() - t_start, 1),
        "calls": sum(by_code.values()), "outcomes_by_code": dict(by_code),
        "outcomes_by_kind": {k: dict(v) for k, v in soak.outcomes.items()},
        "generated_tokens_seen": soak.tokens,
        "batches": len(soak.batches), "batch_items": sum(soak.batches.values()),
        "batch_states": dict(collections.Counter(states.values())),
        "rss_mb": {"start": round(samples[0][1] / 1024, 1), "after_warmup": round(warm[1] / 1024, 1),
                   "end_of_load": round(load_end[1] / 1024, 1), "after_drain": round(end[0] / 1024, 1),
                   "after_second_drain": None if probe is None else round(probe[0] / 1024, 1)},
        "fds": {"start": samples[0][2], "after_warmup": warm[2], "end_of_load": load_end[2],
                "after_drain": end[1], "after_second_drain": None if probe is None else probe[1]},
        "samples": samples, "final_stats": st, "unexpected": soak.unexpected,
        "result_problems": problems[:20], "server_exit": rc, "checks": checks,
        "passed": all(checks.values()), "data_dir": data_dir,
    }
    script_io.write_json(args.json, summary, announce=False)
    print(json.dumps({k: summary[k] for k in ("calls", "outcomes_by_code", "batches", "batch_items",
                                              "rss_mb", "fds", "server_exit")}, indent=1))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
