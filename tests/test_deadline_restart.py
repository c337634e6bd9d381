"""Expiry exactly once across restarts (issue 27, item 5 of "What to build"), through the
real CLI process on the mock model: a batch is interrupted mid-way (kill -9, or SIGTERM)
and the server comes back only after its deadline has passed. The restarted server expires
it: every item has exactly one record, the results committed before the stop unchanged and
an error record (batch deadline exceeded, OpenAI's batch_expired) for every other item, and
the expiry is counted as a deadline miss by the restarted server."""
from __future__ import annotations

import signal
import sqlite3
import time

import pytest

from conserve_jax.client import Client
from tests.conftest_server import echo_text, spawn_server, wait_until

N = 30
# 3 items in flight, 20 tokens at 40 ms each: the batch needs about 8 s, its deadline is 5 s
SLOW = ("--mock-token-delay", "0.04", "--max-num-seqs", "3", "--batch-in-flight", "3",
        "--drain-timeout", "0.5")
DEADLINE_S = 5.0


def _rows(data_dir, bid):
    with sqlite3.connect(str(data_dir / "batches.sqlite3")) as db:
        return db.execute("SELECT idx, state, outcome FROM items WHERE batch_id=? ORDER BY idx",
                          (bid,)).fetchall()


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_batch_expires_exactly_once_after_a_restart_past_its_deadline(tmp_path, how):
    data = tmp_path / "data"
    proc, port = spawn_server(data, *SLOW)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            bid = c.submit_batch([{"prompt": f"q{i:02d}", "max_tokens": 20} for i in range(N)],
                                 deadline=DEADLINE_S)
            deadline = c.get_batch(bid).deadline
            assert wait_until(lambda: c.get_batch(bid).done >= 3, timeout=10)
            proc.send_signal(signal.SIGKILL if how == "kill9" else signal.SIGTERM)
            assert proc.wait(timeout=15) == (-signal.SIGKILL if how == "kill9" else 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    before = {idx: outcome for idx, state, outcome in _rows(data, bid) if state == "done"}
    assert 3 <= len(before) < N, "the stop must land mid-batch"
    # the server stays down until the deadline has passed
    assert wait_until(lambda: time.time() > deadline + 0.2, timeout=DEADLINE_S + 5)

    proc, port = spawn_server(data, "--mock-token-delay", "0.002")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            assert wait_until(lambda: c.get_batch(bid).done == N, timeout=15)
            info = c.get_batch(bid)
            results = list(c.batch_results(bid, timeout=10))
            assert wait_until(lambda: c.stats()["deadline_missed"] == 1, timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert (info.state, info.error, info.total) == ("expired", "batch deadline exceeded", N)
    assert [r.index for r in results] == list(range(N))  # exactly one record per item
    for r in results:
        if r.index in before:  # committed before the stop: kept as it was
            assert r.finish_reason == "length" and r.text == echo_text(f"q{r.index:02d}", 20)
        else:
            assert r.finish_reason == "error" and r.error == "batch deadline exceeded"
    assert info.failed == N - len(before)
    rows = _rows(data, bid)
    assert len(rows) == N and all(state == "done" for _, state, _ in rows)
