"""The leader -> follower plan channel without processes: a step's padded batch arrays
survive encoding bit for bit, messages arrive in order, a follower refuses a decision out of
turn and a resume of an iteration it never abandoned, the stop is best effort and closes the
channel; the start-up fingerprint names the fields that differ. (The TCP transport itself:
tests/test_plan_socket.py.)"""
from __future__ import annotations

import collections

import numpy as np
import pytest

from conserve_jax.config import EngineConfig
from conserve_jax.runtime import plan_channel as pc
from conserve_jax.runtime.batch_arrays import build_batch
from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.runtime.distributed import differences
from conserve_jax.runtime.follower import Follower
from conserve_jax.runtime.plan_socket import PlanChannelClosed
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan


class FakePipe:
    """Both ends of the transport in one object: frames in a queue."""

    def __init__(self, closed: bool = False) -> None:
        self.frames: collections.deque = collections.deque()
        self.closed = closed
        self.close_calls = 0

    def send(self, data, wait_s=None):
        if self.closed:
            raise PlanChannelClosed("plan channel: process 1 closed its connection")
        self.frames.append(data)

    def recv(self):
        return self.frames.popleft()

    def close(self):
        self.close_calls += 1


def _batch():
    buckets = BucketSet.build(4, 32, 1, 16, 16)
    spec = SampleSpec(0.7, 5, 0.9, 1234567, 3, 2)
    plan = StepPlan(decodes=[DecodeItem(7, 9, [1, 2, 3], spec)],
                    prefills=[PrefillItem(list(range(10, 22)), 4, [4, 5, 6, 7], spec)])
    return build_batch(plan, buckets, 4)


def test_batch_arrays_survive_encoding():
    b = _batch()
    msg = pc.decode(pc.encode(pc.Message(pc.OP_EXECUTE, {"num_top": 20, "safepoints": 1,
                                                         "iteration": 3}, b)))
    assert msg.op == pc.OP_EXECUTE and msg.ints["num_top"] == 20 and msg.ints["iteration"] == 3
    got = msg.batch
    for name in pc._BATCH:
        a, g = getattr(b, name), getattr(got, name)
        assert a.dtype == g.dtype and np.array_equal(a, g), name
    for name in pc._ROWS:
        a, g = getattr(b.sampling, name), getattr(got.sampling, name)
        assert a.dtype == g.dtype and np.array_equal(a, g), name
    assert (got.num_sampled, got.shape_key) == (b.num_sampled, b.shape_key)


def test_messages_arrive_in_order():
    pipe = FakePipe()
    leader, follower = pc.PlanChannel(pipe, True, 5), pc.PlanChannel(pipe, False, 5)
    b = _batch()
    for i in range(3):
        leader.send_execute(b, 0, True, i)
        leader.send_decision(1, i % 2 == 0)
    leader.send_kv("save", [1, [2, 3]])
    leader.send_stop()
    assert leader.sent_bytes == sum(len(f) for f in pipe.frames)
    for i in range(3):
        assert follower.recv().ints["iteration"] == i
        assert follower.recv_decision(1) is (i % 2 == 0)
    kv = follower.recv()
    assert (kv.op, kv.ints) == (pc.OP_KV, {"method": "save", "args": [1, [2, 3]]})
    assert follower.recv().op == pc.OP_STOP
    assert pipe.close_calls == 1  # the stop closes the leader's end


def test_the_stop_to_a_dead_follower_is_logged_not_raised(caplog):
    pipe = FakePipe(closed=True)
    leader = pc.PlanChannel(pipe, True, 5)
    with pytest.raises(PlanChannelClosed):
        leader.send_decision(1, False)  # any other send raises
    leader.send_stop()
    assert "did not reach every follower" in caplog.text and pipe.close_calls == 1


def test_a_decision_out_of_turn_is_an_error():
    pipe = FakePipe()
    leader, follower = pc.PlanChannel(pipe, True, 5), pc.PlanChannel(pipe, False, 5)
    leader.send_stop()
    with pytest.raises(RuntimeError, match="expected the safepoint decision"):
        follower.recv_decision(1)


def test_follower_refuses_to_resume_an_unknown_iteration():
    pipe = FakePipe()
    leader, follower = pc.PlanChannel(pipe, True, 5), pc.PlanChannel(pipe, False, 5)
    leader.send_resume(_batch(), 0, False, 42)
    f = Follower(runner=None, channel=follower)
    with pytest.raises(RuntimeError, match="iteration 42"):
        f.step(follower.recv())


def test_fingerprint_differences_name_the_fields():
    assert differences({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 4}) == ["b: 2 != 4",
                                                                       "c: 3 != None"]


def test_multiprocess_fields_are_checked():
    with pytest.raises(ValueError, match="coordinator_address"):
        EngineConfig(num_processes=2)
    with pytest.raises(ValueError, match="process_id"):
        EngineConfig(num_processes=2, process_id=2, coordinator_address="h:1")
    EngineConfig(num_processes=2, process_id=1, coordinator_address="h:1")
