"""Device mesh and shardings for tensor parallelism (GSPMD).

Weights are split Megatron-style: q/k/v/gate/up by output columns, o/down by input rows;
the paged KV cache is split along its KV-head axis. Everything else is replicated.
Called once by the runner at start-up.
"""
from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "tp"
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def make_mesh(tp: int) -> Optional[Mesh]:
    if tp == 1:
        return None
    devices = jax.devices()
    if len(devices) < tp:
        raise ValueError(f"tp={tp} needs {tp} devices, {len(devices)} available")
    return jax.make_mesh((tp,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:tp])


def layer_shardings(mesh: Mesh, layer_params: dict) -> dict:
    def spec(module: str, name: str, ndim: int) -> P:
        if module in COLUMN:
            return P(None, AXIS) if name == "kernel" else P(AXIS)
        if module in ROW and name == "kernel":
            return P(AXIS, None)
        return P(*([None] * ndim))

    return {m: {n: NamedSharding(mesh, spec(m, n, a.ndim)) for n, a in d.items()}
            for m, d in layer_params.items()}


def cache_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS, None, None, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def kv_repeat_for(tp: int, num_kv_heads: int, num_heads: int) -> int:
    """How many times each KV head is replicated so that the tp devices split KV heads."""
    if num_heads % tp:
        raise ValueError(f"tp={tp} must divide the number of attention heads ({num_heads})")
    if num_kv_heads % tp == 0:
        return 1
    if tp % num_kv_heads == 0:
        return tp // num_kv_heads
    raise ValueError(f"tp={tp} must divide, or be a multiple of, the number of KV heads "
                     f"({num_kv_heads})")
