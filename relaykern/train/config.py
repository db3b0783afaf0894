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
LR_SCHEDULES = ("linear", "cosine", "constant")


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


@dataclasses.dataclass
class TrainingRun(FileConfig):
    """What SFT and GRPO runs share: the optimiser (AdamW, ``lr_schedule`` ``"linear"``, ``"cosine"`` or
    ``"constant"`` after a linear warm-up), micro-batching, precision (``"fp32"`` or ``"bf16"`` autocast), seed,
    checkpoints (every ``save_every`` steps, 0: at the end only; the last ``keep_last`` kept; ``resume`` from the
    newest) and device. Each trainer's config sets its own defaults."""

    output_dir: str = "runs"
    micro_batch_size: int = 2
    lr: float = 1e-6
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 0
    keep_last: int = 2
    device: str | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        for name, allowed in {"precision": ("fp32", "bf16"), "lr_schedule": LR_SCHEDULES}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{type(self).__name__}.{name} must be one of {allowed}, got {getattr(self, name)!r}")
