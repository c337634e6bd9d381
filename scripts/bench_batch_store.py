"""Batch-store throughput: claim+commit items/s and claim latency (p50/p99) for sqlite (one
replica) and PostgreSQL (1, 2, 4 replicas), plus how soon a dead replica's items re-run.

Each replica is a process running the batch runner's store calls in a loop: claim a window
of items (leased), make each item's result (the mock engine's echo of its prompt; no engine
step is on the path: this measures the store), commit the window's results together
(`commit_many`, as the runner commits one poll's results). Every run checks that each item
got exactly one result and that the replicas' committed counts add up to the items.

The dead-replica probe: one replica leases items and exits without committing; another
(lease --lease-s) must re-run them; reported is the time from the death to the last of
those items committed.

    python scripts/bench_batch_store.py                # starts a throwaway PostgreSQL cluster
    python scripts/bench_batch_store.py --pg-url postgresql://user@host:5432/db --items 20000
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import tempfile
import time


def _items(n, prefix):
    from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
    return [(pb.GenerateRequest(prompt=f"{prefix}{i}", request_id=f"{prefix}{i}"), [1 + i % 100, 2])
            for i in range(n)]


def _open(url, data_dir, replica, lease_s):
    from conserve_server.batch.store import open_store
    return open_store(url, data_dir, replica_id=replica, lease_s=lease_s)


def _replica(url, data_dir, replica, lease_s, window, start, out):
    """One replica's loop until the queue is empty; puts (committed, refused, claim latencies)."""
    from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
    store = _open(url, data_dir, replica, lease_s)
    lat, committed, refused, empty = [], 0, 0, 0
    start.wait()
    while empty < 3:
        t0 = time.perf_counter()
        got = store.claim(window)
        lat.append(time.perf_counter() - t0)
        if not got:
            empty += 1
            time.sleep(0.01)
            continue
        empty = 0
        ok = store.commit_many([(c.batch_id, pb.BatchResult(
            index=c.index, request_id=c.request.request_id, text="x" * len(c.prompt_ids),
            finish_reason=pb.FINISH_REASON_LENGTH), "length", c.epoch) for c in got])
        committed += sum(ok)
        refused += len(ok) - sum(ok)
    store.close()
    out.put((replica, committed, refused, lat))


def run_case(backend, url, data_dir, replicas, items, window, lease_s):
    store = _open(url, data_dir, "setup", lease_s)
    per = items // 4
    bids = [store.create_batch(f"tenant{t}", _items(per, f"t{t}-"))[0] for t in range(4)]
    store.close()  # sqlite: one process owns the data dir, so the replica reopens it
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(url, data_dir, f"r{i}", lease_s, window, start, out))
             for i in range(replicas)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let every replica import and connect before the clock starts
    t0 = time.perf_counter()
    start.set()
    reports = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0 - 0.02  # the last empty polls
    for p in procs:
        p.join(30)
    check = _open(url, data_dir, "check", lease_s)
    done = sum(check.get(b).done for b in bids)
    per_item = sum(len(check.results(b, 0, per + 1)) for b in bids)
    check.close()
    lat = sorted(x for r in reports for x in r[3])
    committed = sum(r[1] for r in reports)
    return {"backend": backend, "replicas": replicas, "items": 4 * per, "window": window,
            "items_per_s": round(committed / wall, 1), "wall_s": round(wall, 3),
            "claim_p50_ms": round(1000 * lat[len(lat) // 2], 3),
            "claim_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "committed": committed, "refused": sum(r[2] for r in reports),
            "per_replica": {r[0]: r[1] for r in reports},
            "exactly_once": committed == done == per_item == 4 * per}


def _die_holding(url, data_dir, lease_s, n):
    store = _open(url, data_dir, "dead", lease_s)
    store.claim(n)
    os._exit(0)  # no release, no commit: a crash


def dead_replica_probe(url, data_dir, lease_s, n=32):
    store = _open(url, data_dir, "live", lease_s)
    bid, _ = store.create_batch("probe", _items(n, "d"))
    p = mp.get_context("spawn").Process(target=_die_holding, args=(url, data_dir, lease_s, n))
    p.start()
    p.join(60)
    died = time.monotonic()
    from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
    while store.get(bid).done < n and time.monotonic() - died < lease_s + 60:
        got = store.claim(n)
        store.commit_many([(c.batch_id, pb.BatchResult(index=c.index), "length", c.epoch) for c in got])
        time.sleep(0.05)
    took = time.monotonic() - died
    ok = store.get(bid).done == n
    store.close()
    return {"lease_s": lease_s, "items": n, "rerun_all_s": round(took, 2), "all_done": ok,
            "within_lease_plus_5s": ok and took <= lease_s + 5}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_batch_store.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pg-url", help="a PostgreSQL database to use (default: start a throwaway "
                    "local cluster; each case gets its own database)")
    ap.add_argument("--items", type=int, default=20000, help="items per case (4 tenants)")
    ap.add_argument("--sqlite-items", type=int, default=4000, help="items of the sqlite case")
    ap.add_argument("--window", type=int, default=32, help="items per claim")
    ap.add_argument("--replicas", default="1,2,4", help="PostgreSQL replica counts")
    ap.add_argument("--lease-s", type=float, default=2.0, help="lease of the dead-replica probe")
    ap.add_argument("--json", default="results/bench_batch_store.json", help="output file")
    args = ap.parse_args(argv)
    from conserve_jax.bench.script_io import write_json

    cluster = None
    if args.pg_url is None:
        from conserve_server.batch.pg_local import PgCluster
        cluster = PgCluster()

    def db():
        return cluster.new_database() if cluster is not None else args.pg_url
    cases = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cases.append(run_case("sqlite", f"sqlite://{tmp}/sqlite", tmp, 1, args.sqlite_items,
                                  args.window, 30.0))
            print(cases[-1], flush=True)
            for n in [int(x) for x in args.replicas.split(",")]:
                cases.append(run_case("postgresql", db(), tmp, n, args.items, args.window, 30.0))
                print(cases[-1], flush=True)
            probe = dead_replica_probe(db(), tmp, args.lease_s)
            print(probe, flush=True)
    finally:
        if cluster is not None:
            cluster.destroy()
    write_json(args.json, {"cases": cases, "dead_replica": probe, "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "store calls only (claim window, mock echo results, commit_many); PostgreSQL "
                "15 local cluster with default durability (fsync on, synchronous_commit on)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
