"""Persistent XLA compilation cache (works on CPU too). Called by entry points/engine."""
from __future__ import annotations

import os
from typing import Optional

import jax

_enabled: Optional[str] = None


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "conserve-jax", "xla")


def enable_compilation_cache(path: Optional[str]) -> None:
    """Point JAX's persistent cache at `path` (None: the default directory; "" disables)."""
    global _enabled
    if path == "":
        return
    path = path or default_cache_dir()
    if _enabled == path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = path
