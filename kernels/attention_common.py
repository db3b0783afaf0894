"""What the paged attention kernels share: K/V tile loads through the block table, the online-softmax step,
split-KV (flash-decoding) partial outputs and the kernel that merges them, and the launchers' input checks.

Index math of every attention kernel (kernels/decode_attention.py, kernels/extend_attention.py, and the reference in
kernels/attention.py):
  kv_cache[2, num_blocks, block_size, Hkv, D]; key position p of sequence b lives in physical block
  ``block_tables[b, p // block_size]`` at offset ``p % block_size`` (index 0 of dim 0 = K, 1 = V).
  Query rows are packed ragged: sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (q_len_b of them) and
  its K/V for all ``seq_lens[b]`` positions are already in the cache. Row i of b sits at position
  ``context_len_b + i`` with ``context_len_b = seq_lens[b] - q_len_b`` and sees keys at positions <= that
  (bottom-right causal). Query head h reads kv head ``h // (Hq // Hkv)`` (GQA).
Both kernels split the keys of a program over a third grid axis when the grid would not fill the GPU; the splits
are merged by their log-sum-exps, by a second kernel or (decode, given arrival counters) by the last split to finish.
Kernels keep softmax statistics and accumulators in fp32 (base-2 exponent); tl.dot takes the cache dtype with fp32
accumulation (probabilities are rounded to that dtype for P @ V, as flash-attention does); output is q's dtype.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from relaykern.kernels.pdl import launch_options, wait_for_earlier_kernels
from relaykern.kernels.store_kv import check_kv_cache

LOG2E = 1.4426950408889634
TILE_N = 64  # keys per inner-loop step; a tile may span several cache blocks (each key looks its block up)
FP32_TILE_N = 16  # exact fp32 dots hold their operands in registers: smaller tiles
PROGRAMS_PER_SM = 4  # decode is memory bound: several resident programs per SM hide load latency
PER_STEP_ARGS = ["num_seqs", "num_splits", "stride_table"]
"""Integers that change from step to step (batch, split count, block-table width): Triton would otherwise compile a
variant for each value class it specializes on (== 1, divisible by 16), each a stall of a second or more on first
use in the middle of serving."""


@triton.jit
def load_kv_tile(kv_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                 stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE: tl.constexpr):
    """K and V ([len(pos), BLOCK_D] each) of key positions pos for one kv head, through the block table row."""
    block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
    rows = block * stride_block + (pos % BLOCK_SIZE) * stride_offset + kv_head * stride_head
    ptrs = kv_ptr + rows[:, None] + offs_d[None, :]
    mask = pos_mask[:, None] & d_mask[None, :]
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + stride_kv, mask=mask, other=0.0)


@triton.jit
def attend_tile(q, k, v, visible, m, l, acc, qk_scale, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step: fold keys k/v into running max m, sum l and acc of rows q; if MASKED,
    visible[row, key] masks keys a row may not see (else every row sees every key: a tile below the causal
    diagonal, where the select per score is work saved). A row that has seen no key yet keeps m = -inf and l = 0."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoids -inf - -inf = nan for such rows
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m - m_shift)
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, num_splits, offs_d, row_mask, d_mask, m, l, acc,
                 HEAD_DIM: tl.constexpr):
    """rows: flat (token, query head) indices. One split writes out[rows]; several write the split's normalized
    output to part_out[rows, split] and its base-2 log-sum-exp to part_lse[rows, split]. A row that saw no key
    (an empty split, a seq_len 0 padding row) has l == 0: it writes zeros and lse -inf, which the merge ignores."""
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe[:, None]
    mask = row_mask[:, None] & d_mask[None, :]
    if num_splits == 1:
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_out_ptr + (rows[:, None] * num_splits + split) * HEAD_DIM + offs_d[None, :], out, mask=mask)
        tl.store(part_lse_ptr + rows * num_splits + split, m + tl.log2(l_safe), mask=row_mask)


@triton.jit
def merge_row(part_out_ptr, part_lse_ptr, out_ptr, row, num_splits, num_parts, HEAD_DIM: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[row] = sum_s 2^(lse_s - max) * part_s / sum_s 2^(lse_s - max) over splits s < num_parts (zeros if none
    holds a key). The loads skip L1: the decode kernel's merging program reads what other programs just wrote."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_parts
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    lse_max = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))  # all -inf: seq_len 0, out = 0
    parts = tl.load(part_out_ptr + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0, cache_modifier=".cg")
    total = tl.sum(weights, axis=0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, seq_lens_ptr, num_splits, rows_per_seq,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                         DECODE: tl.constexpr, PDL: tl.constexpr):
    """Program row = (token, query head). DECODE: over the splits that hold keys of the row's sequence (as the
    decode kernel splits seq_len), else over all."""
    wait_for_earlier_kernels(PDL)
    row = tl.program_id(0)
    num_parts = num_splits
    if DECODE:
        num_parts = decode_splits_with_keys(tl.load(seq_lens_ptr + row // rows_per_seq), num_splits, TILE)
    merge_row(part_out_ptr, part_lse_ptr, out_ptr, row, num_splits, num_parts, HEAD_DIM, BLOCK_S, BLOCK_D)


@triton.jit
def decode_split_len(seq_len, num_splits, TILE: tl.constexpr):
    """Keys per split of a decode row: seq_len / num_splits rounded up to whole key tiles (0 if seq_len is 0)."""
    return tl.cdiv(tl.cdiv(seq_len, num_splits), TILE) * TILE


@triton.jit
def decode_splits_with_keys(seq_len, num_splits, TILE: tl.constexpr):
    return tl.cdiv(seq_len, tl.maximum(decode_split_len(seq_len, num_splits, TILE), 1))


def check_attention_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None) -> None:
    check_kv_cache(kv_cache)
    num_kv_heads, head_dim = kv_cache.shape[3:]
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads != 0 or q.stride(2) != 1:
        raise ValueError(f"q must be [T, Hq, {head_dim}] with Hq a multiple of {num_kv_heads} kv heads and a "
                         f"contiguous last dimension; got {tuple(q.shape)} strides {q.stride()}")
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must equal kv_cache dtype {kv_cache.dtype}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks] with contiguous rows, got "
                         f"{tuple(block_tables.shape)}")
    tensors = {"block_tables": block_tables, "seq_lens": seq_lens, "cu_seqlens_q": cu_seqlens_q}
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {tensor.dtype}")
    if cu_seqlens_q is not None and cu_seqlens_q.shape != (num_seqs + 1,):
        raise ValueError(f"cu_seqlens_q must have {num_seqs + 1} entries (B + 1), got {tuple(cu_seqlens_q.shape)}")


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 caches (tests, debugging) get exact fp32 products; "tf32" is ignored by 16-bit dots.
    return "ieee" if dtype == torch.float32 else "tf32"


def key_tile(dtype: torch.dtype) -> int:
    return FP32_TILE_N if dtype == torch.float32 else TILE_N


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def choose_num_splits(num_programs: int, max_context: int, device: torch.device, min_split_keys: int, max_splits: int
                      ) -> int:
    """Split the keys only when the grid without splits (num_programs) cannot fill the GPU (PROGRAMS_PER_SM per
    SM), keeping >= min_split_keys keys per split and at most max_splits splits. Uses host shapes only (no sync)."""
    wanted = math.ceil(PROGRAMS_PER_SM * _num_sms(device) / max(1, num_programs))
    return max(1, min(wanted, max_context // min_split_keys, max_splits))


def partial_buffers(out: torch.Tensor, num_splits: int, max_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (part_out [rows, Hq, splits, D], part_lse [rows, Hq, splits]); with one split the kernel writes out
    directly and the buffers are unused."""
    if not 1 <= num_splits <= max_splits:
        raise ValueError(f"num_splits must be in [1, {max_splits}], got {num_splits}")
    if num_splits == 1:
        return out, out
    rows, heads, head_dim = out.shape
    return (torch.empty((rows, heads, num_splits, head_dim), dtype=torch.float32, device=out.device),
            torch.empty((rows, heads, num_splits), dtype=torch.float32, device=out.device))


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, num_splits: int, max_splits: int,
                 seq_lens: torch.Tensor | None, pdl: bool) -> None:
    """``seq_lens``: decode's (one row per sequence), whose splits past a sequence's length wrote nothing.
    ``max_splits``: the launcher's bound, which sizes the merge's tile (one compiled variant, whatever the step)."""
    if num_splits > 1:
        rows, heads, head_dim = out.shape
        decode = seq_lens is not None
        _merge_splits_kernel[(rows * heads,)](
            part_out, part_lse, out, seq_lens if decode else part_lse, num_splits, heads, HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(max_splits),
            BLOCK_D=triton.next_power_of_2(max(head_dim, 16)), TILE=key_tile(out.dtype), DECODE=decode, PDL=pdl,
            **launch_options(pdl),
        )


def kv_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    # (K -> V, block, offset in block, kv head); head_dim is contiguous.
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)

