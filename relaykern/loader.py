"""Hugging Face safetensors checkpoints → our model, fusing q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``.

Every checkpoint tensor name maps to one destination view: a whole parameter, or one shard of a fused one (see
``weight_targets``). Loading from disk and pushing a trainer's in-memory weights share that table, so both see the
same names, shape checks and errors. Pickle checkpoints (``*.bin``) are never read.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from relaykern.models import ModelConfig, build_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TIED_HEAD, EMBEDDINGS = "lm_head.weight", "model.embed_tokens.weight"


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, ModelConfig]:
    """Builds the model of ``path/config.json`` on ``device`` in ``dtype`` (default: the config's) and fills it.

    Parameters are allocated once, directly on ``device`` in ``dtype``; each checkpoint tensor is read and copied
    into place, so peak memory is the model plus one tensor.
    """
    path = Path(path)
    config = ModelConfig.from_dir(path)
    files = safetensors_files(path)
    with torch.device(device), _default_dtype(dtype or config.torch_dtype):
        model = build_model(config)
    targets = weight_targets(model)
    loaded: dict[str, Path] = {}
    head = None
    for file in files:
        with safe_open(file, framework="pt", device=str(torch.device(device))) as f:
            for name in _copy_weights(targets, f.keys(), f.get_tensor, config, where=str(file)):
                if name in loaded:
                    raise ValueError(f"tensor {name!r} is in both {loaded[name].name} and {file.name}: which one "
                                     f"the model should get is ambiguous")
                loaded[name] = file
            if config.tie_word_embeddings and TIED_HEAD in f.keys():
                head = f.get_tensor(TIED_HEAD)
    _check_complete(targets, set(loaded), config, where=str(path))
    _check_tied_head(model, head, where=str(path))
    return model.eval(), config


def load_state_dict_into(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copies HF-named tensors (e.g. a trainer's ``hf_model.state_dict()``) into ``model`` in place.

    In place means parameter storage keeps its address, so a running engine (CUDA graphs included) sees the new
    weights at its next step. ``strict=False`` allows a subset (only the tensors given are updated).
    """
    targets = weight_targets(model)
    loaded = _copy_weights(targets, state_dict.keys(), state_dict.__getitem__, model.config, where="state_dict")
    if strict:
        _check_complete(targets, loaded, model.config, where="state_dict")
    if EMBEDDINGS in state_dict:  # a partial update may send a head without the embeddings it was tied to
        _check_tied_head(model, state_dict.get(TIED_HEAD), where="state_dict")


def weight_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF tensor name → the view of our parameter it fills.

    ``packed_modules_mapping`` maps an HF module name to (our fused module, shard): ``...self_attn.k_proj.weight``
    → shard 1 of ``...self_attn.qkv_proj.weight``. Other names are ours unchanged.
    """
    packed: dict[str, list[tuple[int, str]]] = {}
    for hf_module, (fused_module, shard_id) in model.packed_modules_mapping.items():
        packed.setdefault(fused_module, []).append((shard_id, hf_module))
    targets: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        parent, _, module_leaf = module_name.rpartition(".")
        if module_leaf not in packed:
            targets[name] = param.data
            continue
        module = model.get_submodule(module_name)
        for shard_id, hf_module in packed[module_leaf]:
            targets[f"{parent}.{hf_module}.{param_name}"] = module.shard(param.data, shard_id)
    return targets


def safetensors_files(path: Path) -> list[Path]:
    """The shards named by ``model.safetensors.index.json`` if present, else ``model.safetensors`` if present (as
    transformers: other files beside it, adapters say, are not the model), else every ``*.safetensors``."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no 'weight_map': cannot tell which shard holds which tensor")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} names shard(s) {absent} that are not in {path}: the download is incomplete")
        return files
    files = [path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
        hint = f"; found {pickles}, but pickle files are never loaded: convert them to safetensors" if pickles else ""
        raise ValueError(f"no *.safetensors files in {path}{hint}")
    return files


def _copy_weights(
    targets: dict[str, torch.Tensor],
    names: Iterable[str],
    get: Callable[[str], torch.Tensor],
    config: ModelConfig,
    where: str,
) -> set[str]:
    """Copies each named tensor into its target (casting dtype and device); returns the names copied."""
    copied = set()
    for name in names:
        target = targets.get(name)
        if target is None:
            if _is_harmless(name, config):
                continue
            raise ValueError(f"unexpected tensor {name!r} in {where}: no such weight in a {config.arch} model with "
                             f"this config (is the checkpoint for another architecture?)")
        tensor = get(name)
        if tensor.shape != target.shape:
            raise ValueError(f"tensor {name!r} in {where} has shape {tuple(tensor.shape)}, but the config implies "
                             f"{tuple(target.shape)}: config.json and the weights disagree")
        with torch.no_grad():
            target.copy_(tensor)
        copied.add(name)
    return copied


def _is_harmless(name: str, config: ModelConfig) -> bool:
    """Tensors some checkpoints carry that we rebuild or do not use: RoPE tables, and lm_head when tied (then
    checked against the embeddings by ``_check_tied_head``)."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == TIED_HEAD)


def _check_tied_head(model: nn.Module, head: torch.Tensor | None, where: str) -> None:
    """A tied model's checkpoint may carry lm_head.weight too: a copy of the embeddings, or a sign that config.json
    is wrong (transformers 5 then unties the model, transformers 4 and vLLM drop the head): ambiguous, so an error."""
    if head is None or not model.config.tie_word_embeddings:
        return
    embed = model.get_parameter(EMBEDDINGS)
    if head.shape != embed.shape or not torch.equal(head.to(embed), embed):
        raise ValueError(f"{where}: {TIED_HEAD} differs from {EMBEDDINGS}, but config.json ties them "
                         f"(tie_word_embeddings: true); set it to false if the stored head is the model's")


def _check_complete(targets: dict[str, torch.Tensor], loaded: set[str], config: ModelConfig, where: str) -> None:
    missing = [name for name in targets if name not in loaded]
    if not missing:
        return
    hint = (" (tie_word_embeddings is false in config.json, so lm_head.weight is required)"
            if "lm_head.weight" in missing and not config.tie_word_embeddings else "")
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ValueError(f"{where} is missing tensor(s) {shown}{hint}")


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
