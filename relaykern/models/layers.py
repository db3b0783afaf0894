"""Building blocks of the decoder: linear layers (fused qkv / gate_up), RMSNorm, the RoPE table.

All work on packed rows ``[T, ...]`` (the tokens of every sequence in a step, one after another). Parameters are
allocated with ``torch.empty`` in the current default device/dtype: weights come from the loader, so there is no
init to pay for, and building under ``torch.device("meta")`` or the target device costs no second copy.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from relaykern.models.ops import Ops

if TYPE_CHECKING:
    from relaykern.models.attention import AttentionContext


class Linear(nn.Module):
    """``y = x @ weight.T + bias``; weight ``[out, in]`` as in ``nn.Linear``.

    ``forward(x, ctx)`` with a step context: a one-row step that asks for it (``ctx.gemv``) runs ``ops.gemv``;
    ``norm_linear`` and ``silu_linear`` also fold the op before the projection into that kernel.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, ctx: "AttentionContext | None" = None) -> torch.Tensor:
        if ctx is not None and one_row_gemv(ctx, x):
            return ctx.ops.gemv(x, self.weight, self.bias, split_counters=ctx.gemv_counters)
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
    """``x / rms(x) * weight`` over the last dim (``relaykern.kernels.rms_norm`` computes it).

    ``forward(x, ops, residual)`` with a residual is the fused pre-norm step: ``residual + x`` is the new residual
    stream and its norm is the next block's input.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, ops: Ops, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual)


def one_row_gemv(ctx: "AttentionContext", x: torch.Tensor) -> bool:
    """Whether this projection runs as ``ops.gemv``: the step asks for it and feeds one row."""
    return ctx.gemv and x.shape[0] == 1


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, linear: Linear,
                ctx: "AttentionContext") -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(norm(residual + x))`` and the new residual stream ``residual + x`` (``x`` itself when ``residual``
    is None, at the first layer): one fused GEMV kernel for a one-row step that asks for it (``ctx.gemv``)."""
    if one_row_gemv(ctx, x):
        return ctx.ops.gemv(x, linear.weight, linear.bias, "rms_norm", residual, norm.weight, norm.eps,
                            split_counters=ctx.gemv_counters)
    normed, residual = (norm(x, ctx.ops), x) if residual is None else norm(x, ctx.ops, residual)
    return linear(normed), residual


def silu_linear(gate_up: torch.Tensor, linear: Linear, ctx: "AttentionContext") -> torch.Tensor:
    """``linear(silu(gate) * up)`` of ``gate_up = [gate | up]``; one fused GEMV kernel as in ``norm_linear``."""
    if one_row_gemv(ctx, gate_up):
        return ctx.ops.gemv(gate_up, linear.weight, linear.bias, "silu_and_mul", split_counters=ctx.gemv_counters)
    return linear(ctx.ops.silu_and_mul(gate_up))


class RotaryEmbedding(nn.Module):
    """The table of Neox-style RoPE (``relaykern.kernels.rope`` applies it).

    ``cos_sin_cache[p] = [cos(p * inv_freq), sin(p * inv_freq)]``, ``[max_position, head_dim]`` in fp32; it is
    not a parameter (recomputed at build, never loaded).
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)


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
