"""Paged decode attention: one query row per sequence, split-KV (flash-decoding) over the keys, a Triton kernel.

A decode step reads each sequence's whole K/V for one query: memory bound, and at a small batch the grid of
(sequence, kv head) programs is far too small to fill the GPU. The keys are split as finely as one key tile (a
batch-1 step at a long context is otherwise a chain of dependent tile loads); splits past a sequence's length return
at once and the merge reads only the splits that hold keys. Index math and the shared pieces:
kernels/attention_common.py; the reference: ``paged_attention_reference`` in kernels/attention.py.
"""
import torch
import triton
import triton.language as tl

from relaykern.kernels.attention_common import (LOG2E, PER_STEP_ARGS, attend_tile, check_attention_inputs,
                                                choose_num_splits, dot_precision, key_tile, kv_strides,
                                                load_kv_tile, merge_splits, partial_buffers, store_result)
from relaykern.kernels.pdl import launch_options, wait_for_earlier_kernels

MAX_DECODE_SPLITS = 64


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _decode_kernel(
    q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr, qk_scale, num_splits,
    stride_q_seq, stride_q_head, stride_kv, stride_block, stride_offset, stride_head, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b, kv_head, split): the GROUP query heads of kv_head (rows of a BLOCK_H tile, so K/V is read once)
    over keys [split * split_len, (split + 1) * split_len) of sequence b, split_len = ceil(seq_len / num_splits)
    rounded up to TILE. One split writes the output; several write partial outputs and base-2 log-sum-exps, except
    splits that start past seq_len (the merge skips them)."""
    wait_for_earlier_kernels(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), TILE) * TILE
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if num_splits > 1 and start >= seq_len:
        return

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table_row_ptr = block_tables_ptr + seq * stride_table
    for tile_start in range(start, end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        pos_mask = pos < end
        k, v = load_kv_tile(kv_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                             stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE)
        m, l, acc = attend_tile(q, k, v, pos_mask[None, :], m, l, acc, qk_scale, DOT_PRECISION, True)

    rows = seq * (tl.num_programs(1) * GROUP) + heads
    store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, num_splits, offs_d, h_mask, d_mask, m, l, acc,
                  HEAD_DIM)



def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int | None = None, pdl: bool = False
                           ) -> torch.Tensor:
    """One query per sequence (q [B, Hq, D], at position seq_lens[b] - 1) -> [B, Hq, D]. num_splits None picks it
    from B x Hkv and the context bound block_tables.shape[1] * block_size. A sequence with seq_lens[b] == 0
    (batch padding) gets zeros. ``pdl``: launched with programmatic dependent launch (kernels/pdl.py)."""
    check_attention_inputs(q, kv_cache, block_tables, seq_lens, None)
    num_seqs, num_q_heads, head_dim = q.shape
    if num_seqs != seq_lens.shape[0]:
        raise ValueError(f"decode needs one query row per sequence: q has {num_seqs} rows, seq_lens "
                         f"{seq_lens.shape[0]}; use paged_extend_attention for other layouts")
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs * num_kv_heads, block_tables.shape[1] * block_size, q.device,
                                       min_split_keys=key_tile(q.dtype), max_splits=MAX_DECODE_SPLITS)
    out = torch.empty((num_seqs, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    part_out, part_lse = partial_buffers(out, num_splits, MAX_DECODE_SPLITS)
    if num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse, scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), *kv_strides(kv_cache), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
        TILE=key_tile(q.dtype), DOT_PRECISION=dot_precision(q.dtype), PDL=pdl, **launch_options(pdl),
        num_warps=4, num_stages=2,  # two K/V buffers in shared memory leave room for more resident programs
    )
    merge_splits(part_out, part_lse, out, num_splits, MAX_DECODE_SPLITS, seq_lens, pdl)
    return out

