"""Training configs: dataclasses filled from YAML or TOML files, with ``key.sub=value`` overrides.

Unknown keys are errors (a typo should not silently train with a default). Nested dataclass fields take a
mapping; tuple fields take a list.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml`` or ``.toml`` file."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text()) or {}
    elif path.suffix == ".toml":
        data = tomllib.loads(path.read_text())
    else:
        raise ValueError(f"config {path}: unknown format {path.suffix!r}; use .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-5", "data.num_prompts=8"]`` → updated copy; values are parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (dots for nested keys)")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Builds dataclass ``cls`` from ``data``: nested dataclasses recursively, lists to tuples where typed so."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"config{where}: unknown keys {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        nested = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, f"{where}.{name}")
        elif isinstance(value, list) and any(typing.get_origin(t) is tuple for t in (hint, *typing.get_args(hint))):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


class FileConfig:
    """Mixin for config dataclasses: ``Config.from_file(path, overrides)``."""

    @classmethod
    def from_file(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
        return from_dict(cls, apply_overrides(read_config_file(path), overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
