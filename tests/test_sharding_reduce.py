"""The cross-process o/down reduction of runtime/sharding.py (`gathered_row_parallel`),
run inside one process over a (proc=2, local=2) mesh of 4 CPU devices: the same result as
the unsharded projection for decode-sized inputs (gathered partials) and for prefill-sized
ones (the compiler's all-reduce), in float32 and with bfloat16 weights; the gathered path
really gathers (no all-reduce in its compiled HLO); a mesh inside one process gets no
reduction of its own."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conserve_jax.models.llama import project
from conserve_jax.runtime import sharding as shd


def mesh2x2() -> Mesh:
    if jax.device_count() < 4:
        pytest.skip("needs 4 CPU devices")
    return Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("proc", "local"))


def run(rows: int, wdtype):
    pm = mesh2x2()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    w = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(pm, P(None, ("proc", "local"))))
    ws = jax.device_put(jnp.asarray(w, wdtype), NamedSharding(pm, P(("proc", "local"), None)))
    fn = jax.jit(lambda a, b: shd.gathered_row_parallel(pm, project)("ta,ah->th", a, b))
    want = np.asarray(project("ta,ah->th", jnp.asarray(x), jnp.asarray(w, wdtype)))
    return fn, xs, ws, want


@pytest.mark.parametrize("rows", [1, 8, shd.GATHER_MAX_ROWS, shd.GATHER_MAX_ROWS + 1, 512])
@pytest.mark.parametrize("wdtype", [jnp.float32, jnp.bfloat16])
def test_same_as_unsharded(rows, wdtype):
    fn, xs, ws, want = run(rows, wdtype)
    got = fn(xs, ws)
    assert got.shape == (rows, 32) and got.dtype == jnp.float32
    assert got.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_decode_sized_gathers_prefill_sized_all_reduces():
    fn, xs, ws, _ = run(8, jnp.float32)
    hlo = fn.lower(xs, ws).compile().as_text()
    assert hlo.count("all-gather(") == 2 and "all-reduce(" not in hlo
    fn, xs, ws, _ = run(512, jnp.float32)
    hlo = fn.lower(xs, ws).compile().as_text()
    assert "all-reduce" in hlo and "all-gather(" not in hlo


def test_one_process_mesh_keeps_the_compilers_reduction():
    if jax.device_count() < 4:
        pytest.skip("needs 4 CPU devices")
    mesh = shd.make_mesh(4)
    assert shd.process_mesh(mesh) is None
    assert shd.row_parallel_for(mesh, project) is None
    assert shd.row_parallel_for(None, project) is None
