"""The co-serving benchmark (conserve_jax/bench/coserve.py, run as scripts/bench_coserve.py)
end to end on a tiny random model: every policy runs a few seconds of the real workload
recipe; the JSON has every field for every policy, the top-level resume/safepoint/targets
sections, and a PNG exists per policy."""
import json

import pytest

from conserve_jax.bench import coserve as bench_coserve
from conserve_jax.bench import coserve_pareto as pareto
from conserve_jax.bench import coserve_workload

TINY = ["--model", "random:small", "--duration", "3", "--drain", "3", "--rate", "2",
        "--max-model-len", "256", "--max-num-seqs", "4", "--max-prefill-tokens", "64",
        "--offline-requests", "8", "--offline-prompt", "64", "128", "--offline-output", "8", "16",
        "--online-prompt-max", "64", "--online-output-max", "16", "--resume-context", "128",
        "--warmup", "none"]


@pytest.mark.timeout(300)
def test_bench_coserve_tiny(tmp_path):
    out = tmp_path / "bench.json"
    res = bench_coserve.main(TINY + ["--json", str(out), "--plot-dir", str(tmp_path)])
    data = json.loads(out.read_text())
    assert data["policies"].keys() == set(bench_coserve.POLICIES)
    assert data["order"] == bench_coserve.POLICIES
    for name, m in data["policies"].items():
        missing = [k for k in bench_coserve.METRICS if k not in m]
        assert not missing, (name, missing)
        assert m["online_requests"] == 6  # rate 2 req/s over 3 s
        assert 0.0 <= m["slo_attainment"] <= 1.0
        assert m["online_ttft_p99_s"] >= m["online_ttft_p50_s"] > 0
        assert (tmp_path / f"bench_coserve_{name}.png").stat().st_size > 1000
    pol = data["policies"]
    assert pol["online-only"]["offline_tokens_per_s"] == 0
    assert pol["non-preemptive"]["offline_tokens_per_s"] > 0
    for name in ("online-only", "priority-recompute", "sarathi", "non-preemptive"):
        assert pol[name]["preemption_latency_p99_s"] is None
        assert pol[name]["restored_tokens"] is None
    assert pol["conserve"]["restored_tokens"] is not None
    rv = data["resume_vs_recompute"]
    assert rv["tokens_match"] and rv["resume_s"] > 0 and rv["recompute_s"] > 0
    assert data["resume_vs_recompute_ratio"] == pytest.approx(rv["resume_s"] / rv["recompute_s"])
    assert "safepoint_interval_s" in data
    assert len(data["targets"]) == 6
    assert set(data["targets"]) >= {"ttft_p99_vs_online_only", "offline_vs_non_preemptive",
                                    "preemption_latency_p99_vs_layer_time"}
    cost = data["safepoint_cost"]
    assert cost["check_call_s"] > 0 and cost["shapes"]
    assert pol["conserve"]["isolation"] == 1.2 and pol["sarathi"]["isolation"] is None
    assert pol["conserve"]["offline_processed_tokens_per_s"] >= 0
    for m in pol.values():  # the split adds up: riders + offline-only iterations
        idle_s = m["window_s"] * (1.0 - m["online_busy_fraction"])
        assert m["offline_riding_tokens_per_s"] * m["window_s"] \
            + m["offline_rate_online_idle"] * idle_s == pytest.approx(
                m["offline_processed_tokens_per_s"] * m["window_s"], rel=1e-6, abs=1e-6)
    assert pol["online-only"]["offline_riding_tokens_per_s"] == 0
    for m in pol.values():  # runner time: online + offline-only calls + idle = the window
        assert 0 < m["runner_idle_fraction"] < 1 and 0 <= m["offline_only_call_fraction"] < 1
    assert pol["online-only"]["offline_only_call_fraction"] == 0
    npv = pol["non-preemptive"]
    assert npv["offline_only_call_fraction"] > 0 and npv["offline_only_call_tokens_per_s"] > 0
    ih = data["idle_harvest"]  # the idle ceiling: non-preemptive's rate in online-only's idle share
    off = "offline_processed_tokens_per_s"
    assert ih["ceiling_tokens_per_s"] == pytest.approx(
        (1.0 - pol["online-only"]["online_busy_fraction"]) * npv[off])
    assert set(ih["fraction"]) == set(pol) - {"online-only", "non-preemptive"}
    assert ih["fraction"]["conserve"] == pytest.approx(
        pol["conserve"][off] / ih["ceiling_tokens_per_s"])
    for t in data["targets"].values():
        assert {"value", "threshold", "met", "description"} <= t.keys()
    assert data["workload"]["online"]["requests"] == 6
    assert res["policies"].keys() == data["policies"].keys()


def test_workload_recipe():
    """Same spec -> same requests; lengths follow the stated scaling and clamps; arrivals
    span the window at the requested mean rate."""
    spec = coserve_workload.WorkloadSpec(duration_s=60, rate=0.5, offline_requests=5)
    a, b = (coserve_workload.build(spec, 49152, 1280) for _ in range(2))
    assert [(r.arrival_s, r.prompt, r.output_len) for r in a.online] == \
        [(r.arrival_s, r.prompt, r.output_len) for r in b.online]
    assert len(a.online) == 30 and len(a.offline) == 5
    arr = [r.arrival_s for r in a.online]
    assert arr[0] == 0 and arr == sorted(arr) and 50 < arr[-1] < 60
    for r in a.online:
        assert len(r.prompt) == min(512, max(16, round(r.trace_prompt / 8)))
        assert r.output_len == min(64, max(8, round(r.trace_output / 8)))
    for r in a.offline:
        assert 512 <= len(r.prompt) <= 1024 and 64 <= r.output_len <= 128


def test_sweep_variants_and_dominance():
    vs = pareto.variants(bench_coserve.POLICIES, 1.2, 256, sweep=True)
    labels = [v.label for v in vs]
    assert len(labels) == len(set(labels))
    iso = sorted((v.isolation or 0) for v in vs if v.policy == "conserve")
    assert iso == [0, 1.05, 1.1, 1.2, 1.5, 2.0]
    assert sorted(v.overrides["sarathi_token_budget"] for v in vs if v.policy == "sarathi") \
        == [64, 128, 256, 512]
    assert pareto.variants(["conserve"], None, 256, sweep=False)[0].isolation is None

    def pt(label, policy, ttft, tpot, off):
        return {"label": label, "policy": policy, "online_ttft_p99_s": ttft,
                "online_tpot_p99_s": tpot, "offline_processed_tokens_per_s": off}
    points = [pt("conserve", "conserve", 0.5, 0.03, 100), pt("conserve@2", "conserve", 0.8, 0.05, 300),
              pt("sarathi", "sarathi", 0.9, 0.06, 250), pt("non-preemptive", "non-preemptive", 9, 1, 400),
              pt("online-only", "online-only", 0.4, 0.02, 0)]
    d = pareto.dominance(points)
    assert d["sarathi"] == {"dominated_by": ["conserve@2"], "dominated": True}
    assert d["non-preemptive"]["dominated"] is False and "online-only" not in d


def test_conserve_discard_variant_and_policy_names():
    vs = pareto.variants(["conserve", "conserve-discard"], 1.2, 256, sweep=False)
    assert [(v.label, v.policy) for v in vs] == [("conserve", "conserve"),
                                                 ("conserve-discard", "conserve")]
    assert "resume_abandoned" not in vs[0].overrides
    assert vs[1].overrides == {"isolation": 1.2, "resume_abandoned": False}
    a = bench_coserve.parse_args(TINY + ["--policies", "conserve,conserve-discard"])
    assert not bench_coserve.engine_config(a, "conserve", **vs[1].overrides).conserve.resume_abandoned
    assert bench_coserve.engine_config(a, "conserve").conserve.resume_abandoned
    with pytest.raises(SystemExit):
        bench_coserve.parse_args(TINY + ["--policies", "conserve,bogus"])
