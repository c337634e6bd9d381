"""The start-up check of compiled-code memory mappings against vm.max_map_count."""
from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.runtime.map_budget import map_budget_warning


def test_default_limit_is_too_small_for_the_coserve_geometry():
    # 16 sequences, 512 prefill tokens, 1280 tokens of context: 210 shapes, 2 group sizes
    shapes = len(BucketSet.build(16, 512, 1, 80).layer_shapes())
    msg = map_budget_warning(shapes, 2, current_maps=3000, max_map_count=65530)
    assert msg is not None and "vm.max_map_count" in msg and str(shapes) in msg
    assert map_budget_warning(shapes, 2, current_maps=3000, max_map_count=262144) is None


def test_small_geometry_fits():
    shapes = len(BucketSet.build(4, 32, 1, 8).layer_shapes())
    assert map_budget_warning(shapes, 2, current_maps=3000, max_map_count=65530) is None
