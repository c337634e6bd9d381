"""The one path from user input to an `EngineConfig`.

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
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterator, Optional

from conserve_jax.config import EngineConfig

_DECLARED = "_engine_knobs_declared"


def _fields(cls=EngineConfig, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path to the field, field, resolved type) for every leaf knob, nested groups flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, path + (f.name,))
        else:
            yield path + (f.name,), f, tp


def knob_names() -> list[str]:
    return [p[-1] for p, _, _ in _fields()]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _scalar_type(tp):
    """(python type, optional?) of an annotation such as Optional[int]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0], True
    return tp, False


def add_engine_args(parser: argparse.ArgumentParser, defaults: Optional[dict] = None,
                    exclude: tuple[str, ...] = ()) -> None:
    """Declare a flag for every engine knob (except `exclude`) in an argument group.
    `defaults` overrides EngineConfig's defaults for this entry point (by flat name)."""
    defaults = defaults or {}
    unknown = set(defaults) - set(knob_names())
    if unknown:
        raise ValueError(f"no engine knob named {sorted(unknown)}")
    group = parser.add_argument_group("engine")
    declared = []
    for path, f, tp in _fields():
        name = path[-1]
        if name in exclude:
            continue
        declared.append(name)
        flag = "--" + name.replace("_", "-")
        default = defaults.get(name, _default(f))
        help_text = f.metadata.get("help", "")
        base, optional = _scalar_type(tp)
        if base is bool:
            group.add_argument(flag, dest=name, default=default,
                               action=argparse.BooleanOptionalAction, help=help_text)
            continue
        if base not in (int, float, str):
            raise TypeError(f"engine knob {name} has a type flags cannot carry: {tp}")
        conv = _optional(base) if optional else base
        group.add_argument(flag, dest=name, type=conv, default=default,
                           help=f"{help_text} (default {default})")
    # which attributes of the parsed namespace are engine knobs: only these are read back
    # (an entry point's own flag that happens to share a knob's name is never taken)
    parser.set_defaults(**{_DECLARED: tuple(declared)})


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
    return _build(EngineConfig, (), kwargs)


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
