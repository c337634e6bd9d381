"""Load tester metrics on hand-made timings, the report (JSON fields, table, PNG), and the
client adapter's normalisation helpers."""
import json
import types

import grpc
import numpy as np
import pytest

from conserve_jax.loadtest.adapter import error_code, flatten_numbers, state_name
from conserve_jax.loadtest.fake import FakeRpcError
from conserve_jax.loadtest.metrics import RequestRecord, meets_slo, stats, summarize_online
from conserve_jax.loadtest.report import SCHEMA, build_report, format_table, write_json, write_plot
from conserve_jax.loadtest.runner import RunResult


def rec(i, sent, chunks, tokens, end=None, error=None, expected=None):
    r = RequestRecord(index=i, scheduled_s=sent, input_len=10,
                      expected_output_len=expected if expected is not None else sum(tokens),
                      sent_s=sent)
    r.chunk_times, r.chunk_tokens = list(chunks), list(tokens)
    r.end_s = None if error else (end if end is not None else chunks[-1])
    r.error = error
    return r


def test_single_request_math():
    # sent at 1.0; first token at 1.5; then a 2-token chunk at 1.7 and 1 token at 1.8
    r = rec(0, 1.0, [1.5, 1.7, 1.8], [1, 2, 1])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(0.8)
    assert r.output_tokens == 4
    assert r.tpot == pytest.approx(0.3 / 3)
    assert r.itl() == pytest.approx([0.1, 0.1, 0.1])  # the 0.2 gap split over 2 tokens
    one = rec(1, 0.0, [0.2], [1])
    assert one.tpot is None and one.itl() == []
    first_multi = rec(2, 0.0, [0.2, 0.3], [3, 1])  # extra first-chunk tokens: no ITL sample
    assert first_multi.itl() == pytest.approx([0.1])
    assert first_multi.tpot == pytest.approx(0.1 / 3)


def test_stats_against_numpy():
    rng = np.random.default_rng(0)
    v = rng.exponential(size=101)
    s = stats(list(v))
    assert s["count"] == 101 and s["mean"] == pytest.approx(v.mean())
    for p in (50, 90, 99):
        assert s[f"p{p}"] == pytest.approx(np.percentile(v, p))
    assert s["max"] == pytest.approx(v.max())
    assert stats([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None,
                         "max": None}


def test_slo_attainment_goodput_and_errors():
    records = [
        rec(0, 0.0, [0.1, 0.2, 0.3], [1, 1, 1]),      # ttft .1, tpot .1  -> meets
        rec(1, 0.0, [0.5, 0.6], [1, 1]),              # ttft .5           -> misses TTFT
        rec(2, 0.0, [0.1, 0.5, 0.9], [1, 1, 1]),      # tpot .4           -> misses TPOT
        rec(3, 0.0, [0.1], [1]),                      # one token, no TPOT -> meets
        rec(4, 0.0, [0.1], [1], error="UNAVAILABLE"),
        rec(5, 0.0, [0.1], [1], error="UNAVAILABLE"),
        rec(6, 0.0, [], [], error="DEADLINE_EXCEEDED"),
        rec(7, 0.0, [0.1, 0.2], [1, 1], expected=5),  # short output -> mismatch
    ]
    assert meets_slo(records[0], 0.2, 0.2) and not meets_slo(records[4], None, None)
    out = summarize_online(records, duration_s=2.0, slo_ttft=0.2, slo_tpot=0.2)
    assert out["issued"] == 8 and out["completed"] == 5 and out["failed"] == 3
    assert out["errors_by_code"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}
    assert out["slo"]["met"] == 3
    assert out["slo"]["attainment"] == pytest.approx(3 / 8)
    assert out["slo"]["goodput_rps"] == pytest.approx(1.5)
    assert out["request_throughput"] == pytest.approx(2.5)
    assert out["output_tokens"] == 3 + 2 + 3 + 1 + 2
    assert out["output_len_mismatches"] == 1
    ttfts = [0.1, 0.5, 0.1, 0.1, 0.1]
    assert out["ttft_s"]["p90"] == pytest.approx(np.percentile(ttfts, 90))
    assert out["itl_s"]["count"] == 2 + 1 + 2 + 0 + 1
    nothing = summarize_online(records, 2.0)  # no objectives: every success meets them
    assert nothing["slo"]["met"] == 5


def _result():
    records = [rec(0, 0.0, [0.1, 0.2, 0.3], [1, 1, 1]), rec(1, 0.5, [0.9, 1.0], [1, 1]),
               rec(2, 0.7, [], [], error="UNAVAILABLE")]
    offline = {"requests": 4, "batches": [], "submit_errors": {}, "completed_at_window_end": 4,
               "failed_at_window_end": 0, "results_collected": 4, "output_tokens": 64,
               "tokens_source": "results", "tokens_per_s": 32.0, "all_finished_at_s": 1.0,
               "cancelled_batches": []}
    return RunResult(records=records, duration_s=2.0, not_issued=1, offline=offline,
                     stats_before={"preemptions": 3, "offline_tokens_total": 10},
                     stats_after={"preemptions": 7, "offline_tokens_total": 74},
                     offline_timeline=[(0.5, 1), (1.0, 4)])


def test_report_json_fields(tmp_path):
    report = build_report(_result(), {"target": "x"}, slo_ttft=0.2, slo_tpot=0.2)
    path = tmp_path / "r.json"
    write_json(report, str(path))
    d = json.loads(path.read_text())
    assert d["schema"] == SCHEMA and d["config"] == {"target": "x"} and d["duration_s"] == 2.0
    on = d["online"]
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "send_lag_s"):
        assert set(on[key]) == {"count", "mean", "p50", "p90", "p99", "max"}
    for key in ("issued", "completed", "failed", "not_issued", "errors_by_code",
                "request_throughput", "output_tokens_per_s", "slo", "output_tokens"):
        assert key in on
    assert set(on["slo"]) == {"ttft_s", "tpot_s", "met", "attainment", "goodput_rps"}
    assert on["not_issued"] == 1 and on["errors_by_code"] == {"UNAVAILABLE": 1}
    assert d["offline"]["tokens_per_s"] == 32.0
    assert d["server"]["preemptions"] == 4
    assert d["server"]["stats_delta"]["offline_tokens_total"] == 64
    assert [r["index"] for r in d["requests"]] == [0, 1, 2]
    assert d["requests"][2]["error"] == "UNAVAILABLE" and d["requests"][2]["ttft_s"] is None
    assert d["offline_timeline"] == [[0.5, 1], [1.0, 4]]
    table = format_table(d)
    for word in ("TTFT", "TPOT", "ITL", "E2E", "SLO attainment", "goodput",
                 "offline tokens/s", "server preemptions", "UNAVAILABLE=1"):
        assert word in table


def test_report_without_stats_or_offline(tmp_path):
    r = _result()
    r.stats_before, r.offline, r.offline_timeline = None, {}, []
    d = build_report(r, {})
    assert d["server"]["preemptions"] is None and d["offline"] == {}
    assert "offline tokens/s" in format_table(d)
    write_plot(d, str(tmp_path / "p.png"))


def test_plot_written(tmp_path):
    path = tmp_path / "lat.png"
    write_plot(build_report(_result(), {}, 0.2, 0.2), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    empty = RunResult([], 1.0, 0, {}, None, None)
    write_plot(build_report(empty, {}), str(tmp_path / "empty.png"))
    assert (tmp_path / "empty.png").exists()


def test_adapter_helpers():
    assert error_code(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "x")) == "UNAVAILABLE"
    assert error_code(ValueError("x")) == "ValueError"
    assert state_name("RUNNING") == "running" and state_name("BATCH_STATE_COMPLETED") == "completed"
    assert state_name(4) == "cancelled"
    assert state_name(types.SimpleNamespace(name="FAILED")) == "failed"
    nested = {"preemptions": 2, "name": "s", "flag": True,
              "per_class": types.SimpleNamespace(online=1.5, offline=2.5)}
    assert flatten_numbers(nested) == {"preemptions": 2, "per_class.online": 1.5,
                                       "per_class.offline": 2.5}
