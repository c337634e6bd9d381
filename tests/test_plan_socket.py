"""The plan channel's TCP transport (runtime/plan_socket.py) on 127.0.0.1, without JAX:
frames round-trip in order (empty, small, a megabyte) to every follower, the leader accepts
lazily at its first send, a follower that closed its socket makes the leader's next send
raise at once, a dead leader makes a follower's recv raise at once, a follower that stops
reading makes a send fail within its timeout, and a missing follower or a stranger's
connection does not hang the leader. Every blocking call runs under a hard bound."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from conserve_jax.runtime import plan_channel as pc
from conserve_jax.runtime.plan_socket import (HELLO, FollowerSocket, LeaderSockets,
                                              PlanChannelClosed)
from tests.test_plan_channel import _batch


def _pair(followers: int = 1, timeout_s: float = 5.0):
    leader = LeaderSockets.listen(followers, timeout_s, accept_timeout_s=5.0, host="127.0.0.1")
    ends = [FollowerSocket.connect("127.0.0.1", leader.port, pid, 5.0)
            for pid in range(1, followers + 1)]
    return leader, ends


def _bounded(fn, seconds: float):
    """fn() in a thread; its result or exception, or a failure if it takes longer."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    return out, time.monotonic() - t0


def test_frames_round_trip_in_order_to_every_follower():
    leader, ends = _pair(followers=2)
    frames = [b"", b"x", bytes(range(256)) * 7, b"\x00\xff" * (1 << 19)]
    got: dict = {}

    def read(i, end):
        got[i] = [end.recv() for _ in frames]
    readers = [threading.Thread(target=read, args=(i, e)) for i, e in enumerate(ends)]
    for r in readers:
        r.start()
    for f in frames:
        leader.send(f)
    for r in readers:
        r.join(10)
    assert got == {0: frames, 1: frames}
    assert sorted(leader.peers) == [1, 2]
    leader.close()
    for e in ends:
        e.close()


def test_plan_messages_over_sockets():
    leader, (end,) = _pair()
    tx, rx = pc.PlanChannel(leader, True, 5), pc.PlanChannel(end, False, 5)
    b = _batch()
    tx.send_execute(b, 3, True, 7)
    tx.send_decision(2, True)
    tx.send_stop()
    msg = rx.recv()
    assert msg.op == pc.OP_EXECUTE and msg.ints["iteration"] == 7
    assert (msg.batch.token_ids == b.token_ids).all()
    assert rx.recv_decision(2) is True
    assert rx.recv().op == pc.OP_STOP
    out, _ = _bounded(rx.recv, 5)  # the stop closed the leader's end
    assert isinstance(out.get("error"), PlanChannelClosed)
    rx.close()


def test_a_follower_that_closed_its_socket_fails_the_next_send_at_once():
    leader, (end,) = _pair()
    leader.send(b"first")
    assert end.recv() == b"first"
    end.close()  # the follower died
    time.sleep(0.1)  # the FIN reaches the leader
    out, took = _bounded(lambda: leader.send(b"next"), 5)
    assert isinstance(out.get("error"), PlanChannelClosed), out
    assert "process 1 closed" in str(out["error"]) and took < 1
    leader.close()


def test_a_closed_leader_fails_the_followers_recv_at_once():
    leader, (end,) = _pair()
    leader.send(b"only")
    assert end.recv() == b"only"
    threading.Timer(0.2, leader.close).start()
    out, took = _bounded(end.recv, 5)  # blocked in recv when the leader goes
    assert isinstance(out.get("error"), PlanChannelClosed), out
    assert "the leader" in str(out["error"]) and took < 3
    end.close()


def test_a_follower_that_stops_reading_fails_a_send_within_its_timeout():
    leader, (end,) = _pair(timeout_s=1.0)
    chunk = b"\x01" * (1 << 20)

    def flood():
        for _ in range(256):  # far beyond any socket buffer
            leader.send(chunk)
    out, took = _bounded(flood, 30)
    assert isinstance(out.get("error"), PlanChannelClosed), out
    assert "took no data" in str(out["error"])
    leader.close()
    end.close()


def test_a_missing_follower_or_a_stranger_does_not_hang_the_leader():
    leader = LeaderSockets.listen(1, 1.0, accept_timeout_s=1.0, host="127.0.0.1")
    stranger = socket.create_connection(("127.0.0.1", leader.port))
    stranger.sendall(HELLO.pack(9))  # not a process of this run
    out, took = _bounded(lambda: leader.send(b"x"), 10)
    assert isinstance(out.get("error"), PlanChannelClosed), out
    assert "followers connected within" in str(out["error"]) and took < 5
    stranger.close()
    # a follower that connects late is still accepted by the next send
    end = FollowerSocket.connect("127.0.0.1", leader.port, 1, 5.0)
    leader.send(b"late")
    assert end.recv() == b"late"
    leader.close()
    end.close()


def test_connecting_to_no_leader_gives_up_within_its_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    out, took = _bounded(lambda: FollowerSocket.connect("127.0.0.1", port, 1, 1.0), 10)
    assert isinstance(out.get("error"), PlanChannelClosed), out
    assert took < 5


@pytest.mark.parametrize("followers", [1, 3])
def test_frames_keep_order_under_many_small_sends(followers):
    leader, ends = _pair(followers=followers)
    n = 2000
    got: dict = {}

    def read(i, end):
        got[i] = [end.recv() for _ in range(n)]
    readers = [threading.Thread(target=read, args=(i, e)) for i, e in enumerate(ends)]
    for r in readers:
        r.start()
    for k in range(n):
        leader.send(k.to_bytes(4, "little") * (k % 5))
    for r in readers:
        r.join(20)
    want = [k.to_bytes(4, "little") * (k % 5) for k in range(n)]
    assert all(got[i] == want for i in range(followers))
    leader.close()
    for e in ends:
        e.close()
