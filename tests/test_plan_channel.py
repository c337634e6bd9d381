"""The leader -> follower plan channel without processes: a step's padded batch arrays
survive encoding bit for bit, messages arrive in order over a key-value store (a dict
here), old ones are deleted, a follower waits through timeouts, and a follower that is
told to resume an iteration it never abandoned refuses; the start-up fingerprint names
the fields that differ."""
from __future__ import annotations

import numpy as np
import pytest

from conserve_jax.config import EngineConfig
from conserve_jax.runtime import plan_channel as pc
from conserve_jax.runtime.batch_arrays import build_batch
from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.runtime.distributed import differences
from conserve_jax.runtime.follower import Follower
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan


class FakeStore:
    """The coordinator's key-value store as the channel uses it."""

    def __init__(self, timeouts: int = 0) -> None:
        self.data: dict[str, bytes] = {}
        self.timeouts = timeouts

    def key_value_set_bytes(self, key, value):
        assert key not in self.data
        self.data[key] = value

    def key_value_delete(self, key):
        del self.data[key]

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        if self.timeouts:
            self.timeouts -= 1
            raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out")
        return self.data[key]


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


def test_messages_arrive_in_order_and_old_ones_are_deleted():
    store = FakeStore(timeouts=2)
    leader, follower = pc.PlanChannel(store, True, 5), pc.PlanChannel(store, False, 5)
    b = _batch()
    for i in range(pc.KEEP + 3):
        leader.send_execute(b, 0, True, i)
        leader.send_decision(1, i % 2 == 0)
    leader.send_stop()
    assert len(store.data) == pc.KEEP  # the newest KEEP messages only
    store2 = FakeStore(timeouts=2)  # a follower reading as the leader writes
    leader, follower = pc.PlanChannel(store2, True, 5), pc.PlanChannel(store2, False, 5)
    leader.send_execute(b, 0, True, 1)
    leader.send_decision(1, True)
    leader.send_stop()
    assert follower.recv().ints["iteration"] == 1  # after two timeouts
    assert follower.recv_decision(1) is True
    assert follower.recv().op == pc.OP_STOP


def test_a_decision_out_of_turn_is_an_error():
    store = FakeStore()
    leader, follower = pc.PlanChannel(store, True, 5), pc.PlanChannel(store, False, 5)
    leader.send_stop()
    with pytest.raises(RuntimeError, match="expected the safepoint decision"):
        follower.recv_decision(1)


def test_follower_refuses_to_resume_an_unknown_iteration():
    store = FakeStore()
    leader, follower = pc.PlanChannel(store, True, 5), pc.PlanChannel(store, False, 5)
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
