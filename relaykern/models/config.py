"""The architecture settings a model needs, read from a Hugging Face ``config.json``.

Qwen3, Qwen2 and Llama differ only by switches here (q/k norm, qkv bias, RoPE scaling), so one model file serves all
three. Both config formats are read: transformers 4 (``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and
transformers 5 (``rope_parameters``, ``dtype``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

Arch = Literal["qwen3", "qwen2", "llama"]
SUPPORTED_ARCHS: tuple[str, ...] = ("qwen3", "qwen2", "llama")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """``rope_scaling`` is None (plain RoPE) or a llama3 dict with the keys of ``LLAMA3_ROPE_KEYS``."""

    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {SUPPORTED_ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if self.rope_scaling.get("rope_type") != "llama3" or missing:
                raise ValueError(f"ModelConfig.rope_scaling must be None or llama3-style with keys {LLAMA3_ROPE_KEYS}, "
                                 f"got {self.rope_scaling}")

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Reads ``path/config.json``, plus the EOS ids of ``generation_config.json`` (chat models stop on several)."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model directory {path} not found: it does not exist (or is not a directory)")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"no config.json in model directory {path}: is it a Hugging Face checkpoint?")
        d = json.loads(config_file.read_text())
        generation_file = path / "generation_config.json"
        if generation_file.is_file():
            extra_eos = _as_id_list(json.loads(generation_file.read_text()).get("eos_token_id"))
            d = {**d, "eos_token_id": _as_id_list(d.get("eos_token_id")) + extra_eos}
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config dict (``config.json`` contents)."""
        arch = d.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported model_type {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' two names of x * sigmoid(x)
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only 'silu' / 'swish')")
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method", "?")
            raise ValueError(f"quantized checkpoints ({method}) are not supported: give bf16/fp16/fp32 weights")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        if arch == "llama" and d.get("mlp_bias"):
            raise ValueError("llama with mlp_bias=true is not supported")
        # Qwen2 always has q/k/v biases; elsewhere attention_bias would also put a bias on o_proj, which we lack.
        if arch != "qwen2" and d.get("attention_bias"):
            raise ValueError(f"{arch} with attention_bias=true is not supported")
        rope_theta, rope_scaling = _parse_rope(d)
        num_heads = d["num_attention_heads"]
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qk_norm=arch == "qwen3",
            qkv_bias=arch == "qwen2",
            eos_token_ids=list(dict.fromkeys(_as_id_list(d.get("eos_token_id")))),
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=_parse_dtype(dtype),
        )


def _parse_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) and ``rope_theta`` / ``rope_scaling`` (4).

    A config may hold both spellings (a transformers 5 save edited by hand, say). Where they disagree, libraries
    read them in different orders, so a disagreement is an error rather than positions silently computed one way.
    """
    blocks = [dict(d[key]) for key in ("rope_parameters", "rope_scaling") if d.get(key)]
    thetas = {float(theta) for theta in [d.get("rope_theta")] + [b.pop("rope_theta", None) for b in blocks]
              if theta is not None}
    if len(thetas) > 1:
        raise ValueError(f"config.json gives conflicting rope_theta values {sorted(thetas)}")
    theta = thetas.pop() if thetas else 10000.0
    scalings = [_rope_scaling(b) for b in blocks]
    scalings = [scaling for scaling in scalings if scaling is not None]
    if len(scalings) == 2 and scalings[0] != scalings[1]:
        raise ValueError(f"config.json's rope_parameters {scalings[0]} and rope_scaling {scalings[1]} disagree")
    return theta, (scalings[0] if scalings else None)


def _rope_scaling(block: dict[str, Any]) -> dict[str, Any] | None:
    rope_type = block.get("rope_type", block.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: none/default, llama3)")
    return {"rope_type": "llama3", **{k: block[k] for k in LLAMA3_ROPE_KEYS if k in block}}


def _parse_dtype(name: str | torch.dtype) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else name
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch_dtype {name!r}")
    return dtype


def _as_id_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
