"""`OfflinePace` (issue 27's estimates): the offline generation pace from finished items
and from items generating now; the median, its lower quartile (the fast end) and a
batch's own fastest; `fast_end`, the lead and served-first paces, and the served-first
pace in a tracker's estimate."""
from __future__ import annotations

import pytest

from conserve_server.batch.deadline_pace import (LIVE_MIN_TOKENS, MIN_DUTY, ItemProgress,
                                                 OfflinePace, fast_end)
from tests.test_deadline_tracker import items, setup  # noqa: F401  (fixture)


def test_pace_from_finished_and_live_items():
    p = OfflinePace(samples=4)
    assert p.median() == 0.0 and p.lead() == 0.0  # nothing seen
    for t in (0.4, 0.2, None, 0.0, 0.8):  # None or 0: nothing to learn
        p.finished(t)
    assert p.median() == pytest.approx(0.4) and p.lead() == pytest.approx(0.2)
    # live items: one LIVE_MIN_TOKENS past its second token counts, a fresh one does not
    p.live({"b": [ItemProgress(20, 1.0 * LIVE_MIN_TOKENS, LIVE_MIN_TOKENS),
                  ItemProgress(3, 5.0, LIVE_MIN_TOKENS - 1)]})
    assert p.median() == pytest.approx(0.8) and p.own("b", 9.0) == pytest.approx(1.0)
    assert p.own("other", 9.0) == 9.0
    p.live({})  # they left: their samples go with them
    assert p.median() == pytest.approx(0.4) and p.own("b", 9.0) == 9.0
    for t in (0.1, 0.1, 0.1, 0.1):  # only the last `samples` finished items count
        p.finished(t)
    assert p.median() == pytest.approx(0.1)


def test_fast_end_and_the_served_first_pace():
    assert fast_end(0.0, None, None) == (0.0, 0.0)  # nothing known
    assert fast_end(0.3, None, 0.5) == (0.3, 0.3)  # item paces are wall time already
    assert fast_end(0.0, 0.1, None) == (0.1, 0.1)  # duty unknown: the period as it is
    assert fast_end(0.0, 0.1, 0.5) == pytest.approx((0.1, 0.2))
    assert fast_end(0.15, 0.1, 0.5) == pytest.approx((0.1, 0.15))  # the quartile if faster
    assert fast_end(0.0, 0.1, 0.01) == pytest.approx((0.1, 0.1 / MIN_DUTY))  # floored


def test_an_item_served_first_is_estimated_at_the_engine_offline_duty(setup):  # noqa: F811
    """The free iteration period is how long such an iteration takes, not how often one
    comes: where online work alone takes half the wall time, an item served first is
    estimated at twice the period, while hopeless keeps the fast end (optimistic)."""
    store, eng, clock, tr = setup
    eng.st.offline_waiting = 1
    for _ in range(7):  # 20 tokens a second; 10 free iterations of 0.05 s, busy 0.5 s of 1
        clock.t += 1.0
        eng.st.offline_tokens_total += 20
        eng.st.offline_free_iterations += 10
        eng.st.offline_free_s += 0.5
        eng.st.offline_busy_s += 0.5
        tr.tick()
    assert tr.meter.duty() == pytest.approx(0.5)
    p = tr.paces()
    assert p.lead == pytest.approx(0.05) and p.served == pytest.approx(0.1)
    w, _ = tr.judge(items(1, hint=20), "t", clock.t + 100, "deadline")
    # its 10 prompt tokens at 20 a second, then its 20 tokens at the served-first pace
    assert w.estimate_at - clock.t == pytest.approx((30 - 20) / 20 + 20 * 0.1)
    b, _ = store.create_batch("t", items(1, hint=20), clock.t + 100, work=w)
    j = tr._job(store.get(b), p)
    assert j.tail_s == pytest.approx(20 * 0.1) and j.tail_min_s == pytest.approx(20 * 0.05)

