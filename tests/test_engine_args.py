"""One configuration path: flags and keyword arguments generated from EngineConfig."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from conserve_jax.config import CacheConfig, ConserveConfig, EngineConfig
from conserve_jax.engine_args import (add_engine_args, engine_config, engine_config_from_args,
                                      knob_names)


def test_flat_names_are_unique_and_cover_every_group():
    names = knob_names()
    assert len(names) == len(set(names))
    for cls in (CacheConfig, ConserveConfig):
        assert {f.name for f in dataclasses.fields(cls)} <= set(names)
    assert "cache" not in names and "conserve" not in names


def test_every_knob_is_documented():
    for cls in (EngineConfig, CacheConfig, ConserveConfig):
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.type) and f.name not in ("cache", "conserve"):
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_flags_round_trip_into_nested_config():
    p = argparse.ArgumentParser()
    add_engine_args(p, defaults={"max_num_seqs": 4})
    args = p.parse_args(["--block-size", "32", "--num-blocks", "100", "--tpot-margin", "0.5",
                         "--policy", "fcfs", "--warmup", "--latency-model-path", "lm.json"])
    cfg = engine_config_from_args(args)
    assert cfg.max_num_seqs == 4  # the entry point's default
    assert cfg.cache.block_size == 32 and cfg.cache.num_blocks == 100
    assert cfg.conserve.tpot_margin == 0.5 and cfg.policy == "fcfs" and cfg.warmup is True
    assert cfg.latency_model_path == "lm.json"
    assert engine_config_from_args(p.parse_args([])).cache == CacheConfig()
    assert p.parse_args(["--num-blocks", "none"]).num_blocks is None


def test_bad_flag_value_is_a_usage_error():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--block-size", "sixteen"])


def test_keyword_arguments_and_unknown_names():
    cfg = engine_config(model="random:tiny", block_size=8, min_online_chunk=16)
    assert cfg.model == "random:tiny" and cfg.cache.block_size == 8
    assert cfg.conserve.min_online_chunk == 16
    with pytest.raises(TypeError, match="blok_size"):
        engine_config(blok_size=8)
    with pytest.raises(ValueError, match="no engine knob"):
        add_engine_args(argparse.ArgumentParser(), defaults={"nope": 1})


def test_only_declared_knobs_are_read_back():
    """An entry point's own flag that shares a knob's name (excluded from the engine flags)
    never reaches the config; overrides still do."""
    p = argparse.ArgumentParser()
    add_engine_args(p, exclude=("warmup", "policy"))
    p.add_argument("--warmup", choices=["all", "none"], default="all")
    args = p.parse_args(["--warmup", "none", "--block-size", "32"])
    cfg = engine_config_from_args(args)
    assert cfg.warmup == EngineConfig().warmup and cfg.cache.block_size == 32
    assert engine_config_from_args(args, policy="sarathi").policy == "sarathi"
    with pytest.raises(ValueError, match="add_engine_args"):
        engine_config_from_args(argparse.Namespace(block_size=32))
