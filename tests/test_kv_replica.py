"""Multi-process KV checkpoints without processes: a follower that replays the checkpointer
calls process 0's `LeaderCheckpointer` sent ends with the same host-pool bookkeeping
(slots per request, free slots, skipped copies) and restores the same blocks, through
growing requests, prefix-hit gaps, a full pool, releases and restores; iterations that
complete no block send nothing."""
from __future__ import annotations

import numpy as np

from conserve_jax.kv.checkpointer import KVCheckpointer
from conserve_jax.runtime.kv_replica import FollowerCheckpointer, HeadSplit, LeaderCheckpointer

BLOCK = (1, 2, 1, 4, 2)  # layers, K/V, heads, block size, head dim


class FakeTransfer:
    """Device caches as a numpy array of blocks; the `KVTransfer` interface."""

    block_size, dtype, block_shape, max_blocks_per_call = 4, np.float32, BLOCK, 4

    def __init__(self, seed: int) -> None:
        self.cache = np.random.default_rng(seed).standard_normal((32, *BLOCK)).astype(np.float32)

    def padded_count(self, n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    def gather(self, ids):
        ids = list(ids) + [0] * (self.padded_count(len(ids)) - len(ids))
        return np.moveaxis(self.cache[ids], 0, 3)  # [L, 2, kvh, n, bs, hd]

    def scatter(self, ids, blocks):
        self.cache[list(ids)] = blocks[: len(ids)]


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list = []

    def send_kv(self, method, args):
        self.sent.append((method, args))


def test_a_follower_replaying_the_leaders_calls_keeps_the_same_pool():
    block_bytes = int(np.prod(BLOCK)) * 4
    channel = FakeChannel()
    lt = FakeTransfer(0)
    leader = LeaderCheckpointer(lt, 6 * block_bytes, channel, HeadSplit(((0, 1),), 0, 1),
                                warmup=False)
    follower = FollowerCheckpointer(runner=None)
    ft = FakeTransfer(0)  # same cache contents: what each process's heads would hold
    follower.ckpt = KVCheckpointer(ft, 6 * block_bytes)
    assert channel.sent == [("open", [6 * block_bytes, False])]
    channel.sent.clear()

    a, b, c = [3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]
    leader.checkpoint_new_blocks([("a", a, 2, 0)])  # no block complete yet: a's first call
    leader.checkpoint_new_blocks([("a", a, 3, 0)])  # still none
    assert [m for m, _ in channel.sent] == ["checkpoint_new_blocks"]
    leader.checkpoint_new_blocks([("a", a, 9, 0), ("b", b, 12, 1)])  # b: block 0 a prefix hit
    leader.checkpoint_new_blocks([("a", a, 10, 0), ("b", b, 12, 1)])  # nothing new
    leader.checkpoint_new_blocks([("c", c, 16, 0)])  # 4 blocks > 2 free: skipped
    leader.release("a")
    leader.checkpoint_new_blocks([("c", c, 16, 0), ("a", a, 16, 0)])  # c fits, a not
    leader.restore("b", [20, 21], first=1)
    leader.release("zz")  # unknown: nothing to tell
    leader.wait_pending()
    for method, args in channel.sent:
        follower.apply(method, args)
    follower.ckpt.wait_pending()

    f = follower.ckpt
    assert f._slots == leader._slots
    assert sorted(f.pool._free) == sorted(leader.pool._free)
    assert f.counters == leader.counters
    assert leader.counters.blocks_skipped_pool_full == 8 and leader.counters.blocks_restored == 2
    assert [m for m, _ in channel.sent] == ["checkpoint_new_blocks"] * 3 + [
        "release", "checkpoint_new_blocks", "restore"]
    np.testing.assert_array_equal(ft.cache[[20, 21]], lt.cache[[20, 21]])
    np.testing.assert_array_equal(lt.cache[[20, 21]], lt.cache[[8, 9]])
    leader.close()
    follower.close()
