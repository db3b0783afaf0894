"""Rotary embedding of q and k, with Qwen3's per-head RMSNorm before it, and the K/V store of the paged cache: one
Triton kernel and its torch reference.

Neox-style RoPE (each head's two halves rotate together): ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]``, with
``cos_sin_cache[p] = [cos(p * inv_freq), sin(p * inv_freq)]`` (fp32, ``[max_position, head_dim]``). As in HF, cos
and sin are cast to the activations' dtype and every product and sum is rounded to it; the per-head norm (weights
given) is RMSNorm over head_dim. Unfused, norm and rotation of q and k take about thirty kernels per layer.

Rotated k and v go straight to their slots of the layer's paged cache (``relaykern.kernels.store_kv``'s layout and
slot convention, -1 = not stored): k is never written anywhere else, and the store costs no launch of its own.
q, k and v may be strided views of the fused qkv projection's output; the rotated q is a new contiguous tensor.
A decode step does all this inside the decode attention kernel instead (``NewKV``; the same ``norm_rope_rows``).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from relaykern.kernels.pdl import INTERPRETED, launch_options, wait_for_earlier_kernels
from relaykern.kernels.rms_norm import rms_norm_reference
from relaykern.kernels.store_kv import check_store_inputs, store_kv_reference


HEADS_PER_PROGRAM = None if INTERPRETED else 1
"""Heads of one token a program takes: one on a GPU (a program per token and head, of one warp); under the
interpreter, which runs programs one at a time, every head of a kind (None), a third as many programs for the tiny
test models (the op count per program is the same)."""


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x (fp32) rounded to dtype, back in fp32: one elementwise op of torch in that dtype."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def norm_rope_rows(src_ptr, row_offsets, row_mask, position, cos_sin_ptr, stride_cos_sin, weight_ptr, eps,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr, dtype: tl.constexpr):
    """Heads at ``src_ptr + row_offsets`` ([R, BLOCK_D], fp32 values in ``dtype``'s precision): RMSNorm per head
    (if HAS_NORM), then rotated to ``position``. Element d pairs with its partner in the other half:
    ``out[d] = x[d] cos - x[d + D/2] sin`` in the first half, ``x[d] cos + x[d - D/2] sin`` in the second."""
    half: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, BLOCK_D)
    first_half = offs < half
    partner = tl.where(first_half, offs + half, offs - half)
    mask = row_mask[:, None] & (offs < HEAD_DIM)[None, :]
    x = tl.load(src_ptr + row_offsets[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(src_ptr + row_offsets[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        d_mask = offs < HEAD_DIM
        weight = tl.load(weight_ptr + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        weight_partner = tl.load(weight_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        x = round_to(weight * round_to(x * inv_rms, dtype), dtype)
        x_partner = round_to(weight_partner * round_to(x_partner * inv_rms, dtype), dtype)
    frequency = tl.where(first_half, offs, offs - half)
    table = cos_sin_ptr + position.to(tl.int64) * stride_cos_sin + frequency
    in_table = (offs < HEAD_DIM) & (position >= 0)  # (-1: a padding row, whose rotation goes unused)
    cos = round_to(tl.load(table, mask=in_table, other=0.0), dtype)[None, :]
    sin = round_to(tl.load(table + half, mask=in_table, other=0.0), dtype)[None, :]
    return round_to(x * cos, dtype) + tl.where(first_half, -1.0, 1.0)[None, :] * round_to(x_partner * sin, dtype)


@triton.jit
def store_kv_rows(cache_ptr, slot, kv_heads, values, row_mask, stride_cache_kv, stride_cache_slot, stride_cache_head,
                  IS_VALUE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """values ([R, BLOCK_D]) into the K (or V) of ``kv_heads`` ([R], rows where ``row_mask``) at ``slot``
    (kernels/store_kv.py's layout)."""
    offs = tl.arange(0, BLOCK_D)[None, :]
    dst = cache_ptr + IS_VALUE * stride_cache_kv + slot.to(tl.int64) * stride_cache_slot + \
        kv_heads[:, None] * stride_cache_head
    tl.store(dst + offs, values.to(cache_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs < HEAD_DIM))


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, cache_ptr, slot_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_cos_sin,
    stride_cache_kv, stride_cache_slot, stride_cache_head,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, HAS_NORM: tl.constexpr, PDL: tl.constexpr,
):
    # Program (token, block of BLOCK_HEADS heads): the first blocks cover q's heads (rotated into q_out), the next
    # k's (rotated into the cache), the last v's (copied into the cache).
    Q_BLOCKS: tl.constexpr = (NUM_Q_HEADS + BLOCK_HEADS - 1) // BLOCK_HEADS
    KV_BLOCKS: tl.constexpr = (NUM_KV_HEADS + BLOCK_HEADS - 1) // BLOCK_HEADS
    wait_for_earlier_kernels(PDL)
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_HEADS)
    offs = tl.arange(0, BLOCK_D)[None, :]
    dtype = q_out_ptr.dtype.element_ty
    position = tl.load(positions_ptr + token)
    if block < Q_BLOCKS:
        heads = block * BLOCK_HEADS + offs_h
        in_q = heads < NUM_Q_HEADS
        q = norm_rope_rows(q_ptr, token * stride_q_token + heads * stride_q_head, in_q, position, cos_sin_ptr,
                           stride_cos_sin, q_weight_ptr, eps, HEAD_DIM, BLOCK_D, HAS_NORM, dtype)
        tl.store(q_out_ptr + (token * NUM_Q_HEADS + heads[:, None]) * HEAD_DIM + offs, q.to(dtype),
                 mask=in_q[:, None] & (offs < HEAD_DIM))
        return
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    kv_heads = (block - Q_BLOCKS) % KV_BLOCKS * BLOCK_HEADS + offs_h
    in_kv = kv_heads < NUM_KV_HEADS
    if block < Q_BLOCKS + KV_BLOCKS:
        k = norm_rope_rows(k_ptr, token * stride_k_token + kv_heads * stride_k_head, in_kv, position, cos_sin_ptr,
                           stride_cos_sin, k_weight_ptr, eps, HEAD_DIM, BLOCK_D, HAS_NORM, dtype)
        store_kv_rows(cache_ptr, slot, kv_heads, k, in_kv, stride_cache_kv, stride_cache_slot, stride_cache_head, 0,
                      HEAD_DIM, BLOCK_D)
    else:
        v = tl.load(v_ptr + token * stride_v_token + kv_heads[:, None] * stride_v_head + offs,
                    mask=in_kv[:, None] & (offs < HEAD_DIM))
        store_kv_rows(cache_ptr, slot, kv_heads, v, in_kv, stride_cache_kv, stride_cache_slot, stride_cache_head, 1,
                      HEAD_DIM, BLOCK_D)


@dataclass
class NewKV:
    """A step's raw k and v ([T, Hkv, D], views of the qkv projection) with what turns them and q into attention's
    inputs: the slots they go to (-1: stored nowhere), the positions and RoPE table, and the per-head norm weights
    (None: no norm, as in Qwen2 and Llama)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    eps: float = 1e-6

    def check(self, q: torch.Tensor, kv_cache: torch.Tensor) -> None:
        _check_inputs(q, self.k, self.positions, self.cos_sin_cache, self.q_weight, self.k_weight)
        check_store_inputs(self.k, self.v, kv_cache, self.slot_mapping)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                  q_weight: torch.Tensor | None, k_weight: torch.Tensor | None) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.dtype != k.dtype:
        raise ValueError(f"q [T, Hq, D] and k [T, Hkv, D] must agree in T, D and dtype; got {tuple(q.shape)} "
                         f"{q.dtype}, {tuple(k.shape)} {k.dtype}")
    head_dim = q.shape[2]
    if head_dim % 2 or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"head_dim must be even and contiguous; got {head_dim}, strides {q.stride()}, {k.stride()}")
    if positions.shape != (q.shape[0],) or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"positions must be [T={q.shape[0]}] and cos_sin_cache [max_position, {head_dim}]; got "
                         f"{tuple(positions.shape)}, {tuple(cos_sin_cache.shape)}")
    if (q_weight is None) != (k_weight is None) or (q_weight is not None and (
            q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,))):
        raise ValueError(f"q_weight and k_weight must both be None or both [{head_dim}]")


def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       pdl: bool = False, heads_per_program: int | None = None) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] at ``positions`` [T]: returns q rotated (normed first, if weights are
    given); k, rotated likewise, and v go to ``kv_cache`` [2, num_blocks, block_size, Hkv, D] at ``slot_mapping``.
    ``pdl``: launched with programmatic dependent launch (kernels/pdl.py). ``heads_per_program`` (a power of two;
    None: ``HEADS_PER_PROGRAM``) sets how many heads of one token a program takes."""
    _check_inputs(q, k, positions, cos_sin_cache, q_weight, k_weight)
    check_store_inputs(k, v, kv_cache, slot_mapping)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    block_heads = heads_per_program or HEADS_PER_PROGRAM or triton.next_power_of_2(max(num_q_heads, num_kv_heads))
    if block_heads & (block_heads - 1):
        raise ValueError(f"heads_per_program must be a power of two, got {block_heads}")
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens:
        has_norm = q_weight is not None
        blocks = triton.cdiv(num_q_heads, block_heads) + 2 * triton.cdiv(num_kv_heads, block_heads)
        _qk_norm_rope_store_kernel[(num_tokens, blocks)](
            q, k, v, q_out, kv_cache, slot_mapping, positions, cos_sin_cache, q_weight if has_norm else q,
            k_weight if has_norm else k, eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), cos_sin_cache.stride(0), kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
            NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_HEADS=block_heads, HAS_NORM=has_norm, PDL=pdl,
            num_warps=1, **launch_options(pdl),
        )
    return q_out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x[T, H, D]``: ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` (HF's ``rotate_half`` form)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def qk_norm_rope_store_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                 cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                 q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                                 eps: float = 1e-6) -> torch.Tensor:
    """HF's order: ``q_norm``/``k_norm`` (RMSNorm per head), then ``apply_rotary_pos_emb`` in the model dtype; then
    ``store_kv_reference`` of the rotated k and v."""
    _check_inputs(q, k, positions, cos_sin_cache, q_weight, k_weight)
    if q_weight is not None:
        q, k = rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps)
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    store_kv_reference(apply_rotary(k, cos, sin), v, kv_cache, slot_mapping)
    return apply_rotary(q, cos, sin)
