"""Pipeline parallelism across processes (`EngineConfig.pp`, runtime/pipeline_*.py): two
processes x 2 CPU devices, each a stage of the model's layers at tp 2 over its own devices.
`LLM.generate` and `serve` give the greedy tokens and top logprobs of one process (tp 4
and tp 1); the first stage's safepoints abandon and resume an iteration; a killed or
stopped stage makes process 0 turn health NOT_SERVING, end the open stream with an error
and exit with EXIT_ENGINE_FAILED within a bound; offline KV checkpoints per stage (evict,
restore) give one process's tokens; a SIGTERM mid-batch saves the items' tokens and KV
(every stage's layers joined) and a restart of both processes finishes the batch with one
process's tokens. Refused (no processes): pp without one process per stage.

Processes are launched as in tests/test_multiprocess.py (its helpers: free ports, hard
timeouts, everything still running killed at the end)."""
from __future__ import annotations

import json
import signal
import socket
import threading

import numpy as np
import pytest

from conserve_server.main import EXIT_ENGINE_FAILED
from tests.conftest_server import wait_until
from tests.multiprocess_worker import ENGINE, PROMPTS, outputs_json, sampling
from tests.test_multiprocess import (SERVE_ENGINE, free_port, launched, run_workers,  # noqa: F401
                                     serve_pair, stop_pair, stream_to_end, watch_health)

PP = json.dumps({"pp": 2, "policy": "fcfs"})
PP_SERVE = [*SERVE_ENGINE, "--pp", "2", "--policy", "fcfs"]


# ---- no processes -------------------------------------------------------------------------
def test_stage_layers_split_the_model():
    from conserve_jax.runtime.pipeline_stage import stage_layers

    assert [stage_layers(4, 2, s) for s in range(2)] == [(0, 2), (2, 4)]
    assert [stage_layers(5, 2, s) for s in range(2)] == [(0, 3), (3, 5)]
    assert [stage_layers(7, 3, s) for s in range(3)] == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="at least 3 layers"):
        stage_layers(2, 3, 0)


def test_a_stage_per_process_or_refused():
    from conserve_jax.engine_args import engine_config

    with pytest.raises(ValueError, match="num_processes must equal pp"):
        engine_config(pp=2)
    with pytest.raises(ValueError, match="num_processes must equal pp"):
        engine_config(pp=2, coordinator_address="127.0.0.1:1", num_processes=3)
    with pytest.raises(ValueError, match="pp must be >= 1"):
        engine_config(pp=0)
    assert engine_config(pp=2, coordinator_address="127.0.0.1:1", num_processes=2).pp == 2


def test_step_and_sampled_frames_cross_a_link():
    """A step frame (batch + hidden rows) and the last stage's reply, byte for byte."""
    from conserve_jax.runtime.pipeline_frames import (OP_ERROR, OP_SAMPLED, OP_STEP, Sampled,
                                                      decode_frame, encode_frame, error_frame,
                                                      hidden_rows, step_frame)
    from conserve_jax.runtime.pipeline_link import StageLink
    from conserve_jax.runtime.plan_channel import Message
    from conserve_jax.runtime.plan_socket import PlanChannelClosed
    from tests.test_pipeline_stage import step_and_reply

    batch, hidden, reply = step_and_reply()
    a, b = socket.socketpair()
    left, right = StageLink(a, "right"), StageLink(b, "left")
    left.send(step_frame(batch, 2, 9, hidden))
    msg, tail = decode_frame(right.recv())
    assert msg.op == OP_STEP and msg.ints["num_top"] == 2 and msg.ints["iteration"] == 9
    assert np.array_equal(hidden_rows(tail, 8, np.float32), hidden)
    assert np.array_equal(msg.batch.dec_tables, batch.dec_tables)
    assert msg.batch.num_sampled == 2
    right.send(encode_frame(Message(OP_SAMPLED, {}), reply.encode(0.25)))
    msg, tail = decode_frame(left.recv())
    back, seconds = Sampled.decode(tail)
    assert msg.op == OP_SAMPLED and seconds == 0.25
    for x, y in zip(back.arrays(), reply.arrays()):
        assert np.array_equal(x, y)
    right.send(error_frame(1, "ValueError: boom"))
    msg, _ = decode_frame(left.recv())
    assert msg.op == OP_ERROR and msg.ints == {"stage": 1, "error": "ValueError: boom"}
    right.close()
    with pytest.raises(PlanChannelClosed, match="left|right"):
        left.recv()
    left.close()


# ---- two processes ------------------------------------------------------------------------
def reference(tp: int) -> list[dict]:
    from conserve_jax.entrypoints.llm import LLM

    with LLM(**{**ENGINE, "policy": "fcfs"}, tp=tp) as llm:
        return outputs_json(llm.generate(PROMPTS, sampling()))


def assert_same_outputs(got: list[dict], ref: list[dict]) -> None:
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in ref]
    for g, r in zip(got, ref):
        assert len(g["logprobs"]) == len(r["logprobs"]) == len(g["token_ids"])
        for (gt, glp, gtop), (rt, rlp, rtop) in zip(g["logprobs"], r["logprobs"]):
            assert gt == rt and glp == pytest.approx(rlp, abs=1e-4)
            assert [t for t, _ in gtop] == [t for t, _ in rtop] and len(gtop) == 3
            assert [v for _, v in gtop] == pytest.approx([v for _, v in rtop], abs=1e-4)


@pytest.mark.slow
def test_two_stages_generate_the_tokens_of_one_process(tmp_path, launched):  # noqa: F811
    got = run_workers(launched, tmp_path / "out.json", "--engine", PP)
    assert all(len(o["token_ids"]) == 12 for o in got)
    for tp in (4, 1):
        assert_same_outputs(got, reference(tp))


@pytest.mark.slow
def test_an_iteration_abandoned_at_the_stage_boundary_resumes(tmp_path, launched):  # noqa: F811
    """random:tiny has 2 layers, so stage 0 is layer 0 and its only safepoint is the stage
    boundary: abandoned there (nothing forwarded), resumed, and again with the decode rows
    cut loose: the tokens of the straight run."""
    got = run_workers(launched, tmp_path / "runner.json", "--mode", "runner", "--engine", PP)
    assert len(got["straight"]) == 3
    assert got["resumed"] == got["straight"]
    assert got["detached"][-1] == got["straight"][-1]


@pytest.mark.slow
def test_serve_over_two_stages(tmp_path, launched):  # noqa: F811
    """`serve --pp 2`: process 0 answers gRPC with one process's tokens and logprobs;
    SIGTERM on process 0 ends both with 0."""
    from conserve_jax.client import Client

    leader, follower, grpc_port = serve_pair(
        launched, free_port(), [tmp_path / "data0", tmp_path / "data1"], *PP_SERVE)
    got = []
    with Client(f"127.0.0.1:{grpc_port}") as c:
        for ids in PROMPTS:
            chunks = list(c.generate(token_ids=ids, max_tokens=12, temperature=0.0,
                                     ignore_eos=True, logprobs=3))
            got.append({"token_ids": [t for ch in chunks for t in ch.token_ids],
                        "logprobs": [[lp.token_id, lp.logprob, [list(t) for t in lp.top]]
                                     for ch in chunks for lp in ch.logprobs]})
    stop_pair(leader, follower)
    assert_same_outputs(got, reference(4))


@pytest.mark.slow
@pytest.mark.parametrize("sig, said", [
    (signal.SIGKILL, "closed the connection"),  # the link to the dead stage closes
    (signal.SIGSTOP, "step timed out")],  # its sockets stay open: the step watchdog
    ids=["dies", "hangs"])
def test_serve_leader_fails_cleanly_when_a_stage_fails(tmp_path, launched, sig, said):  # noqa: F811
    """Stage 1 killed (or stopped) under `serve --pp 2` while a stream runs: process 0's
    health turns NOT_SERVING, the stream ends with an error, process 0 exits with
    EXIT_ENGINE_FAILED (a bound, not a speed target); stage 1, continued, exits non-zero."""
    from grpc_health.v1 import health_pb2

    from conserve_jax.client import Client

    leader, follower, grpc_port = serve_pair(
        launched, free_port(), [tmp_path / "data0", tmp_path / "data1"], *PP_SERVE)
    target = f"127.0.0.1:{grpc_port}"
    health, stream_end = [], []
    watcher = threading.Thread(target=watch_health, args=(target, health), daemon=True)
    watcher.start()
    with Client(target) as c:
        first = list(c.generate(token_ids=PROMPTS[0], max_tokens=4, temperature=0.0))
        assert first and first[-1].finish_reason == "length"  # both stages serve
        assert wait_until(lambda: bool(health), 30, 0.01)
        follower.proc.send_signal(sig)
        t = threading.Thread(target=stream_to_end, args=(c, 40, stream_end), daemon=True)
        t.start()
        code = leader.wait(timeout=180)
        t.join(timeout=30)
    watcher.join(timeout=30)
    if sig == signal.SIGSTOP:
        follower.proc.send_signal(signal.SIGCONT)
    follower_code = follower.wait(timeout=180)
    assert code == EXIT_ENGINE_FAILED, leader.log()
    assert said in leader.log() and "health NOT_SERVING" in leader.log(), leader.log()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health, health
    assert stream_end and stream_end[0] not in ("length", "stop"), stream_end
    assert follower_code != 0, follower.log()


@pytest.mark.slow
def test_offline_kv_checkpoints_across_stages(tmp_path, launched):  # noqa: F811
    """conserve under `--pp 2`: online arrivals evict offline requests (each stage copies
    its own layers' KV to its own host pool) and preempt offline iterations at process 0's
    safepoints; the evicted requests resume from host on every stage. Tokens equal one
    process's (tp 4) with every request alone."""
    from conserve_jax.engine_args import engine_config
    from tests.multiprocess_worker import COSERVE, coserve_mix

    got = run_workers(launched, tmp_path / "mix.json", "--mode", "coserve", "--engine",
                      json.dumps({"pp": 2}))
    assert got["evictions"] > 0 and got["restored_tokens"] > 0 and got["blocks_restored"] > 0
    assert got["host_slots_used"] == 0  # every slot released
    alone = coserve_mix(engine_config(**{**COSERVE, "policy": "fcfs", "num_blocks": 512}, tp=4))
    assert got["tokens"] == alone["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["conserve", "fcfs"])
def test_sigterm_restart_resumes_a_batch_over_two_stages(tmp_path, launched, policy):  # noqa: F811
    """SIGTERM on process 0 mid-batch under `--pp 2`: each item's tokens and (conserve)
    KV, every stage's layers joined into one checkpoint in process 0's data dir, are saved
    (fcfs: no KV checkpoints, tokens only); both processes exit 0; a restart of both resumes
    every item from there (fcfs: recomputing its KV) and finishes the batch with one
    process's tokens, one result per item."""
    import os

    from tests.test_multiprocess import (BATCH_ENGINE, N_ITEMS, batch_reference,
                                         sigterm_and_restart)

    data = [tmp_path / "data0", tmp_path / "data1"]
    results, stats, leader = sigterm_and_restart(launched, data, *BATCH_ENGINE, "--pp", "2",
                                                 "--policy", policy)
    assert sum("resumes:" in line for line in leader.err) == N_ITEMS, leader.log()
    assert (stats["restored_tokens"] > 0) == (policy == "conserve")
    assert [r.index for r in results] == list(range(N_ITEMS))
    assert [list(r.token_ids) for r in results] == batch_reference()
    assert os.listdir(data[0] / "offline-kv") == []
