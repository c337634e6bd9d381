"""The deadlines benchmark (conserve_jax/bench/deadlines.py, run as
scripts/bench_deadlines.py) end to end on a tiny random model: every variant runs a few
seconds of the real recipe through an in-process server; the JSON holds every job's
outcome and estimate, the online statistics and the targets. (Whether jobs meet their
windows depends on the machine: not asserted here.)"""
import json

import pytest

from conserve_jax.bench import deadlines as bench
from conserve_jax.bench import deadlines_report as rep

TINY = ["--model", "random:small", "--duration", "6", "--rate", "1", "--warm-s", "2",
        "--windows", "0.5,1,2", "--job-items", "2,2,3", "--max-model-len", "256",
        "--max-num-seqs", "4", "--max-prefill-tokens", "64", "--offline-prompt", "32", "64",
        "--offline-output", "8", "16", "--warmup", "none",
        "--submit-order", "loose,medium,tight", "--stagger-s", "0.5"]


def test_parse_args_checks_the_job_lists():
    a = bench.parse_args([])
    # the warm-up is the server's default harvest window; the online load runs through it
    # and the jobs' phase
    assert a.duration == 240.0 and a.warm_s == 120.0 and a.windows == [0.3, 0.6, 1.2]
    assert a.online_s == 360.0
    q = bench.parse_args(["--quick"])
    assert q.duration == 90.0 and q.warm_s == 18.0 and q.online_s == 108.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--windows", "0.5,1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "fifo"])
    b = bench.parse_args(["--submit-order", "loose,medium,tight", "--stagger-s", "5"])
    assert b.submit_order == ["loose", "medium", "tight"] and b.stagger_s == 5.0
    for bad in (["--submit-order", "loose,tight"], ["--submit-order", "loose,loose,tight"],
                ["--stagger-s", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_realized_rate_is_the_work_done_between_two_timeline_rows():
    from conserve_jax.scheduling.harvest import WorkCost
    tl = [{"t": float(t), "offline_prefill_tokens": 100 * t, "offline_tokens": 10 * t}
          for t in range(0, 11)]
    cost = WorkCost(prefill_s=0.01, decode_s=0.1)  # 2 units a second
    assert rep.realized_rate(tl, cost, 2.2, 8.9) == pytest.approx(2.0)
    assert rep.realized_rate(tl, cost, 3.0, 3.2) is None  # under a second apart
    assert rep.realized_rate(tl, cost, 1.0, None) is None and rep.realized_rate([], cost, 0, 5) is None
    # estimated 30 s at a rate of 0.3; the job's life had 0.45 and it took 22 s: the
    # estimate at that rate, 20 s, is 9 % short
    job = {"estimate_at_submit_s": 30.0, "finished_after_s": 22.0, "estimate_error": 8 / 22,
           "estimator_at_submit": {"harvest_rate": 0.3}, "harvest_rate_realized": 0.45}
    assert rep.at_realized_rate(job) == pytest.approx(-2 / 22)
    assert rep.at_realized_rate({**job, "estimate_error": None}) is None  # expired


def test_overtaken_by_is_later_and_due_sooner_or_any_later_without_deadline_order():
    submitted = {"tight": 0.0, "medium": 0.1, "loose": 0.2}  # together, in this order
    due = {"tight": 84.0, "medium": 144.1, "loose": 288.2}
    for name in submitted:  # deadline order: a later job due later goes after it
        assert rep.overtaken_by(name, submitted, due, True) == []
    # today's order: every later job's items run beside its own
    assert rep.overtaken_by("tight", submitted, due, False) == ["medium", "loose"]
    assert rep.overtaken_by("medium", submitted, due, False) == ["loose"]
    assert rep.overtaken_by("loose", submitted, due, False) == []
    staggered = {"loose": 0.0, "medium": 8.0, "tight": 16.0}
    due = {"loose": 288.0, "medium": 152.0, "tight": 100.0}
    assert rep.overtaken_by("loose", staggered, due, True) == ["medium", "tight"]
    assert rep.overtaken_by("tight", staggered, due, True) == []


@pytest.mark.timeout(400)
def test_bench_deadlines_tiny(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--json", str(out)])
    data = json.loads(out.read_text())
    V = data["variants"]
    assert list(V) == list(bench.VARIANTS)
    assert V["online-only"]["jobs"] == {} and V["online-only"]["offline_processed_tokens_per_s"] is None
    for name in ("today", "isolate", "borrow"):
        v = V[name]
        assert v["online_requests"] == 8  # 1 a second over the 2 s warm-up and 6 s after
        assert set(v["jobs"]) == set(rep.JOBS)
        for job, j in v["jobs"].items():
            assert j["state"] in ("completed", "expired"), (name, job, j)
            assert j["one_record_per_item"], (name, job)
            assert j["missed"] == (j["state"] != "completed" or j["slack_at_finish_s"] < 0)
            if j["estimate_at_submit_s"] is not None and j["state"] == "completed":
                assert j["estimate_error"] is not None
            assert "estimate_error_settled" in j  # None when it ended before it settled
            assert "harvest_rate_realized" in j  # None when it ended within a second
            assert "estimate_error_at_realized_rate" in j
        # submitted loose, medium, tight, each due sooner than the one before
        assert v["jobs"]["loose"]["overtaken_by"] == ["medium", "tight"]
        assert v["jobs"]["medium"]["overtaken_by"] == ["tight"]
        assert v["jobs"]["tight"]["overtaken_by"] == []
        assert v["offline_processed_tokens_per_s"] > 0
        assert v["online_ttft_p99_vs_online_only"] is not None
        assert v["borrowed_s"] >= 0.0
        # the tracker counted every job's outcome, the last to end included
        t = v["tracker"]
        assert sum(t["met"].values()) + sum(t["missed"].values()) == 3, (name, t)
        finished = [j for j in v["jobs"].values() if j["state"] == "completed"
                    and j["estimate_at_submit_s"] is not None]
        assert len(t["estimate_errors"]) == len(finished), (name, t)
    assert V["today"]["borrowed_s"] == 0.0 and V["isolate"]["borrowed_s"] == 0.0
    assert data["targets"]["one_record_per_item"]["met"]
    assert data["submit_order"] == ["loose", "medium", "tight"] and data["stagger_s"] == 0.5
    assert data["warm_s"] == 2.0 and data["online_s"] == 8.0
    assert {"estimate_within_25pct", "borrow_meets_tight",
            "isolate_zero_misses_on_feasible_windows"} <= set(data["targets"])
    est = data["targets"]["estimate_within_25pct"]
    assert set(est["errors_not_overtaken"]) <= set(est["errors"])
