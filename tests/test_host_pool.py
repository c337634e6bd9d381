"""HostPool: slots allocate/free, and `gather` copies slots (repeats allowed) into a reused,
64-byte-aligned staging buffer that XLA:CPU's device_put aliases instead of copying."""
import jax
import numpy as np
import pytest

from conserve_jax.kv.host_pool import ALIGN, HostPool, aligned_empty

SHAPE = (3, 2, 2, 16, 8)  # layers, K/V, kv heads, block size, head dim


def filled_pool(n=10):
    pool = HostPool(n, SHAPE, np.float32)
    pool.data[:] = np.arange(pool.data.size, dtype=np.float32).reshape(pool.data.shape)
    return pool


def test_allocate_and_free_slots():
    pool = HostPool(4, SHAPE, np.float32)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_used == 3
    assert pool.allocate(2) == []  # all or nothing
    pool.free(a)
    assert pool.num_free == 4


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_aligned_empty(dtype):
    for shape in [(1,), (5, 7), (2,) + SHAPE]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.ctypes.data % ALIGN == 0


def test_gather_rows_with_repeats_and_reuse():
    pool = filled_pool()
    slots = [7, 2, 2, 9]
    rows = pool.gather(slots)
    np.testing.assert_array_equal(rows, pool.data[slots])
    assert rows.ctypes.data % ALIGN == 0
    first = rows.copy()
    again = pool.gather([1])  # smaller: same buffer, reused
    assert again.ctypes.data == rows.ctypes.data
    np.testing.assert_array_equal(again, pool.data[[1]])
    assert not np.array_equal(rows, first)  # valid only until the next gather (documented)
    big = pool.gather(list(range(10)) + [0])  # larger: grows, still aligned
    np.testing.assert_array_equal(big, pool.data[list(range(10)) + [0]])
    assert big.ctypes.data % ALIGN == 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="host aliasing is a CPU property")
def test_device_put_of_gathered_rows_aliases_on_cpu():
    """The reason for the staging buffer: no second host copy on the restore path."""
    pool = filled_pool()
    rows = pool.gather([3, 4])
    dev = jax.device_put(rows)
    assert dev.unsafe_buffer_pointer() == rows.ctypes.data
    np.testing.assert_array_equal(np.asarray(dev), pool.data[[3, 4]])
