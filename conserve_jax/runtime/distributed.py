"""Start-up of a multi-process (multi-host) run: one JAX process per host over one device
mesh (multi-controller JAX, `jax.distributed`).

`start(config)` is the first JAX work every process does (the entry points and the
`Engine` constructor call it, the follower loop too; it is idempotent): it sets the CPU
device count (`cpu_devices`) and, for `num_processes > 1`, JAX's gloo CPU collectives, then
`jax.distributed.initialize` with the configured coordinator, and returns the configuration
with `tp` resolved (multi-process: the mesh spans `jax.devices()` of every process, so `tp`
is their total; the default 1 means that total). A pipeline run (`pp` > 1, a stage per
process) sets the CPU collectives to None instead of gloo, so that each stage's
tensor-parallel collectives stay in memory, and resolves `tp` to this process's devices. Then every process publishes a fingerprint
of what must be equal everywhere (the configuration but `process_id`, the code of this
package, the JAX version) to the coordinator's key-value store and compares it with process
0's (process 0 with everyone's): a difference raises `ProcessMismatch` naming the fields,
on every process that sees it. Called on the main thread before any other JAX call; it
mutates only JAX's global configuration and its distributed state.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
from typing import Optional

from conserve_jax.config import EngineConfig

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "conserve/fingerprint/{}"


class ProcessMismatch(ValueError):
    """The processes of one run were started with different models, flags or code."""


@dataclasses.dataclass
class _State:
    started: Optional[tuple] = None  # (coordinator, num_processes, process_id) once initialized
    checked: bool = False


_state = _State()


def is_multiprocess(config: EngineConfig) -> bool:
    return config.num_processes > 1


def is_follower(config: EngineConfig) -> bool:
    """Whether this process runs the leader's step plans instead of an engine."""
    return config.num_processes > 1 and config.process_id != 0


def start(config: EngineConfig) -> EngineConfig:
    """Initialize JAX for `config` (module docstring) and return it with `tp` resolved.
    Raises ValueError for a configuration the devices cannot serve and `ProcessMismatch`
    when the processes disagree."""
    import jax

    key = (config.coordinator_address, config.num_processes, config.process_id)
    if _state.started is None:
        if config.cpu_devices is not None:
            jax.config.update("jax_num_cpu_devices", config.cpu_devices)
        if is_multiprocess(config):
            # tensor parallelism across processes needs gloo; pipeline stages keep their
            # collectives inside the process (with gloo even those would go over TCP)
            jax.config.update("jax_cpu_collectives_implementation",
                              "gloo" if config.pp == 1 else None)
            log.info("process %d of %d: connecting to the coordinator at %s",
                     config.process_id, config.num_processes, config.coordinator_address)
            jax.distributed.initialize(
                coordinator_address=config.coordinator_address,
                num_processes=config.num_processes, process_id=config.process_id,
                initialization_timeout=10 * config.process_timeout_s,
                heartbeat_timeout_seconds=config.process_timeout_s,
                shutdown_timeout_seconds=config.process_timeout_s)
        _state.started = key
    elif _state.started != key:
        raise RuntimeError(f"JAX was started as process {_state.started}; cannot restart it "
                           f"as {key} in the same process")
    if not is_multiprocess(config):
        return config
    if config.pp > 1:  # a stage per process: tp over this process's devices only
        devices = jax.local_device_count()
        tp = devices if config.tp == 1 else config.tp
        if tp > devices:
            raise ValueError(f"a pipeline stage (pp={config.pp}) runs tensor parallel over "
                             f"this process's {devices} devices: tp must be at most that, "
                             f"got {config.tp}")
    else:
        devices = jax.device_count()
        tp = devices if config.tp == 1 else config.tp
        if tp != devices:
            raise ValueError(f"a multi-process run spans every process's devices: tp must "
                             f"be {devices} (the default), got {config.tp}")
    config = dataclasses.replace(config, tp=tp)
    if not _state.checked:
        check_peers(config)
        _state.checked = True
    return config


def fingerprint(config: EngineConfig) -> dict:
    """What must be equal on every process of a run (flat field name -> value)."""
    flat = {}

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v)
            elif f.name != "process_id":
                flat[f.name] = v
    walk(config)
    import jax

    flat["code_version"] = code_version()
    flat["jax_version"] = jax.__version__
    flat["local_devices"] = jax.local_device_count()
    return flat


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of this package's Python sources (two processes running different code differ)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def differences(mine: dict, theirs: dict) -> list[str]:
    """'name: mine != theirs' for every field that differs (sorted by name)."""
    names = sorted(set(mine) | set(theirs))
    return [f"{n}: {mine.get(n)!r} != {theirs.get(n)!r}" for n in names
            if mine.get(n) != theirs.get(n)]


def check_peers(config: EngineConfig) -> None:
    """Publish this process's fingerprint and compare (module docstring). Waits up to
    10 x `process_timeout_s` for the others' fingerprints."""
    from jax._src import distributed as jd

    client = jd.global_state.client
    mine = fingerprint(config)
    client.key_value_set(FINGERPRINT_KEY.format(config.process_id),
                         json.dumps(mine, sort_keys=True, default=str))
    peers = range(1, config.num_processes) if config.process_id == 0 else [0]
    timeout_ms = 10 * config.process_timeout_s * 1000
    for pid in peers:
        theirs = json.loads(client.blocking_key_value_get(FINGERPRINT_KEY.format(pid),
                                                          timeout_ms))
        diff = differences(json.loads(json.dumps(mine, default=str)), theirs)
        if diff:
            raise ProcessMismatch(
                f"process {config.process_id} and process {pid} were started differently "
                f"(this process's value != process {pid}'s): " + "; ".join(diff))
    log.info("process %d of %d: fingerprint matches (%d devices in the mesh)",
             config.process_id, config.num_processes, config.tp)
