"""`--dtype auto` (issue 29, item 7 of the issue's list): resolved once, where user input
becomes an `EngineConfig`, to float32 on CPU and bfloat16 on GPU/TPU; the flag, `LLM(...)`
and a real engine on the tiny random model take it."""
from __future__ import annotations

import argparse

import jax
import pytest

from conserve_jax.engine_args import add_engine_args, engine_config, engine_config_from_args
from conserve_jax.entrypoints.llm import LLM
from conserve_jax.sampling_params import SamplingParams


def test_auto_is_float32_on_cpu_and_bfloat16_on_accelerators(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert engine_config(dtype="auto").dtype == "float32"
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert engine_config(dtype="auto").dtype == "bfloat16"
    assert engine_config(dtype="float32").dtype == "float32"  # explicit values stay


def test_the_flag_takes_auto():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["--dtype", "auto"])).dtype == "float32"
    assert "auto: bfloat16 on GPU/TPU, float32 on CPU" in " ".join(p.format_help().split())


def test_multi_process_runs_must_name_the_dtype():
    with pytest.raises(ValueError, match="dtype"):
        engine_config(dtype="auto", num_processes=2, coordinator_address="127.0.0.1:1")


def test_llm_runs_with_auto():
    with LLM(warmup=False, model="random:tiny", dtype="auto", max_model_len=128,
             max_num_seqs=2, max_prefill_tokens=64, num_blocks=64) as llm:
        assert llm.engine.config.dtype == "float32"
        out = llm.generate("hi", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].token_ids) == 3
