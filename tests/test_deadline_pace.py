"""`OfflinePace` (issue 27's estimates): the offline generation pace from finished items
and from items generating now; the median, its lower quartile (the fast end) and a
batch's own fastest; `fast_end`, the lead and served-first paces."""
from __future__ import annotations

import pytest

from conserve_server.batch.deadline_pace import (LIVE_MIN_TOKENS, MIN_DUTY, ItemProgress,
                                                 OfflinePace, fast_end)


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
