"""The trace load-forecast analysis (conserve_jax/bench/load_forecast.py): the share of
start times whose next-L load is within a tolerance of the last-H load, on synthetic
arrivals whose answer is known, and the script end to end on the shipped trace."""
import json

import numpy as np
import pytest

from conserve_jax.bench import load_forecast as lf


def test_steady_arrivals_are_forecast_exactly():
    times = np.arange(0.0, 1000.0, 0.5)  # 2 a second, forever
    rows = lf.forecast_table(times, {"requests": np.ones(len(times))}, [20.0, 50.0],
                             [10.0, 40.0], 0.25, 5.0)
    assert len(rows) == 4
    for r in rows:
        assert r["within"] == 1.0 and r["ratio_p50"] == pytest.approx(1.0, abs=0.06)
        assert r["no_history"] == 0


def test_a_load_that_doubles_is_missed_where_the_future_sees_the_step():
    # 1 a second until t=500, then 2 a second: the forecast misses by up to 2x for starts
    # whose future (s in (400, 500)) or history (s in [500, 600)) straddles the step
    times = np.concatenate([np.arange(0.0, 500.0, 1.0), np.arange(500.0, 1000.0, 0.5)])
    (row,) = lf.forecast_table(times, {"requests": np.ones(len(times))}, [100.0], [100.0],
                               0.25, 1.0)
    starts = np.arange(100.0, times.max() - 100.0, 1.0)
    assert row["starts"] == len(starts)
    # within 25 %: s <= 425 (at most a quarter of the future past the step) and s >= 560
    # (at least three fifths of the history past it), 326 + 340 of 800 starts
    assert row["within"] == pytest.approx(666 / 800)
    assert row["ratio_p90"] > 1.5 and row["ratio_p10"] == pytest.approx(1.0, abs=0.02)


def test_weights_count_tokens_not_requests():
    times = np.arange(0.0, 400.0, 1.0)
    w = np.where(times < 200, 1.0, 3.0)  # the same arrivals, thrice the tokens after 200
    rows = lf.forecast_table(times, {"requests": np.ones(len(times)), "tokens": w},
                             [50.0], [50.0], 0.25, 5.0)
    req, tok = rows
    assert req["measure"] == "requests" and req["within"] == 1.0
    assert tok["measure"] == "tokens" and tok["within"] < 1.0 and tok["ratio_p90"] > 2.0


def test_script_on_the_shipped_trace(tmp_path, capsys):
    out = tmp_path / "lf.json"
    res = lf.main(["--history-s", "48,120", "--life-s", "110", "--step-s", "20",
                   "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["requests"] == res["requests"] > 10000
    assert len(data["table"]) == 4  # 2 measures x 2 histories x 1 life
    for r in data["table"]:
        assert 0.0 <= r["within"] <= 1.0
        assert r["ratio_p10"] <= r["ratio_p50"] <= r["ratio_p90"]
    assert "| tokens | 120 | 110 |" in capsys.readouterr().out


def test_no_history_gives_no_forecast_and_bad_flags_are_usage_errors():
    times = np.array([5.0, 6.0, 400.0])  # no arrival in any start's last 2 s
    (row,) = lf.forecast_table(times, {"requests": np.ones(3)}, [2.0], [2.0], 0.25, 50.0)
    assert row["no_history"] == row["starts"] and row["within"] is None
    for bad in (["--history-s", "48,x"], ["--life-s", "0"], ["--rate", "-1"]):
        with pytest.raises(SystemExit):
            lf.main(bad + ["--json", ""])
