"""Random-weight checkpoints, offline: tiny ones for CPU tests, real-shaped ones for GPU benchmarks.

Both write a complete Hugging Face checkpoint directory (config.json, safetensors weights, the Qwen3 tokenizer), so
``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load it without network.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from relaykern.tokenizer import ENDOFTEXT_ID, IM_END_ID, load_qwen3_tokenizer

TINY_INIT_STD = 0.3
"""Large on purpose: with the usual 0.02 a tiny random model's logits are nearly flat and greedy decoding repeats
one token; at 0.3 greedy outputs change from step to step (Qwen3's q/k norms damp smaller values), so tests see
varied tokens."""
MAX_SHARD_BYTES = 2 * 1024**3


def tiny_config(
    arch: str = "qwen3",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int = 151936,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> PretrainedConfig:
    """The transformers config of a tiny model; ``arch`` is ``"qwen3"``, ``"qwen2"`` or ``"llama"``."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        dtype=dtype,
    )
    if arch == "qwen3":
        return Qwen3Config(head_dim=head_dim, **common)
    if arch == "llama":
        return LlamaConfig(head_dim=head_dim, **common)
    if arch == "qwen2":
        if head_dim * num_heads != hidden_size:  # Qwen2Config has no head_dim: it is always hidden/heads
            raise ValueError(f"arch='qwen2' needs head_dim * num_heads == hidden_size, got {head_dim} * "
                             f"{num_heads} != {hidden_size}; change head_dim or use arch='qwen3'")
        return Qwen2Config(**common)
    raise ValueError(f"unknown arch {arch!r}: use 'qwen3', 'qwen2' or 'llama'")


def save_tiny_checkpoint(
    path: str | Path, *, arch: str = "qwen3", seed: int = 0, dtype: torch.dtype = torch.float32, **shape: int | bool
) -> Path:
    """Writes a tiny random model (weights ~ N(0, TINY_INIT_STD), norms 1) and the tokenizer; returns ``path``.
    ``shape``: ``tiny_config``'s keyword arguments (``hidden_size``, ``num_layers``, ``vocab_size``, ...).

    The same arguments and seed give the same weights. The output rows of the ids past the tokenizer (151669..) are
    zero, so greedy decoding never picks them (sampling still may, rarely, as with any model).
    """
    config = tiny_config(arch, dtype=dtype, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    output_name = _output_embedding_name(model)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            _init_(name, param, TINY_INIT_STD, output_name)
    path = Path(path)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    load_qwen3_tokenizer().save_pretrained(path)
    return path


def save_shaped_checkpoint(
    path: str | Path,
    shapes_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Path:
    """Writes random weights of the exact shapes of ``shapes_dir/config.json`` (e.g. /work/shared/model-shapes/*).

    The model is built on the meta device (no memory), then each tensor is drawn on its own, one shard at a time:
    weights ~ N(0, initializer_range), norms 1, LM-head rows of ids past the tokenizer 0. Shards hold at most
    ``MAX_SHARD_BYTES`` (a larger single tensor gets a shard of its own) and are listed in
    ``model.safetensors.index.json``. Tied weights are stored once, as transformers does. Returns ``path``.

    The numbers are drawn on ``device`` (default: CUDA if available; the CPU draws ~0.5 G values/s on one thread,
    minutes for an 8B model) and so depend on it as well as on ``seed``.
    """
    config = AutoConfig.from_pretrained(shapes_dir)
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: param.shape for name, param in model.named_parameters()}  # tied weights appear once
    output_name = _output_embedding_name(model)
    itemsize = torch.empty((), dtype=dtype).element_size()

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        size = shape.numel() * itemsize
        if shards[-1] and shard_bytes + size > MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator(device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    for index, names in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensor = torch.empty(shapes[name], dtype=dtype, device=device)
            tensors[name] = _init_(name, tensor, config.initializer_range, output_name, generator).cpu()
            weight_map[name] = file_name
        save_file(tensors, path / file_name, metadata={"format": "pt"})
    total_size = sum(shape.numel() for shape in shapes.values()) * itemsize
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    config.save_pretrained(path)
    load_qwen3_tokenizer().save_pretrained(path)
    return path


def _output_embedding_name(model: torch.nn.Module) -> str:
    """The parameter name of the LM head's weight (the embedding's name when tied)."""
    head = model.get_output_embeddings().weight
    return next(name for name, param in model.named_parameters() if param is head)


@torch.no_grad()
def _init_(
    name: str, tensor: torch.Tensor, std: float, output_name: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """In place: norms 1, everything else N(0, std); rows of ids no tokenizer produces are zeroed in the LM head."""
    if "norm" in name:
        return tensor.fill_(1.0)
    tensor.normal_(0.0, std, generator=generator)
    if name == output_name:
        tensor[len(load_qwen3_tokenizer()) :] = 0.0
    return tensor
