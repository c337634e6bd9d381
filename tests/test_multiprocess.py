"""One model over two processes (multi-controller JAX over gloo on 127.0.0.1, 2 CPU devices
each, tp 4): greedy tokens and top logprobs of `LLM.generate` equal one process with tp 4
and with tp 1, with the leader's safepoint decisions crossing processes; `serve` on two
processes answers gRPC with the same tokens and both processes end with 0 on SIGTERM; a
follower killed with SIGKILL or stopped with SIGSTOP makes the leader turn health
NOT_SERVING, end the open stream with the engine's error and exit with EXIT_ENGINE_FAILED
within a bound instead of hanging (a stopped one: the step watchdog, also while idle);
processes started with different flags are refused at start-up, the message naming the
flag. Offline KV: online arrivals evict offline requests
whose KV each process checkpoints to its own host pool and restores (tokens of one
process); a SIGTERM mid-batch saves the items' KV and a restart of both processes resumes
them with the tokens of one process; a checkpoint from another process layout is refused.

Each test launches its processes itself (tests/multiprocess_worker.py or the CLI) on a free
port, with hard timeouts, and kills whatever is still running when it ends."""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conserve_server.main import EXIT_ENGINE_FAILED
from tests.conftest_server import REPO, wait_until
from tests.multiprocess_worker import ENGINE, PROMPTS, outputs_json, sampling


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A launched process whose stdout and stderr are collected by reader threads."""

    def __init__(self, cmd: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # cpu_devices decides
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(s), daemon=True).start()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return "".join(self.err[-40:])


@pytest.fixture
def launched():
    """Processes a test launches; every one still running at the end is killed."""
    procs: list[Proc] = []
    yield procs
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(timeout=30)


def worker(launched, pid: int, port: int, *extra: str) -> Proc:
    p = Proc([sys.executable, "-m", "tests.multiprocess_worker", "--process-id", str(pid),
              "--coordinator", f"127.0.0.1:{port}", *extra])
    launched.append(p)
    return p


def run_workers(launched, out, *extra: str):
    """Both processes of tests/multiprocess_worker.py to the end (both must exit 0); the
    JSON process 0 wrote to `out`."""
    port = free_port()
    procs = [worker(launched, pid, port, "--out", str(out), *extra) for pid in (0, 1)]
    for p in procs:
        assert p.wait(timeout=400) == 0, p.log()
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_generate_the_tokens_of_one(tmp_path, launched):
    got = run_workers(launched, tmp_path / "out.json")

    from conserve_jax.entrypoints.llm import LLM

    refs = {}
    for tp in (4, 1):
        with LLM(**ENGINE, tp=tp) as llm:
            refs[tp] = outputs_json(llm.generate(PROMPTS, sampling()))
    for tp, ref in refs.items():
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in ref], f"tp {tp}"
        for g, r in zip(got, ref):
            for (gt, glp, gtop), (rt, rlp, rtop) in zip(g["logprobs"], r["logprobs"]):
                assert gt == rt and glp == pytest.approx(rlp, abs=1e-4)
                assert [t for t, _ in gtop] == [t for t, _ in rtop]
                assert [v for _, v in gtop] == pytest.approx([v for _, v in rtop], abs=1e-4)
    assert all(len(o["token_ids"]) == 12 and len(o["logprobs"]) == 12 for o in got)
    assert all(len(top) == 3 for o in got for _, _, top in o["logprobs"])


def test_processes_with_different_flags_are_refused(launched):
    port = free_port()
    procs = []
    for pid, seqs in ((0, "4"), (1, "8")):
        p = Proc([sys.executable, "-m", "conserve_jax.entrypoints.cli", "generate", "hello",
                  "--model", "random:tiny", "--no-warmup", "--max-num-seqs", seqs,
                  "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                  "--process-id", str(pid), "--cpu-devices", "2", "--process-timeout-s", "10"])
        launched.append(p)
        procs.append(p)
    for p in procs:
        assert p.wait(timeout=120) == 2, p.log()
        assert "max_num_seqs" in p.log() and "were started differently" in p.log(), p.log()


@pytest.mark.slow
@pytest.mark.parametrize("sig, said", [
    (signal.SIGKILL, ("step loop stopped", "another task died")),
    # SIGSTOP: the follower's sockets stay open; the leader's step watchdog tells (under
    # LLM the request then fails and JAX's exit barrier aborts the process)
    (signal.SIGSTOP, ("step timed out",))], ids=["dies", "hangs"])
def test_leader_exits_with_an_error_when_a_follower_fails(launched, sig, said):
    port = free_port()
    leader, follower = (worker(launched, pid, port, "--rounds", "100000", "--timeout", "5")
                        for pid in (0, 1))
    assert wait_until(lambda: any("round 0 done" in line for line in leader.out)
                      or leader.proc.poll() is not None, 400, 0.1), leader.log()
    assert leader.proc.poll() is None, leader.log()
    follower.proc.send_signal(sig)  # mid-run
    code = leader.wait(timeout=120)  # a bound, not a speed target: a hang fails here
    assert code != 0
    text = "".join(leader.err)
    assert any(s in text for s in said), text[-3000:]


SERVE_ENGINE = ["--model", "random:tiny", "--no-warmup", "--max-model-len", "64",
                "--max-num-seqs", "4", "--max-prefill-tokens", "32", "--block-size", "4",
                "--kv-cache-tokens", "256", "--no-enable-prefix-caching"]


def serve_pair(launched, port: int, data_dirs, *extra: str) -> tuple[Proc, Proc, int]:
    """`conserve-jax -v serve` on two processes (coordinator on `port`); waits until process
    0 listens. Returns (leader, follower, gRPC port)."""
    multi = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
             "--cpu-devices", "2", "--process-timeout-s", "10"]
    procs = []
    for pid in (0, 1):
        p = Proc([sys.executable, "-m", "conserve_jax.entrypoints.cli", "-v", "serve", "--port",
                  "0", "--http-port", "0", "--data-dir", str(data_dirs[pid]), *extra, *multi,
                  "--process-id", str(pid)])
        launched.append(p)
        procs.append(p)
    leader, follower = procs
    assert wait_until(lambda: any(line.startswith("listening on ") for line in leader.out)
                      or leader.proc.poll() is not None, 400, 0.1), leader.log()
    line = next(l for l in leader.out if l.startswith("listening on "))
    return leader, follower, int(line.rsplit(":", 1)[1])


def stop_pair(leader: Proc, follower: Proc) -> None:
    """SIGTERM to process 0; both processes must exit 0."""
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.wait(timeout=120) == 0, leader.log()
    assert follower.wait(timeout=120) == 0, follower.log()


@pytest.mark.slow
def test_serve_over_two_processes(tmp_path, launched):
    """`serve` on two processes: process 0 answers gRPC with the tokens of one process;
    SIGTERM on process 0 ends both with 0."""
    from conserve_jax.client import Client
    from conserve_jax.entrypoints.llm import LLM

    leader, follower, grpc_port = serve_pair(
        launched, free_port(), [tmp_path / "data0", tmp_path / "data1"], *SERVE_ENGINE,
        "--policy", "fcfs")
    with Client(f"127.0.0.1:{grpc_port}") as c:
        got = [[t for ch in c.generate(token_ids=ids, max_tokens=12, temperature=0.0,
                                       ignore_eos=True) for t in ch.token_ids]
               for ids in PROMPTS]
    stop_pair(leader, follower)
    with LLM(**{**ENGINE, "policy": "fcfs"}, tp=4) as llm:
        ref = [o.token_ids for o in llm.generate(PROMPTS, sampling())]
    assert got == ref


@pytest.mark.slow
def test_an_iteration_abandoned_at_a_safepoint_resumes_across_processes(tmp_path, launched):
    """The leader's safepoint decisions stop the followers at the same layer, and a resume
    (also with decode rows cut loose) continues there on every process."""
    got = run_workers(launched, tmp_path / "runner.json", "--mode", "runner")
    assert len(got["straight"]) == 3  # two decodes and the prefill chunk's token
    assert got["resumed"] == got["straight"]
    assert got["detached"][-1] == got["straight"][-1]


@pytest.mark.slow
def test_offline_kv_checkpoints_across_processes(tmp_path, launched):
    """Online arrivals evict offline requests (each process copies its own KV heads to its
    own host pool) and preempt offline iterations; the evicted requests resume from host
    on every process. Tokens equal one process's (tp 4) with every request alone."""
    from conserve_jax.engine_args import engine_config
    from tests.multiprocess_worker import COSERVE, coserve_mix

    got = run_workers(launched, tmp_path / "mix.json", "--mode", "coserve")
    assert got["evictions"] > 0 and got["restored_tokens"] > 0 and got["blocks_restored"] > 0
    assert got["host_slots_used"] == 0  # every slot released
    alone = coserve_mix(engine_config(**{**COSERVE, "policy": "fcfs", "num_blocks": 512}, tp=4))
    assert got["tokens"] == alone["tokens"]


N_ITEMS, ITEM_TOKENS = 4, 96


def batch_items() -> list[dict]:
    return [{"token_ids": [5 + (7 * i + j) % 250 for j in range(24 + 9 * i)],
             "max_tokens": ITEM_TOKENS, "temperature": 0.0, "ignore_eos": True}
            for i in range(N_ITEMS)]


BATCH_ENGINE = ["--model", "random:tiny", "--no-warmup", "--max-model-len", "160",
                "--max-num-seqs", "4", "--max-prefill-tokens", "32", "--block-size", "4",
                "--num-blocks", "256", "--no-enable-prefix-caching", "--batch-in-flight", "4",
                "--drain-timeout", "0"]


@functools.lru_cache(maxsize=1)
def batch_reference() -> list[list[int]]:
    """Each item's greedy tokens from one process (tp 4; computed once per session)."""
    from conserve_jax.entrypoints.llm import LLM
    from conserve_jax.sampling_params import SamplingParams

    with LLM(model="random:tiny", warmup=False, max_model_len=160, max_num_seqs=4,
             max_prefill_tokens=32, block_size=4, num_blocks=256,
             enable_prefix_caching=False, tp=4) as llm:
        outs = llm.generate([it["token_ids"] for it in batch_items()],
                            SamplingParams(max_tokens=ITEM_TOKENS, temperature=0.0,
                                           ignore_eos=True))
    return [o.token_ids for o in outs]


def sigterm_and_restart(launched, data, *flags: str) -> tuple[list, dict, Proc]:
    """Serve on two processes with `flags` (data dirs `data`), submit `batch_items()`,
    SIGTERM process 0 once every item generates: both exit 0 and process 0's data dir holds
    one saved request per item; then serve again, read the batch's results and the stats,
    stop both. Returns (results, stats, the second run's process 0)."""
    from conserve_jax.client import Client

    leader, follower, grpc_port = serve_pair(launched, free_port(), data, *flags)
    with Client(f"127.0.0.1:{grpc_port}") as c:
        bid = c.submit_batch(batch_items())

        def all_started():
            st = c.stats()
            return st["offline_running"] == N_ITEMS and st["offline_tokens_total"] >= N_ITEMS
        assert wait_until(all_started, 300, 0.02), leader.log()
        leader.proc.send_signal(signal.SIGTERM)
        assert leader.wait(timeout=120) == 0, leader.log()
    assert follower.wait(timeout=120) == 0, follower.log()
    assert len(os.listdir(data[0] / "offline-kv")) == N_ITEMS, leader.log()
    leader, follower, grpc_port = serve_pair(launched, free_port(), data, *flags)
    with Client(f"127.0.0.1:{grpc_port}") as c:
        results = list(c.batch_results(bid, timeout=300))
        stats = c.stats()
    stop_pair(leader, follower)
    return results, stats, leader


@pytest.mark.slow
def test_sigterm_restart_resumes_saved_offline_kv_across_processes(tmp_path, launched):
    """SIGTERM on process 0 mid-batch saves the items' tokens and KV (every process's heads,
    joined into one checkpoint per item in process 0's data dir); both processes exit 0; a
    restart of both resumes the items from there with the tokens of one process."""
    data = [tmp_path / "data0", tmp_path / "data1"]
    results, stats, leader = sigterm_and_restart(launched, data, *BATCH_ENGINE)
    assert sum("resumes:" in line for line in leader.err) == N_ITEMS, leader.log()
    assert stats["restored_tokens"] > 0
    assert [r.index for r in results] == list(range(N_ITEMS))
    assert [list(r.token_ids) for r in results] == batch_reference()
    assert os.listdir(data[0] / "offline-kv") == []


def test_a_checkpoint_from_another_process_layout_is_refused(tmp_path, caplog):
    """A request saved by a 2-process run is not resumed by a 1-process engine with the same
    tp (or the other way round): the log line names what differs."""
    import numpy as np

    from conserve_jax.engine.offline_suspension import OfflineSuspension
    from conserve_jax.engine_args import engine_config
    from conserve_jax.kv.persist import CheckpointDir, SavedRequest

    def layout(processes):
        cfg = engine_config(model="random:tiny", tp=4, num_processes=processes,
                            coordinator_address="127.0.0.1:1" if processes > 1 else None)
        return OfflineSuspension(cfg, None, 512, 64).layout()
    assert layout(2) != layout(1)
    blocks = np.ones((2, 2, 2, 4, 4, 16), np.float32)
    CheckpointDir(str(tmp_path), layout(2), 1 << 30).save_all(
        [("b-0", SavedRequest([1, 2, 3], [4], 7, 8, blocks))])
    with caplog.at_level("WARNING"):
        assert CheckpointDir(str(tmp_path), layout(1), 1 << 30).load("b-0") is None
    assert "different engine layout (processes: saved 2 != this engine's 1)" in caplog.text


def stream_to_end(client, max_tokens: int, out: list) -> None:
    """Stream one greedy request of PROMPTS[0] to its end; append its finish reason, or the
    gRPC status code it failed with, to `out` (run on a thread while a process fails)."""
    import grpc
    try:
        chunks = list(client.generate(token_ids=PROMPTS[0], max_tokens=max_tokens,
                                      temperature=0.0, ignore_eos=True))
        out.append(chunks[-1].finish_reason)
    except grpc.RpcError as e:
        out.append(e.code())


def serving_pair_watched(tmp_path, launched):
    """`serve` on two processes, both answering (one greedy request), and process 0's
    health watched on a thread (`watch_health`) until its first status. Returns (leader,
    follower, gRPC target, the health statuses so far, the watcher thread)."""
    from conserve_jax.client import Client

    data = [tmp_path / "data0", tmp_path / "data1"]
    leader, follower, grpc_port = serve_pair(launched, free_port(), data, *SERVE_ENGINE)
    target = f"127.0.0.1:{grpc_port}"
    health: list = []
    watcher = threading.Thread(target=watch_health, args=(target, health), daemon=True)
    watcher.start()
    with Client(target) as c:
        first = list(c.generate(token_ids=PROMPTS[0], max_tokens=4, temperature=0.0))
        assert first and first[-1].finish_reason == "length"  # both processes serve
    assert wait_until(lambda: bool(health), 30, 0.01)
    return leader, follower, target, health, watcher


def watch_health(target: str, out: list) -> None:
    """Append every overall health status process 0 at `target` sends to `out` until the
    server ends the Watch (run on a thread while a process fails)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            for r in health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="")):
                out.append(r.status)
        except grpc.RpcError:
            pass


@pytest.mark.slow
def test_serve_leader_exits_cleanly_within_a_bound_when_the_follower_hangs(tmp_path, launched):
    """SIGSTOP of the follower under `serve` (its sockets stay open: nothing fails, the
    leader's step just waits in a collective): process 0's step watchdog (step_timeout_s,
    here a third of --process-timeout-s 10) fires before JAX's heartbeat timeout would abort
    it: health turns NOT_SERVING, the open stream ends with the engine's error (INTERNAL,
    not the UNAVAILABLE of a process that vanished), process 0 exits with
    EXIT_ENGINE_FAILED (an abort would be -6); the follower, once continued, finds its
    leader gone and exits non-zero."""
    import grpc
    from grpc_health.v1 import health_pb2

    from conserve_jax.client import Client

    leader, follower, target, health, watcher = serving_pair_watched(tmp_path, launched)
    stream_end = []
    with Client(target) as c:
        follower.proc.send_signal(signal.SIGSTOP)
        t = threading.Thread(target=stream_to_end, args=(c, 40, stream_end), daemon=True)
        t.start()
        code = leader.wait(timeout=180)  # a bound, not a speed target: a hang fails here
        t.join(timeout=30)
    watcher.join(timeout=30)
    follower.proc.send_signal(signal.SIGCONT)
    follower_code = follower.wait(timeout=180)  # a bound: the follower must not hang either
    assert code == EXIT_ENGINE_FAILED, leader.log()
    assert "step timed out" in leader.log() and "health NOT_SERVING" in leader.log(), leader.log()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health, health
    assert stream_end == [grpc.StatusCode.INTERNAL], stream_end
    assert follower_code != 0, follower.log()


@pytest.mark.slow
def test_serve_leader_exits_cleanly_when_the_follower_hangs_while_idle(tmp_path, launched):
    """SIGSTOP of the follower while process 0 runs no step: its idle probe (a tiny
    collective every half step_timeout_s) waits in vain, the step watchdog fires: health
    NOT_SERVING, EXIT_ENGINE_FAILED, before JAX's heartbeat timeout would abort it."""
    from grpc_health.v1 import health_pb2

    leader, follower, _, health, watcher = serving_pair_watched(tmp_path, launched)
    follower.proc.send_signal(signal.SIGSTOP)
    code = leader.wait(timeout=180)  # a bound, not a speed target: a hang fails here
    watcher.join(timeout=30)
    follower.proc.send_signal(signal.SIGCONT)
    follower_code = follower.wait(timeout=180)
    assert code == EXIT_ENGINE_FAILED, leader.log()
    assert "step timed out" in leader.log() and "health NOT_SERVING" in leader.log(), leader.log()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health, health
    assert follower_code != 0, follower.log()


@pytest.mark.slow
def test_follower_killed_during_a_batch_then_restart_finishes_it_once(tmp_path, launched):
    """kill -9 of the follower while `serve` runs a durable batch and an online stream:
    process 0's health turns NOT_SERVING, the open stream ends with an error, process 0
    exits non-zero within a bound; a restart of both processes finishes the batch with
    exactly one result per item, the tokens of one process."""
    from grpc_health.v1 import health_pb2

    from conserve_jax.client import Client

    data = [tmp_path / "data0", tmp_path / "data1"]
    leader, follower, grpc_port = serve_pair(launched, free_port(), data, *BATCH_ENGINE)
    target = f"127.0.0.1:{grpc_port}"
    health, stream_end = [], []
    threads = [threading.Thread(target=watch_health, args=(target, health), daemon=True)]
    with Client(target) as c:
        bid = c.submit_batch(batch_items())
        assert wait_until(lambda: c.stats()["offline_tokens_total"] >= N_ITEMS, 300, 0.02)
        threads.append(threading.Thread(target=stream_to_end, args=(c, 150, stream_end),
                                        daemon=True))
        for t in threads:
            t.start()
        assert wait_until(lambda: c.stats()["online_running"] == 1 and bool(health), 60, 0.01)
        follower.proc.kill()
        code = leader.wait(timeout=120)  # a bound, not a speed target: a hang fails
        for t in threads:
            t.join(timeout=30)
    assert follower.wait(timeout=30) != 0
    assert code == EXIT_ENGINE_FAILED, leader.log()
    assert "health NOT_SERVING" in leader.log()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health, health
    assert stream_end and stream_end[0] not in ("length", "stop"), stream_end
    leader, follower, grpc_port = serve_pair(launched, free_port(), data, *BATCH_ENGINE)
    with Client(f"127.0.0.1:{grpc_port}") as c:
        results = list(c.batch_results(bid, timeout=300))
    stop_pair(leader, follower)
    assert [r.index for r in results] == list(range(N_ITEMS))
    assert [list(r.token_ids) for r in results] == batch_reference()
