"""The one path from user input to an `EngineConfig`, and the flag generator behind it.

Every engine knob is a field of `EngineConfig` or of one of its nested groups
(`CacheConfig`, `ConserveConfig`), documented once there (the field's help text). From
those fields this module derives:

- `add_engine_args(parser)`: argparse flags (`--max-num-seqs`, `--block-size`,
  `--tpot-margin`, ...) for `serve`, `generate`, `profile` and the benchmarks, with
  per-entry-point defaults when an entry point wants different ones;
- `engine_config_from_args(args)`: the `EngineConfig` those flags describe;
- `engine_config(**kwargs)`: the same from flat keyword arguments (`LLM(**kwargs)`),
  raising TypeError naming an unknown argument.

Flat names are unique across the groups (a test checks it), so `--block-size` and
`block_size=` need no prefix.

The generator works for any dataclass (the server's `conserve_server.config.ServerConfig`
uses it too): `add_dataclass_args(parser, cls, title, key)` declares `--field-name` for
every leaf field (fields whose type is a dataclass are groups, flattened) with the
field's help text (`field(metadata={"help": ...})`) and default; a field marked
`metadata={"plain": "<why>"}` (e.g. bytes a process reads from a file) is never a flag.
`dataclass_values(args, key)` reads back exactly the flags that call declared, and
`build_dataclass(cls, values)` rebuilds the nested instance. Supported
flag types: int, float, str, bool (`--x/--no-x`) and Optional of the first three (the
values none/off/empty mean None); a field's `metadata={"parse": fn}` replaces the
converter of its flag (fn(text) -> value, raising ValueError on bad text). Pure
functions; entry points call them on their main thread while parsing.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterator, Optional

from conserve_jax.config import EngineConfig

_DECLARED = "_engine_knobs_declared"


def dataclass_fields(cls, path: tuple[str, ...] = ()
                     ) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path to the field, field, resolved type) for every leaf field of the dataclass
    `cls`; fields whose type is a dataclass (groups) are flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from dataclass_fields(tp, path + (f.name,))
        else:
            yield path + (f.name,), f, tp


def knob_names() -> list[str]:
    return [p[-1] for p, _, _ in dataclass_fields(EngineConfig)]


def field_default(f: dataclasses.Field):
    """A field's default value (calling its default_factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]



def _scalar_type(tp):
    """(python type, optional?) of an annotation such as Optional[int]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0], True
    return tp, False


def flag_name(name: str) -> str:
    """The command-line flag of a field: `max_num_seqs` -> `--max-num-seqs`."""
    return "--" + name.replace("_", "-")


def is_flag(f: dataclasses.Field) -> bool:
    """Whether a leaf field becomes a flag: every one not marked plain."""
    return not f.metadata.get("plain")


def _declared_key(key: str) -> str:
    return _DECLARED if key == "engine" else f"_{key}_fields_declared"


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str, key: str,
                       defaults: Optional[dict] = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Declare a flag for every leaf field of `cls` not marked plain (except `exclude`) in an
    argument group called `title`; returns the declared field names. `defaults` overrides
    the fields' defaults for this entry point (by field name). `key` names this set of
    flags for `dataclass_values` (one parser may carry several dataclasses' flags)."""
    defaults = defaults or {}
    unknown = set(defaults) - {p[-1] for p, _, _ in dataclass_fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field named {sorted(unknown)}")
    group = parser.add_argument_group(title)
    declared = []
    for path, f, tp in dataclass_fields(cls):
        name = path[-1]
        if name in exclude or not is_flag(f):
            continue
        declared.append(name)
        flag = flag_name(name)
        default = defaults.get(name, field_default(f))
        help_text = f.metadata.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{name} is a flag without help text")
        base, optional = _scalar_type(tp)
        if base is bool:
            group.add_argument(flag, dest=name, default=default,
                               action=argparse.BooleanOptionalAction, help=help_text)
            continue
        if base not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{name} has a type flags cannot carry: {tp}")
        conv = f.metadata.get("parse") or (_optional(base) if optional else base)
        group.add_argument(flag, dest=name, type=conv, default=default,
                           help=f"{help_text} (default {default})")
    # which attributes of the parsed namespace are this dataclass's fields: only these are
    # read back (an entry point's own flag that happens to share a name is never taken)
    parser.set_defaults(**{_declared_key(key): tuple(declared)})
    return declared


def dataclass_values(args: argparse.Namespace, key: str) -> dict:
    """The values of exactly the flags `add_dataclass_args(..., key=key)` declared on the
    parser that produced `args` (flat field names)."""
    declared = getattr(args, _declared_key(key), None)
    if declared is None:
        raise ValueError(f"args were not parsed by a parser that add_dataclass_args "
                         f"set up for {key!r}")
    return {n: getattr(args, n) for n in declared}


def build_dataclass(cls, values: dict):
    """An instance of `cls` from flat field values (nested groups built too); fields not
    in `values` keep their defaults."""
    return _build(cls, (), values)


def add_engine_args(parser: argparse.ArgumentParser, defaults: Optional[dict] = None,
                    exclude: tuple[str, ...] = ()) -> None:
    """Declare a flag for every engine knob (except `exclude`) in an argument group.
    `defaults` overrides EngineConfig's defaults for this entry point (by flat name)."""
    defaults = defaults or {}
    unknown = set(defaults) - set(knob_names())
    if unknown:
        raise ValueError(f"no engine knob named {sorted(unknown)}")
    add_dataclass_args(parser, EngineConfig, "engine", "engine", defaults, exclude)


def _optional(base):
    def conv(text: str):
        return None if text.lower() in ("none", "off", "") else base(text)
    conv.__name__ = base.__name__
    return conv


def engine_config(**kwargs) -> EngineConfig:
    """An EngineConfig from flat keyword arguments; TypeError names an unknown one."""
    unknown = set(kwargs) - set(knob_names())
    if unknown:
        raise TypeError(f"unknown engine argument(s) {sorted(unknown)}; known: "
                        f"{', '.join(sorted(knob_names()))}")
    return resolve_auto_dtype(_build(EngineConfig, (), kwargs))


def resolve_auto_dtype(cfg: EngineConfig) -> EngineConfig:
    """`dtype="auto"` made concrete for the backend JAX uses: bfloat16 on GPU and TPU (their
    matrix units run bfloat16 at several times float32's rate, and weights and KV take half
    the memory), float32 on CPU (fastest there: CPU kernels for bfloat16 attention and
    elementwise work are slower than float32's; `weight_dtype=bfloat16` is the CPU's way to
    use AMX). Other values are returned unchanged. Multi-process runs and `cpu_devices` need
    an explicit dtype: asking the backend would start JAX before they can set it up."""
    if cfg.dtype != "auto":
        return cfg
    if cfg.num_processes > 1 or cfg.cpu_devices is not None:
        raise ValueError("dtype auto cannot be resolved before JAX is set up for a "
                         "multi-process run or cpu_devices; give dtype explicitly (float32 on "
                         "CPU, bfloat16 on GPU/TPU)")
    import jax

    backend = jax.default_backend()
    return dataclasses.replace(cfg, dtype="float32" if backend == "cpu" else "bfloat16")


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    """The flat knob values (`LLM(**kwargs)` / `engine_config(**kwargs)` shape) of exactly
    the flags `add_engine_args` declared on the parser that produced `args`."""
    declared = getattr(args, _DECLARED, None)
    if declared is None:
        raise ValueError("args were not parsed by a parser that add_engine_args set up")
    return {n: getattr(args, n) for n in declared}


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig that `add_engine_args` flags parsed into `args` describe (knobs
    excluded from the flags keep their defaults unless given in `overrides`)."""
    return engine_config(**{**engine_kwargs_from_args(args), **overrides})


def _build(cls, path: tuple[str, ...], values: dict):
    kw = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kw[f.name] = _build(tp, path + (f.name,), values)
        elif f.name in values:
            kw[f.name] = values[f.name]
    return cls(**kw)
