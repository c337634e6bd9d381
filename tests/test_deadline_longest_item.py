"""A batch is done when its longest item is (issue 27's estimates): the tracker records the
expected output of the longest item at submission and takes the batch's tail from it, not
from the mean item (bench_deadlines, full runs: a tight job of 6 items expecting 78-123
tokens, 99.5 on average, read its tail a fifth short)."""
from __future__ import annotations

import pytest

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.base import BatchWork
from conserve_server.batch.deadline_pace import ItemProgress
from tests.test_deadline_tracker import harvest, setup  # noqa: F401  (fixture)


def two_items(short=10, long=40):
    out = []
    for i, hint in enumerate((short, long)):
        r = pb.GenerateRequest(request_id=f"r{i}", sampling=pb.SamplingParams(max_tokens=64),
                               expected_output_tokens=hint)
        out.append((r, list(range(3, 13))))  # 10 prompt tokens each
    return out


def paces(tr):
    for tpot in (0.5, 1.0, 2.0):  # median 1 s a token, lower quartile 0.5 s (served first)
        tr.observe_length(pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=20)),
                          [3, 4], "t", 20, tpot_s=tpot)


def test_the_tail_is_the_longest_items(setup):  # noqa: F811
    store, eng, clock, tr = setup
    eng.st.offline_running = 2  # the engine runs two offline items at once
    harvest(eng, clock, tr, 10, 10)  # 10 units a second
    paces(tr)
    work, refusal = tr.judge(two_items(), "t", clock.t + 1000, "deadline")
    assert (work.prompt_tokens, work.output_tokens, work.longest_output_tokens) == (20, 50, 40)
    # its 20 prompt units at 10 a second, then the 40-token item at 0.5 s a token (items
    # alike: 25), the other item's output beside it
    assert refusal is None and work.estimate_at - clock.t == pytest.approx(2.0 + 40 * 0.5)
    b, _ = store.create_batch("t", two_items(), clock.t + 1000, work=work)
    tr.tick(in_engine={})
    assert tr.estimate_of(b).finish_at - clock.t == pytest.approx(2.0 + 40 * 0.5)
    # both generating, 30 and 5 tokens in: the one 5 in may be the long one (35 left)
    tr.tick(in_engine={b: 2}, progress={b: [ItemProgress(30), ItemProgress(5)]})
    assert tr.estimate_of(b).finish_at - clock.t == pytest.approx(35 * 0.5)
    # one item at a time: only half the output comes during the tail; the work left is
    # counted alike (25 - 30 -> a quarter of 25 left, 25 - 5 = 20)
    eng.st.offline_running = 1
    tr.tick(in_engine={b: 2}, progress={b: [ItemProgress(30), ItemProgress(5)]})
    assert tr.estimate_of(b).finish_at - clock.t == pytest.approx((6.25 + 20) / 2 / 10
                                                                  + 35 * 0.5)


def test_a_batch_without_its_longest_item_takes_its_items_alike(setup):  # noqa: F811
    """A batch stored before the longest item was recorded (0) keeps the mean item."""
    store, eng, clock, tr = setup
    eng.st.offline_running = 2
    harvest(eng, clock, tr, 10, 10)
    paces(tr)
    b, _ = store.create_batch("t", two_items(), clock.t + 1000,
                              work=BatchWork(prompt_tokens=20, output_tokens=50))
    tr.tick(in_engine={})
    assert tr.estimate_of(b).finish_at - clock.t == pytest.approx(2.0 + 25 * 0.5)
