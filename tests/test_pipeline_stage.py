"""The pipeline probe's stage link (conserve_jax/bench/pipeline_stage.py): a step frame and
a reply survive the trip over a real localhost connection, byte for byte. No model."""
import threading

import numpy as np

from conserve_jax.bench.pipeline_stage import (Sampled, StageLink, decode_step,
                                               encode_step)
from conserve_jax.bench.worker_procs import free_port
from conserve_jax.runtime.batch_arrays import build_batch
from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.runtime.step_plan import DecodeItem, SampleSpec, StepPlan


def step_and_reply():
    """A two-decode batch, its hidden rows [T, 8] and a last stage's reply with top-2
    logprobs: what a stage link carries (also tests/test_pipeline.py's)."""
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, 2)
    plan = StepPlan(decodes=[DecodeItem(7, 20, [1, 2], spec), DecodeItem(9, 5, [3], spec)])
    batch = build_batch(plan, BucketSet.build(8, 64, 1, 4, 16), 16)
    hidden = np.random.default_rng(0).standard_normal((batch.shape_key, 8)).astype(np.float32)
    reply = Sampled(np.array([3, 4], np.int32), np.array([-0.5, -1.5], np.float32),
                    np.array([[3, 1], [4, 2]], np.int32),
                    np.array([[-0.5, -2.0], [-1.5, -3.0]], np.float32))
    return batch, hidden, reply


def test_step_and_reply_cross_the_link():
    batch, hidden, reply = step_and_reply()
    port, got = free_port(), {}

    def last_stage():
        link = StageLink.connect(port, 10.0)
        got["step"] = decode_step(link.recv(), 8, np.float32)
        link.send(reply.encode(0.25))
        got["stop"] = link.recv()
        link.close()

    t = threading.Thread(target=last_stage)
    t.start()
    link = StageLink.listen_and_accept(port, 10.0)
    link.send(encode_step(batch, 2, hidden))
    back, seconds = Sampled.decode(link.recv())
    link.send(b"")
    t.join(10)
    link.close()
    b, num_top, h = got["step"]
    assert num_top == 2 and np.array_equal(h, hidden) and got["stop"] == b""
    assert np.array_equal(b.token_ids, batch.token_ids)
    assert np.array_equal(b.dec_tables, batch.dec_tables) and b.num_sampled == 2
    assert seconds == 0.25
    for name in ("tokens", "chosen", "top_ids", "top_lp"):
        assert np.array_equal(getattr(back, name), getattr(reply, name))
