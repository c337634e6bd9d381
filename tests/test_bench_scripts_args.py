"""The benchmarks' engine flags come from `add_engine_args`: with no flags each benchmark
(conserve_jax/bench/, run by the entry points in scripts/) builds the EngineConfig it built
by hand before (written out below as it was), and engine flags such as --block-size and
--dtype reach the config it runs. Parsing only; no model is loaded."""
import dataclasses

import pytest

from conserve_jax.bench import coserve as bench_coserve
from conserve_jax.bench import ecoserve as bench_ecoserve
from conserve_jax.bench import engine_speed as bench_engine
from conserve_jax.bench import latency_model_accuracy as bench_latency_model
from conserve_jax.bench import script_io
from conserve_jax.bench import step_profile as profile_engine
from conserve_jax.config import CacheConfig, ConserveConfig, EngineConfig
from conserve_jax.engine_args import engine_config, engine_config_from_args, knob_names

TRACE = ["--trace", "trace.csv"]  # bench_ecoserve's one required flag (not read here)
ENGINE_FLAGS = ["--block-size", "32", "--dtype", "bfloat16"]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def test_bench_engine():
    a = bench_engine.parse_args([])
    cfg, per_seq = bench_engine.runner_config(a, 32, 1024, 2048)
    old_per_seq = _ceil(2048, 16) + 1
    old = EngineConfig(model="bench", max_model_len=2048, max_num_seqs=32, max_prefill_tokens=512,
                       cache=CacheConfig(block_size=16, num_blocks=32 * old_per_seq + 8))
    # the runner never reads `model`; it was a label and is now the model measured. The
    # safepoint interval defaults to LLM's own (none) so that the LLM.generate measure
    # times what LLM users get; runner measures pass their own grouping
    assert per_seq == old_per_seq and cfg == dataclasses.replace(
        old, model="default", conserve=ConserveConfig(safepoint_interval=None))
    assert bench_engine.runner_config(a, 1, 128, 512)[0].max_num_seqs == 1
    # LLM(**kw) builds engine_config(**kw); before: LLM(model=args.model, max_model_len=2048)
    assert engine_config(**bench_engine.llm_kwargs(a)) == EngineConfig(
        model="default", max_model_len=2048, conserve=ConserveConfig(safepoint_interval=None))
    b = bench_engine.parse_args(ENGINE_FLAGS + ["--max-prefill-tokens", "256"])
    cfg, per_seq = bench_engine.runner_config(b, 8, 128, 512)
    assert cfg.cache.block_size == 32 and cfg.dtype == "bfloat16" and per_seq == _ceil(512, 32) + 1
    assert cfg.cache.num_blocks == 8 * per_seq + 8 and cfg.max_prefill_tokens == 256
    with pytest.raises(SystemExit):  # the script sizes batch and KV per measure
        bench_engine.parse_args(["--max-num-seqs", "4"])


def test_profile_engine():
    a = profile_engine.parse_args([])
    cfg, per_seq = profile_engine.runner_config(a)
    old_per_seq = _ceil(256 + 8, 16)
    assert per_seq == old_per_seq and cfg == EngineConfig(
        model="default", max_model_len=2048, max_num_seqs=32, max_prefill_tokens=512,
        cache=CacheConfig(block_size=16, num_blocks=32 * old_per_seq + 8))
    b = profile_engine.parse_args(ENGINE_FLAGS + ["--batches", "1,8", "--context", "100"])
    cfg, per_seq = profile_engine.runner_config(b)
    assert (cfg.cache.block_size, cfg.dtype, cfg.max_num_seqs) == (32, "bfloat16", 8)
    assert per_seq == _ceil(108, 32) and cfg.cache.num_blocks == 8 * per_seq + 8


def test_bench_latency_model():
    a = bench_latency_model.parse_args([])
    old = EngineConfig(max_model_len=512, max_num_seqs=16, max_prefill_tokens=256,
                       cache=CacheConfig(num_blocks=512))
    # `model` was left at its default there (the runner never reads it); now it is the model
    assert engine_config_from_args(a) == dataclasses.replace(old, model="random:small")
    assert a.model == "random:small"
    cfg = engine_config_from_args(bench_latency_model.parse_args(ENGINE_FLAGS))
    assert cfg.cache.block_size == 32 and cfg.dtype == "bfloat16"


def test_bench_coserve():
    a = bench_coserve.parse_args([])
    old = EngineConfig(model="default", policy="conserve", max_model_len=1280, max_num_seqs=16,
                       max_prefill_tokens=512, max_prefill_seqs=1,
                       default_ttft_s=1.0, default_tpot_s=0.2, latency_model_path=None, seed=0,
                       cache=CacheConfig(block_size=16, num_blocks=4 * _ceil(1280, 16) + 1,
                                         host_pool_bytes=int(4.0 * 2**30)),
                       conserve=ConserveConfig(isolation=1.2, safepoint_interval=1),
                       sarathi_token_budget=256, warmup=False)
    assert bench_coserve.engine_config(a, "conserve") == old
    v = [v for v in bench_coserve.pareto.variants(a.policies, a.isolation,
                                                  a.sarathi_token_budget, True)
         if v.label == "sarathi@64"][0]
    assert bench_coserve.engine_config(a, v.policy, **v.overrides) == dataclasses.replace(
        old, policy="sarathi", sarathi_token_budget=64)
    b = bench_coserve.parse_args(ENGINE_FLAGS + ["--isolation", "off", "--kv-seqs", "2",
                                                 "--ttft", "3", "--seed", "5"])
    cfg = bench_coserve.engine_config(b, "conserve")
    assert (cfg.cache.block_size, cfg.dtype, cfg.conserve.isolation, cfg.seed) == (32, "bfloat16", None, 5)
    assert cfg.cache.num_blocks == 2 * _ceil(1280, 32) + 1 and cfg.default_ttft_s == 3.0
    assert bench_coserve.engine_config(
        bench_coserve.parse_args(["--num-blocks", "99"]), "fcfs").cache.num_blocks == 99
    with pytest.raises(SystemExit):  # EngineConfig's check, reported as a usage error
        bench_coserve.parse_args(["--isolation", "0.5"])
    with pytest.raises(SystemExit):  # each variant sets the policy
        bench_coserve.parse_args(["--policy", "fcfs"])


def test_bench_ecoserve():
    a = bench_ecoserve.parse_args(TRACE)
    old = EngineConfig(model="random:small", policy="ecoserve", max_model_len=768,
                       max_num_seqs=32, max_prefill_tokens=128, max_prefill_seqs=1,
                       kv_cache_tokens=2048,
                       cache=CacheConfig(block_size=16, host_pool_bytes=1 << 28),
                       default_ttft_s=1.0, default_tpot_s=0.1, sarathi_token_budget=64,
                       compilation_cache_dir="out/xla_cache")
    assert bench_ecoserve.config(a, "ecoserve") == old
    assert bench_ecoserve.config(a, "conserve", offline_kv_reservation=True) == \
        dataclasses.replace(old, policy="conserve",
                            conserve=ConserveConfig(offline_kv_reservation=True))
    pre = dataclasses.replace(old, policy="fcfs", kv_cache_tokens=None)
    pre.cache = dataclasses.replace(pre.cache, num_blocks=32 * _ceil(768, 16) + 1)
    assert bench_ecoserve.prepass_config(a) == pre
    b = bench_ecoserve.parse_args(TRACE + ENGINE_FLAGS + ["--kv-cache-tokens", "1000",
                                                          "--sarathi-token-budget", "32"])
    cfg = bench_ecoserve.config(b, "sarathi")
    assert (cfg.cache.block_size, cfg.dtype, cfg.sarathi_token_budget) == (32, "bfloat16", 32)
    assert cfg.kv_cache_blocks == _ceil(1000, 32) + 1
    assert bench_ecoserve.prepass_config(b).cache.num_blocks == 32 * _ceil(768, 32) + 1


def test_write_json(tmp_path, capsys):
    path = str(tmp_path / "a" / "b.json")
    assert script_io.write_json(path, {"x": [1, 2]}) == path
    assert open(path).read() == '{\n  "x": [\n    1,\n    2\n  ]\n}'
    assert capsys.readouterr().out == f"wrote {path}\n"
    script_io.write_json(path, {}, indent=1, announce=False)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("script", [bench_engine, profile_engine, bench_latency_model,
                                    bench_coserve, bench_ecoserve])
def test_no_script_flag_shadows_an_engine_knob(script):
    """engine_config_from_args reads every knob-named attribute of the parsed flags, so a
    script's own flag must not use a knob's name (bench_coserve's --warmup {all,none} did)."""
    parser = script.build_parser()
    engine = [g for g in parser._action_groups if g.title == "engine"][0]
    engine_dests = {a.dest for a in engine._group_actions}
    own = {a.dest for a in parser._actions} - engine_dests
    assert not own & set(knob_names())
