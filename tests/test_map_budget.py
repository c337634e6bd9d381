"""What an engine compiles, counted from its configuration, and the refusal of a
configuration whose executables would pass vm.max_map_count (instead of a crash mid-run)."""
import pytest

from conserve_jax.engine_args import engine_config
from conserve_jax.models.loader import load_model_config
from conserve_jax.runtime import map_budget
from conserve_jax.runtime.map_budget import MapBudgetExceeded, budget_error
from conserve_jax.runtime.model_runner import planned_executables_for


def test_default_serve_compiles_few_layer_executables_per_group_size():
    cfg = engine_config()  # serve's defaults: 32 sequences, 512-token chunks, 2048 tokens
    plan = planned_executables_for(load_model_config("default"), cfg, checkpointing=True)
    assert plan.token_buckets <= 16  # one layer executable per token bucket and group size
    assert plan.group_sizes == (1, 10)  # safepoints every layer; three calls of 10 without
    assert plan.maps <= 0.25 * 65530  # a quarter of the default limit
    assert budget_error(plan, current_maps=4000, max_map_count=65530) is None


def test_a_configuration_past_the_limit_is_refused_naming_the_limit_and_the_knobs():
    plan = planned_executables_for(load_model_config("default"),
                                   engine_config(max_num_seqs=256, max_prefill_tokens=8192),
                                   checkpointing=True)
    msg = budget_error(plan, current_maps=4000, max_map_count=8000)
    assert msg is not None
    assert "vm.max_map_count (8000)" in msg and "max_num_seqs" in msg
    assert "max_prefill_tokens" in msg and "safepoint_interval" in msg


def test_the_engine_refuses_before_loading_the_model(monkeypatch):
    from conserve_jax.engine.engine import Engine
    from conserve_jax.models import loader

    loads = []
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(map_budget, "max_map_count", lambda: 1000)
    with pytest.raises(MapBudgetExceeded, match="vm.max_map_count"):
        Engine(engine_config(model="random:tiny", max_model_len=256, warmup=False))
    assert loads == []  # refused before the weights were read
