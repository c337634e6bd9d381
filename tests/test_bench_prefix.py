"""The prefix-caching benchmark (conserve_jax/bench/prefix*.py, run as scripts/bench_prefix.py):
its pure helpers (the hit-rate optimum, the workloads, the summaries), its flags, and `main`
end to end on a tiny random model with every case at toy sizes: the JSON has every case,
both sides, the targets, and numbers that make sense (hits only with the cache on, computed
prefill lower with it, the online-only run without offline tokens). No timing thresholds."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conserve_jax.bench import prefix as bench_prefix
from conserve_jax.bench import prefix_engines
from conserve_jax.bench import prefix_workload as wl
from conserve_jax.engine_args import knob_names

TINY = ["--model", "random:tiny", "--quick", "--repeats", "2", "--warmup", "none",
        "--max-model-len", "256", "--max-num-seqs", "4", "--max-prefill-tokens", "64",
        "--host-pool-bytes", str(1 << 24), "--kv-seqs", "4", "--coserve-kv-seqs", "2",
        "--offline-items", "6", "--instruction-tokens", "64", "--item-tokens", "4", "12",
        "--output-tokens", "4",
        "--chat-conversations", "2", "--chat-turns", "3", "--chat-user-tokens", "8", "16",
        "--chat-answer", "4", "8",
        "--coserve-duration", "3", "--coserve-rate", "2", "--drain", "5",
        "--online-prompt-max", "32", "--online-output-max", "8", "--coserve-offline-items", "8",
        "--coserve-prefix-tokens", "64", "--coserve-item-tokens", "4", "12",
        "--coserve-offline-output", "4", "8",
        "--nosharing-items", "4", "--nosharing-prompt", "16", "48"]


def test_optimal_hit_tokens():
    A = list(range(100, 108))
    p0, p1, p2 = A + [1, 2, 3], A + [7, 8], A[:4]
    p3 = p0 + [50, 51] + [9, 9, 9]  # the next chat turn: p0 + its answer + new tokens
    got = wl.optimal_hit_tokens([p0, p1, p2, p3], [[50, 51], [3], [9], [4]], block_size=4)
    # p1: two full blocks of A (cap (10-1)//4 = 2); p2: 4 tokens, cap 0; p3: A's two blocks
    # and p0's third block [1, 2, 3, 50] (answer token 50 was computed, 51 never was)
    assert got == [0, 8, 0, 12]
    assert wl.optimal_hit_tokens([A, A], [[1], [1]], 4) == [0, 4]  # its last block runs again


def test_workloads_and_summaries():
    rng = np.random.default_rng(0)
    items = wl.shared_prefix_batch(rng, 512, 5, 32, (4, 8), 3, "t")
    assert [it.request_id for it in items] == [f"t-{i}" for i in range(5)]
    assert all(it.prompt[:32] == items[0].prompt[:32] and 36 <= len(it.prompt) <= 40
               and it.output_len == 3 and min(it.prompt) >= 5 and max(it.prompt) < 512
               for it in items)
    assert sum(wl.optimal_hit_tokens([it.prompt for it in items], [[1]] * 5, 16)) == 4 * 32
    again = wl.shared_prefix_batch(np.random.default_rng(1), 512, 5, 32, (4, 8), 3, "t")
    assert again[0].prompt[:32] != items[0].prompt[:32]  # a new repeat: new ids
    rb = wl.random_batch(rng, 512, 3, (10, 20), (2, 4), "r")
    assert all(10 <= len(it.prompt) <= 20 and 2 <= it.output_len <= 4 for it in rb)
    chat = wl.chat_script(rng, 512, 3, 4, (5, 6), (1, 2))
    assert (chat.conversations, chat.turns) == (3, 4)
    assert all(5 <= len(u) <= 6 for conv in chat.users for u in conv)
    s = wl.summarize([{"x": 1.0, "y": None, "z": "a", "b": True}, {"x": 3.0, "y": None}])
    assert s["median"] == {"x": 2.0, "y": None} and s["min"]["x"] == 1.0 and s["max"]["x"] == 3.0
    assert wl.target("d", 0.5, 0.4, False)["met"] is False
    assert wl.target("d", True, True, True)["met"] is True
    assert wl.target("d", None, 2.0, True)["met"] is None


def test_flags():
    a = bench_prefix.parse_args([])
    assert a.cases == bench_prefix.CASES and a.repeats == 2 and a.json == "out/bench_prefix.json"
    assert (a.offline_items, a.instruction_tokens, a.output_tokens, a.chat_conversations,
            a.coserve_duration, a.nosharing_items) == (64, 1024, 16, 8, 120.0, 32)
    on, off = prefix_engines.batch_config(a, True), prefix_engines.batch_config(a, False)
    assert on.enable_prefix_caching and not off.enable_prefix_caching
    assert on.policy == "conserve" and on.cache.num_blocks == 16 * 80 + 1 and on.max_model_len == 1280
    co = prefix_engines.coserve_config(a, "online-only", True)
    assert co.cache.num_blocks == 4 * 80 + 1 and co.default_ttft_s == 1.0 and co.default_tpot_s == 0.2
    q = bench_prefix.parse_args(["--quick", "--cases", "offline,chat"])
    assert q.cases == ["offline", "chat"] and (q.offline_items, q.coserve_duration) == (16, 60.0)
    for bad in (["--cases", "offline,bogus"], ["--instruction-tokens", "1300"],
                ["--policy", "fcfs"], ["--enable-prefix-caching"], ["--item-tokens", "9", "3"]):
        with pytest.raises(SystemExit):
            bench_prefix.parse_args(bad)
    parser = bench_prefix.build_parser()  # no own flag may use an engine knob's name
    engine = [g for g in parser._action_groups if g.title == "engine"][0]
    own = {x.dest for x in parser._actions} - {x.dest for x in engine._group_actions}
    assert not own & set(knob_names())


def test_helpers_import_light():
    code = ("import sys, json\nimport conserve_jax.bench.prefix_workload\n"
            "light = 'jax' in sys.modules\nimport conserve_jax.bench.prefix\n"
            "print(json.dumps([light, 'torch' in sys.modules]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [False, False]


@pytest.mark.timeout(900)
def test_bench_prefix_tiny(tmp_path):
    out = tmp_path / "bench_prefix.json"
    res = bench_prefix.main(TINY + ["--json", str(out)])
    data = json.loads(out.read_text())
    assert data["cases"] == bench_prefix.CASES and data["repeats"] == 2
    assert set(bench_prefix.CASES) <= data.keys() and res.keys() == data.keys()
    for name in ("offline", "nosharing"):
        c = data[name]
        assert len(c["runs"]) == 2 and [r["order"] for r in c["runs"]] == [["on", "off"], ["off", "on"]]
        assert isinstance(c["tokens_identical"], bool)
        for r in c["runs"]:
            for side in ("on", "off"):
                m = r[side]
                assert m["unfinished"] == 0 and m["time_s"] > 0
                assert m["output_tokens"] == 4 * c["workload"]["items"]
                assert m["served_tokens_per_s"] == pytest.approx(
                    (m["prompt_tokens"] + m["output_tokens"]) / m["time_s"])
                assert m["hit_tokens"] == m["stats_hit_tokens"]
                assert m["computed_prefill_tokens"] + m["hit_tokens"] >= m["prompt_tokens"]
            assert r["off"]["hit_tokens"] == 0 and r["on"]["prompt_tokens"] == r["off"]["prompt_tokens"]
        for stat in ("median", "min", "max"):
            assert c["on"][stat]["time_s"] > 0 and c["off"][stat]["time_s"] > 0
        assert c["ratios"]["served_tokens_per_s_on_over_off"] > 0
    off = data["offline"]
    assert off["on"]["median"]["optimal_hit_tokens"] == 5 * 64  # 6 items, a 4-block instruction
    assert 0 < off["on"]["median"]["hit_vs_optimal"] <= 1
    assert off["on"]["median"]["computed_prefill_tokens"] < off["off"]["median"]["computed_prefill_tokens"]
    assert data["nosharing"]["on"]["max"]["hit_tokens"] == 0
    chat = data["chat"]
    assert isinstance(chat["tokens_identical"], bool)
    for side in ("on", "off"):
        for k in (1, 2, 3):
            assert chat[side]["median"][f"turn{k}_ttft_p99_s"] >= chat[side]["median"][f"turn{k}_ttft_p50_s"] > 0
        assert all(r[side]["unfinished"] == 0 and len(r[side]["turns"]) == 3 for r in chat["runs"])
    assert chat["off"]["max"]["hit_rate"] == 0 and chat["on"]["median"]["turn3_hit_rate"] > 0
    assert chat["on"]["median"]["optimal_hit_tokens"] > 0
    assert 0 < chat["on"]["median"]["hit_vs_optimal"] <= 1
    assert "turn3_ttft_p50_on_over_off" in chat["ratios"]
    co = data["coserve"]
    assert set(co["variants"]) == {"online-only", "conserve-cache-on", "conserve-cache-off"}
    assert co["order"][:3] == ["online-only", "conserve-cache-on", "conserve-cache-off"]
    assert co["order"][3:] == ["conserve-cache-on", "conserve-cache-off", "online-only"]
    for label, rs in co["runs"].items():
        assert len(rs) == 2 and all(r["online_requests"] == 6 for r in rs)  # 2 req/s over 3 s
        assert all(0 <= r["slo_attainment"] <= 1 and r["online_ttft_p99_s"] > 0 for r in rs)
    v = co["variants"]
    assert v["online-only"]["max"]["offline_served_tokens_per_s"] == 0
    for label in ("conserve-cache-on", "conserve-cache-off"):
        assert v[label]["min"]["offline_processed_tokens_per_s"] > 0
        assert all(r["offline_served_tokens_per_s"] >= r["offline_processed_tokens_per_s"]
                   for r in co["runs"][label])
    assert v["conserve-cache-on"]["median"]["offline_hit_rate"] > 0
    assert not v["conserve-cache-off"]["max"]["offline_hit_rate"]
    assert co["workload"]["offline"]["shared_prefix_tokens"] == 64
    assert set(data["targets"]) == {
        "offline_served_tokens_per_s_ratio", "offline_hit_rate_vs_optimal",
        "offline_tokens_identical", "chat_last_turn_ttft_p50_ratio", "chat_tokens_identical",
        "coserve_offline_served_ratio", "coserve_online_p99_vs_online_only",
        "nosharing_speed_ratio", "nosharing_tokens_identical"}
    for t in data["targets"].values():
        assert {"description", "value", "threshold", "met"} <= t.keys()
    assert data["setup"]["total_s"] > 0 and data["engine_config"]["policy"] == "conserve"
