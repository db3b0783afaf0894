"""Paged attention glue: one step's metadata, and the layer that attends over the pool."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from relaykern.kernels.rope import NewKV
from relaykern.models.ops import BACKENDS, PDL_OPS, Ops


@dataclass
class AttentionContext:
    """Where this step's ``T`` packed rows go and what they attend to, shared by every layer.

    Sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``: its last ``q_len_b`` tokens, at positions
    ``seq_lens[b] - q_len_b .. seq_lens[b] - 1``. Row ``t``'s K/V goes to flat slot ``slot_mapping[t]``
    (``= block * block_size + offset``; -1 = don't store); token ``p`` of sequence ``b`` lives in block
    ``block_tables[b, p // block_size]``. Attention is causal, aligned bottom-right.
    """

    slot_mapping: torch.Tensor  # [T] int64 (or int32)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, total tokens per sequence including this step's rows
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_q_len: int
    backend: str = "triton"
    gemv: bool = False
    """A one-row step runs its projections as fused GEMV kernels (``ops.gemv``: the norm or activation before
    each folded into it) instead of norm kernels and cuBLAS (``ModelRunner`` picks the faster at start-up)."""
    pdl: bool = False
    """The Triton kernels are launched with programmatic dependent launch (kernels/pdl.py; CUDA graphs of a runner
    that found it faster)."""
    split_counters: torch.Tensor | None = None
    """The decode kernel's arrival counters (int32 zeros, one per sequence and kv head, shared by the layers, which
    run one after another). Given, a decode step of a few sequences runs fused: one kernel per layer norms, rotates
    and stores the new K/V and attends, its splits merging themselves (kernels/attention.py). The runner owns one
    per model and keeps it if start-up found the fused steps faster."""
    gemv_counters: torch.Tensor | None = None
    """The GEMV kernels' arrival counters (int32 zeros, at least as many as a projection's outputs, shared by the
    layers' projections, which run one after another). Given, a one-row projection may be served a tile that splits
    its K among several programs (kernels/gemv.py). The runner owns one per model."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"AttentionContext.backend must be one of {tuple(BACKENDS)}, got {self.backend!r}")
        if self.pdl and self.backend != "triton":
            raise ValueError(f"programmatic dependent launch needs the triton backend, not {self.backend!r}")

    @property
    def ops(self) -> Ops:
        return PDL_OPS if self.pdl else BACKENDS[self.backend]


class Attention(nn.Module):
    """Normalizes and rotates q and k, writes k and v to the layer's slice of the pool, and attends from q over it
    (``ops.rope_attention``: in one kernel at a decode step of a few sequences, with ``split_counters``).

    ``kv_cache`` is ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V), bound by the runner
    through the model's ``bind_kv_cache``; the layer owns no memory of its own.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self._kv_cache: torch.Tensor | None = None

    @property
    def kv_cache(self) -> torch.Tensor:
        if self._kv_cache is None:
            raise ValueError("Attention has no KV cache: call model.bind_kv_cache(pool) before forward")
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, cache: torch.Tensor) -> None:
        self._kv_cache = cache

    def forward(self, q: torch.Tensor, new_kv: NewKV, ctx: AttentionContext) -> torch.Tensor:
        """q ``[T, Hq, D]`` and this step's k and v (``new_kv``), before norm and RoPE → ``[T, Hq, D]``."""
        return ctx.ops.rope_attention(q, new_kv, self.kv_cache, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q,
                                      ctx.max_q_len, self.scale, ctx.split_counters)
