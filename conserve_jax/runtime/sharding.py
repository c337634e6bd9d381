"""Device mesh and shardings for tensor parallelism (GSPMD).

Weights are split Megatron-style: q/k/v/gate/up by output columns, o/down by input rows;
the paged KV cache is split along its KV-head axis. Everything else is replicated.
Called once by the runner at start-up.

The o/down projections' partial sums are all-reduced by the compiler, except for
decode-sized inputs in a mesh spanning several processes, where `row_parallel_for`'s
reduction (which the runner passes to the model) gathers and sums them in fewer rounds.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
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


def local_mesh(tp: int) -> Optional[Mesh]:
    """The tp mesh over the first `tp` of this process's own devices
    (`jax.local_devices()`): a pipeline stage's (runtime/pipeline_stage.py), whose
    collectives never leave the process; None for tp 1."""
    if tp == 1:
        return None
    devices = jax.local_devices()
    if len(devices) < tp:
        raise ValueError(f"tp={tp} needs {tp} local devices, {len(devices)} available")
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


# Token rows up to which a cross-process reduction gathers the partial sums itself; above,
# the compiler's all-reduce is as fast (measured: conserve_jax/bench/collectives.py).
GATHER_MAX_ROWS = 64


def process_mesh(mesh: Optional[Mesh]) -> Optional[Mesh]:
    """The 2-D ("proc", "local") view of a tp mesh spanning several processes (the same
    devices in the same order; each row one process's devices), or None for a mesh within
    one process or devices not laid out process by process."""
    if mesh is None:
        return None
    devices = list(mesh.devices.flat)
    procs = sorted({d.process_index for d in devices})
    if len(procs) < 2 or len(devices) % len(procs):
        return None
    per = len(devices) // len(procs)
    if [d.process_index for d in devices] != [p for p in procs for _ in range(per)]:
        return None
    return Mesh(np.array(devices).reshape(len(procs), per), ("proc", "local"))


def row_parallel_for(mesh: Optional[Mesh], project):
    """The o/down projection (`row_parallel` of models/llama.py, `project` its matmul) for
    `mesh`, or None to let the compiler all-reduce everywhere (a mesh within one process:
    its collectives stay in memory).

    Across processes every collective is a network exchange (gloo over TCP on CPU) paid
    per round trip, and the compiler's all-reduce over n devices takes 2(n-1) of them (a
    ring). For at most `GATHER_MAX_ROWS` token rows (decode-sized; the row count is static
    per compiled shape) each device computes its partial product in float32 and the
    partials are all-gathered and summed in two steps, first among one process's devices
    ("local"), then across processes ("proc"): one round each, and the same sums in the
    same order on every device; the result is cast to x's dtype. Larger inputs (prefill)
    keep the compiler's all-reduce, which moves fewer bytes."""
    pm = process_mesh(mesh)
    return None if pm is None else gathered_row_parallel(pm, project)


def gathered_row_parallel(pm: Mesh, project):
    """`row_parallel_for`'s reduction over a ("proc", "local") mesh `pm` (any such mesh:
    tests build one inside a single process)."""
    axes = ("proc", "local")
    spec_x, spec_w = P(None, axes), P(axes, None)

    def body(eq: str, dtype, xs, ws):
        part = project(eq, xs, ws, out_dtype=jnp.float32)
        if pm.shape["local"] > 1:
            part = jax.lax.all_gather(part, "local").sum(0)
        return jax.lax.all_gather(part, "proc").sum(0).astype(dtype)

    def row_parallel(eq: str, x, w):
        if x.shape[0] > GATHER_MAX_ROWS:
            return project(eq, x, w)
        fn = lambda xs, ws: body(eq, x.dtype, xs, ws)  # noqa: E731
        return jax.shard_map(fn, mesh=pm, in_specs=(spec_x, spec_w), out_specs=P(),
                             check_vma=False)(x, w)

    return row_parallel
