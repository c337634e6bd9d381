"""Memory-mapping budget of compiled executables (Linux).

XLA:CPU's JIT maps every compiled kernel's code, read-only data and data separately, so
each executable costs memory *mappings*, not just memory. Measured here (JAX 0.10.2,
SmolLM2-135M): ~317 mappings per layer shape with the two layer-group executables (whole
model, one layer) and the head. The kernel's default `vm.max_map_count` (65530) thus
holds about 200 shapes; past it LLVM fails with "Cannot allocate memory" and the process
can no longer compile (seen with the co-serving benchmark's 210 shapes). The shape count
grows with `max_num_seqs`, `max_prefill_tokens` and `max_model_len` (the buckets).

`map_budget_warning` is pure (tests call it with numbers); `check_map_budget` reads the
limit and the process's current mappings and logs the warning. Called once by the runner's
constructor (engine start-up thread).
"""
from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger(__name__)

MAPS_PER_SHAPE_PER_GROUP = 160  # measured: ~317 per shape for 2 group sizes + the head
HEADROOM = 0.9


def map_budget_warning(num_shapes: int, num_groups: int, current_maps: int,
                       max_map_count: int) -> Optional[str]:
    """A warning text if compiling every shape would need more than HEADROOM of the
    limit, else None."""
    need = current_maps + num_shapes * num_groups * MAPS_PER_SHAPE_PER_GROUP
    if need <= HEADROOM * max_map_count:
        return None
    return (f"compiling all {num_shapes} shape buckets x {num_groups} layer-group sizes needs "
            f"about {need} memory mappings, over {int(HEADROOM * 100)}% of vm.max_map_count "
            f"({max_map_count}): past it XLA can no longer compile ('Cannot allocate memory'). "
            f"Raise it (sysctl -w vm.max_map_count={max(262144, 2 * need)}) or use fewer "
            f"buckets (lower max_num_seqs, max_prefill_tokens or max_model_len)")


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_map_budget(num_shapes: int, num_groups: int) -> Optional[str]:
    """Log (and return) the warning when this process's budget is short; None elsewhere
    (also on systems without /proc)."""
    limit = _read_int("/proc/sys/vm/max_map_count")
    if limit is None:
        return None
    try:
        with open("/proc/self/maps") as f:
            current = sum(1 for _ in f)
    except OSError:
        return None
    msg = map_budget_warning(num_shapes, num_groups, current, limit)
    if msg:
        log.warning(msg)
    return msg
