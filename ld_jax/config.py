"""Frozen dataclass configs loaded from YAML, with `key=value` command-line overrides.

Each experiment defines its own frozen dataclass (nested dataclasses allowed). `load_config`
reads a YAML file into it, checking that every key exists, and applies dotted overrides such as
`train.lr=1e-6 loss.name=ipo`. Values of overrides are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ld_jax.errors import LdJaxError

T = TypeVar("T")


class ConfigError(LdJaxError, ValueError):
    """A config file or override that does not fit its dataclass."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys at this level: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = _strip_optional(hints[name])
        if _is_dataclass_type(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=f"{where}{name}.")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif tp is float and isinstance(value, int | str) and not isinstance(value, bool):
            value = float(value)  # YAML reads 1e-7 as a string
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"invalid config{' at ' + where.rstrip('.') if where else ''}: {e}"
        ) from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """The inverse of `from_dict`: a plain dict, safe to dump as YAML or JSON."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read YAML at `path` (or start from defaults when None) into `cls`, then apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)
