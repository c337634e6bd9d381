"""Device mesh and shardings for tensor parallelism (GSPMD).

Weights are split Megatron-style: q/k/v/gate/up by output columns, o/down by input rows;
the paged KV cache is split along its KV-head axis. Everything else is replicated.
Called once by the runner at start-up.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "tp"
# per-layer params (see models.llama.layer_params) -> which axis is split over devices
SPLIT_AXIS = {"qkv": 1, "qkv_bias": 0, "gate_up": 2, "o": 0, "down": 0}


def make_mesh(tp: int) -> Optional[Mesh]:
    """The tp mesh over the first `tp` of `jax.devices()` (in a multi-process run: every
    process's devices, in process order); None for tp 1."""
    if tp == 1:
        return None
    devices = jax.devices()
    if len(devices) < tp:
        raise ValueError(f"tp={tp} needs {tp} devices, {len(devices)} available")
    return jax.make_mesh((tp,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:tp])


def put(x, sharding: NamedSharding) -> jax.Array:
    """`x` (a host array, the same on every process) placed with `sharding`. A sharding
    spanning other processes' devices is filled from this process's copy, shard by shard:
    `jax.device_put` would first check with a collective that every process passed the
    same value, on every call."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def layer_shardings(mesh: Mesh, layer_params: dict) -> dict:
    """Megatron-style: fused QKV split by KV-head groups, gate/up by intermediate columns,
    o/down by input rows; norms replicated."""
    def spec(name: str, ndim: int) -> P:
        axes = [None] * ndim
        if name in SPLIT_AXIS:
            axes[SPLIT_AXIS[name]] = AXIS
        return P(*axes)

    return {n: NamedSharding(mesh, spec(n, a.ndim)) for n, a in layer_params.items()}


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
