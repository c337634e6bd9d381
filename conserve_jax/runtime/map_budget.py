"""Executables an engine compiles, and the memory mappings they need (Linux).

XLA:CPU's JIT maps every compiled kernel's code, read-only data and data separately, so
each executable costs memory *mappings*, not just memory; past the kernel's
`vm.max_map_count` (65530 by default) LLVM fails with "Cannot allocate memory" and the
process crashes mid-compile. The engine therefore counts, from its configuration alone,
what it will compile (`planned_executables`) and refuses a configuration whose mappings
would pass the limit (`check_map_budget` raises `MapBudgetExceeded`, naming the limit and
the knobs to lower) before the model loads and long before anything compiles.

The per-executable costs are measured on this project's CPU (JAX 0.10.2, SmolLM2-135M,
`/proc/self/maps` before and after warm-up); they grow with the layers per call, so the
layer cost is per layer of the group. Pure functions except `current_maps` /
`max_map_count`, which read /proc (None where there is none). Called on the engine's
start-up thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from conserve_jax.runtime.buckets import BucketSet

MAPS_PER_LAYER_IN_GROUP = 12  # per (token bucket, group size): this x layers in the group
MAPS_PER_LAYER_EXECUTABLE = 40  # and this once per layer executable
MAPS_PER_SMALL_EXECUTABLE = 16  # embed, row select, sampler head, KV gather/scatter
HEADROOM = 0.9  # refuse past this share of the limit (other libraries map too)


class MapBudgetExceeded(ValueError):
    """The configuration would compile more than `vm.max_map_count` allows."""


@dataclass(frozen=True)
class ExecutablePlan:
    """What the runner (and the KV checkpointer) compile for one configuration."""

    token_buckets: int
    group_sizes: tuple[int, ...]  # distinct layers-per-call sizes
    small: int  # embed + row select + sampler head + KV transfer executables

    @property
    def layer(self) -> int:
        """Layer executables: one per (token bucket, group size)."""
        return self.token_buckets * len(self.group_sizes)

    @property
    def total(self) -> int:
        return self.layer + self.small

    @property
    def maps(self) -> int:
        """Memory mappings these executables need once compiled."""
        per_bucket = sum(MAPS_PER_LAYER_EXECUTABLE + MAPS_PER_LAYER_IN_GROUP * g
                         for g in self.group_sizes)
        return self.token_buckets * per_bucket + self.small * MAPS_PER_SMALL_EXECUTABLE


def planned_executables(buckets: BucketSet, group_sizes, transfer_sizes: int = 0,
                        head_variants: int = 6) -> ExecutablePlan:
    """`head_variants`: sampler modes x logprob settings compiled per sample-row bucket;
    `transfer_sizes`: KV checkpoint block-count buckets (gather and scatter each)."""
    small = (len(buckets.tokens) + len(buckets.select_shapes())
             + len(buckets.head_rows()) * head_variants + 2 * transfer_sizes)
    return ExecutablePlan(len(buckets.tokens), tuple(sorted(set(group_sizes))), small)


def budget_error(plan: ExecutablePlan, current_maps: int, max_map_count: int) -> Optional[str]:
    """The refusal text if compiling `plan` would pass HEADROOM of the limit, else None."""
    need = current_maps + plan.maps
    if need <= HEADROOM * max_map_count:
        return None
    return (f"this configuration compiles {plan.total} executables ({plan.token_buckets} token "
            f"buckets x {len(plan.group_sizes)} layer-group sizes {list(plan.group_sizes)}, "
            f"plus {plan.small} small ones) needing about {need} memory mappings, over "
            f"{int(HEADROOM * 100)}% of vm.max_map_count ({max_map_count}); past it XLA cannot "
            f"compile and the process would crash. Lower max_num_seqs or max_prefill_tokens "
            f"(fewer token buckets), set safepoint_interval to none or layers_per_call to the "
            f"safepoint interval (fewer group sizes), or raise the limit "
            f"(sysctl -w vm.max_map_count={max(262144, 2 * need)})")


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def max_map_count() -> Optional[int]:
    return _read_int("/proc/sys/vm/max_map_count")


def current_maps() -> Optional[int]:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def check_map_budget(plan: ExecutablePlan) -> None:
    """Raise MapBudgetExceeded when this process cannot compile `plan` (no-op without /proc)."""
    limit, current = max_map_count(), current_maps()
    if limit is None or current is None:
        return
    msg = budget_error(plan, current, limit)
    if msg:
        raise MapBudgetExceeded(msg)
