"""Durability through the real CLI process: kill -9 mid-batch and restart on the same data
dir (no result lost or duplicated), and SIGTERM (exit 0, batch state persisted)."""
from __future__ import annotations

import itertools
import signal
import sqlite3


from conserve_jax.client import Client
from tests.conftest_server import echo_text, spawn_server, wait_until

N = 40
# 4 items in flight, 7-13 tokens at 40 ms each: the batch takes about 4 s. Lengths differ
# so items finish one at a time and there is always work in the engine when it is killed.
SLOW = ("--mock-token-delay", "0.04", "--max-num-seqs", "4", "--batch-in-flight", "4")


def _max_tokens(i):
    return 7 + i % 7


def _requests():
    return [{"prompt": f"q{i:02d}", "max_tokens": _max_tokens(i)} for i in range(N)]


def _expected(i):
    return echo_text(f"q{i:02d}", _max_tokens(i))


def _db_rows(data_dir, bid):
    with sqlite3.connect(str(data_dir / "batches.sqlite3")) as db:
        return db.execute("SELECT idx, state, attempts FROM items WHERE batch_id=? ORDER BY idx",
                          (bid,)).fetchall()


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_kill9_mid_batch_then_restart_loses_and_duplicates_nothing(tmp_path):
    data = tmp_path / "data"
    proc, port = spawn_server(data, *SLOW)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            bid = c.submit_batch(_requests())
            assert wait_until(lambda: c.get_batch(bid).done >= 8, timeout=10)
            before = list(itertools.islice(c.batch_results(bid, timeout=5), 3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        _stop(proc)
    rows = _db_rows(data, bid)
    done_at_crash = sum(1 for _, state, _ in rows if state == "done")
    assert 8 <= done_at_crash < N, "the kill must land mid-batch"
    assert any(state == "running" for _, state, _ in rows), "some items were in the engine"

    proc, port = spawn_server(data, "--mock-token-delay", "0.002")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            results = list(c.batch_results(bid, timeout=30))
            info = c.get_batch(bid)
            # committed results survive the crash unchanged
            again = list(itertools.islice(c.batch_results(bid), 3))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert [r.index for r in results] == list(range(N))  # each index exactly once, none lost
    assert all(r.text == _expected(r.index) and r.finish_reason == "length" for r in results)
    assert [(r.index, r.text, r.token_ids) for r in again] == \
        [(r.index, r.text, r.token_ids) for r in before]
    assert (info.state, info.done, info.failed, info.total) == ("completed", N, 0, N)
    rows = _db_rows(data, bid)
    assert len(rows) == N and all(state == "done" for _, state, _ in rows)
    assert any(attempts == 2 for _, _, attempts in rows), "interrupted items ran again"


def test_sigterm_exits_zero_and_persists_batch_state(tmp_path):
    data = tmp_path / "data"
    proc, port = spawn_server(data, *SLOW, "--drain-timeout", "1.0")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            bid = c.submit_batch(_requests())
            assert wait_until(lambda: c.get_batch(bid).done >= 4, timeout=10)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
    finally:
        _stop(proc)
    rows = _db_rows(data, bid)
    done = sum(1 for _, state, _ in rows if state == "done")
    assert 4 <= done < N
    # nothing is left claimed: in-flight items either finished within the drain window
    # or were handed back to run again
    assert {state for _, state, _ in rows} <= {"done", "pending"}

    proc, port = spawn_server(data, "--mock-token-delay", "0.0")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            results = list(c.batch_results(bid, timeout=30))
            assert c.get_batch(bid).state == "completed"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert [r.index for r in results] == list(range(N))
    assert all(r.text == _expected(r.index) for r in results)
