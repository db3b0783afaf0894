"""Building blocks of the decoder: linear layers (fused qkv / gate_up), RMSNorm, RoPE, SiLU-and-mul.

All work on packed rows ``[T, ...]`` (the tokens of every sequence in a step, one after another). Parameters are
allocated with ``torch.empty`` in the current default device/dtype: weights come from the loader, so there is no
init to pay for, and building under ``torch.device("meta")`` or the target device costs no second copy.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """``y = x @ weight.T + bias``; weight ``[out, in]`` as in ``nn.Linear``."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim, so one GEMM computes them all.

    Shard ``i`` owns output rows ``[sum(output_sizes[:i]), sum(output_sizes[:i+1]))`` of weight and bias;
    the loader copies each checkpoint tensor (q_proj, k_proj, ...) into its shard.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    def shard(self, param: torch.Tensor, shard_id: int) -> torch.Tensor:
        """The rows of ``param`` (this module's weight or bias) that shard ``shard_id`` owns, as a view."""
        return param.narrow(0, sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id])


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, normalized in fp32 and scaled in the model dtype (as HF does).

    ``forward(x, residual)`` is the fused pre-norm step: ``residual + x`` is the new residual stream (summed in
    the model dtype, like HF's ``hidden = residual + hidden``) and its norm is the next block's input.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate the two halves of each head) from a cos/sin table over all positions.

    ``cos_sin_cache[p] = [cos(p * inv_freq), sin(p * inv_freq)]``, ``[max_position, head_dim]`` in fp32; it is
    not a parameter (recomputed at build, never loaded). ``forward`` gathers the rows' cos/sin once per step;
    ``apply_rotary`` then rotates in the activations' dtype, as HF does.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]`` → (cos, sin), each ``[T, 1, head_dim // 2]`` in ``dtype`` (broadcast over heads)."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x[T, H, D]``: ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` (HF's ``rotate_half`` form)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``, short kept, the band between blended."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for ``x = [gate | up]`` (the fused gate_up projection's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
