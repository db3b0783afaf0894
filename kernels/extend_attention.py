"""Paged extend attention: ragged prefill, prefix-cache hits and catch-ups over a paged cache, a Triton kernel.

Query rows of several sequences are packed one after another (``cu_seqlens_q``); each program takes a tile of one
sequence's rows times the query heads of one kv head, so every K/V tile is read once for all of them, and a tile
is sized to the longest q_len (a 4-row catch-up pads to 16 rows, not 128). When the query tiles are too few to fill
the GPU (a short catch-up over a long context at a small batch) the keys are split as in decode. Index math and the
shared pieces: kernels/attention_common.py; the reference: ``paged_attention_reference`` in kernels/attention.py.
"""
import torch
import triton
import triton.language as tl

from relaykern.kernels.attention_common import (LOG2E, PER_STEP_ARGS, attend_tile, check_attention_inputs,
                                                choose_num_splits, dot_precision, key_tile, kv_strides,
                                                load_kv_tile, merge_splits, partial_buffers, store_result)
from relaykern.kernels.pdl import launch_options, wait_for_earlier_kernels

MIN_SPLIT_KEYS = 256  # fewer keys per split than this costs more in the merge than it gains
MAX_SPLITS = 16
FP32_MAX_EXTEND_ROWS = 16  # exact fp32 dots hold their operands in registers: smaller tiles


@triton.jit
def _find_seq(cu_seqlens_q_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence b owns grid tiles [cu[b] // BLOCK_Q + b, cu[b+1] // BLOCK_Q + b + 1), at least ceil(q_len_b / BLOCK_Q)
    of them, so a grid of T // BLOCK_Q + B tiles covers all sequences without reading q lengths on the host.
    Binary search for the last b whose first tile is <= q_tile."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _extend_kernel(
    q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, num_seqs, num_splits,
    stride_q_tok, stride_q_head, stride_kv, stride_block, stride_offset, stride_head, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Program (q_tile, kv_head, split): BLOCK_Q query rows of one sequence x the GROUP query heads of kv_head.
    Tile row r is query row first_row + r // GROUP of head kv_head * GROUP + r % GROUP, so one K/V tile feeds all
    heads. The tile's keys, 0 up to the last position any of its rows sees, are split as in the decode kernel."""
    wait_for_earlier_kernels(PDL)
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(cu_seqlens_q_ptr, q_tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first_row = (q_tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_row >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = first_row + offs_r // GROUP
    heads = kv_head * GROUP + offs_r % GROUP
    r_mask = (offs_r // GROUP < BLOCK_Q) & (q_rows < q_len)
    d_mask = offs_d < HEAD_DIM
    tokens = q_start + q_rows
    q = tl.load(q_ptr + tokens[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = context_len + q_rows

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row_ptr = block_tables_ptr + seq * stride_table
    kv_end = tl.minimum(context_len + first_row + BLOCK_Q, seq_len)
    split_len = tl.cdiv(tl.cdiv(kv_end, num_splits), TILE) * TILE
    start = split * split_len
    end = tl.minimum(start + split_len, kv_end)
    # Whole tiles of keys that every row sees (up to the first row's position): no causal mask. Then the tiles
    # across the diagonal (of a long prefill, one or two of a tile's many), masked.
    seen_by_all = tl.minimum(end, context_len + first_row + 1)
    unmasked_end = start + tl.maximum(seen_by_all - start, 0) // TILE * TILE
    for tile_start in range(start, unmasked_end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        k, v = load_kv_tile(kv_ptr, table_row_ptr, pos, pos < unmasked_end, kv_head, offs_d, d_mask,
                             stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE)
        m, l, acc = attend_tile(q, k, v, None, m, l, acc, qk_scale, DOT_PRECISION, False)
    for tile_start in range(unmasked_end, end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        pos_mask = pos < end
        k, v = load_kv_tile(kv_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                             stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE)
        visible = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        m, l, acc = attend_tile(q, k, v, visible, m, l, acc, qk_scale, DOT_PRECISION, True)

    rows = tokens * (tl.num_programs(1) * GROUP) + heads
    store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, num_splits, offs_d, r_mask, d_mask, m, l, acc,
                  HEAD_DIM)


def choose_extend_tile(max_q_len: int, group: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): a tile is BLOCK_Q query rows x group heads = BLOCK_M rows, sized to the longest q_len
    so a 4-row catch-up uses the smallest tile tl.dot allows (16 rows) and long prefills 128 rows (16 in fp32)."""
    max_rows = FP32_MAX_EXTEND_ROWS if dtype == torch.float32 else 128
    block_m = min(max(triton.next_power_of_2(max_q_len * group), 16), max_rows)
    block_m = max(block_m, triton.next_power_of_2(group))
    return block_m, block_m // group


def paged_extend_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_q_len: int,
                           scale: float, num_splits: int | None = None, pdl: bool = False) -> torch.Tensor:
    """Ragged prefill / prefix-cache hit / catch-up: q [T, Hq, D] packed by cu_seqlens_q -> [T, Hq, D].
    max_q_len must bound every q_len (it sizes the tile, not the grid). num_splits None splits the keys only when
    there are too few query tiles to fill the GPU (a short catch-up over a long context at a small batch).
    ``pdl`` as in ``paged_decode_attention``."""
    check_attention_inputs(q, kv_cache, block_tables, seq_lens, cu_seqlens_q)
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    block_m, block_q = choose_extend_tile(max_q_len, group, q.dtype)
    num_q_tiles = num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = choose_num_splits(num_q_tiles * num_kv_heads, block_tables.shape[1] * block_size, q.device,
                                       MIN_SPLIT_KEYS, MAX_SPLITS)
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    part_out, part_lse = partial_buffers(out, num_splits, MAX_SPLITS)
    if num_tokens == 0 or num_seqs == 0:
        return out
    _extend_kernel[(num_q_tiles, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, cu_seqlens_q, out, part_out, part_lse, scale * LOG2E, num_seqs,
        num_splits, q.stride(0), q.stride(1), *kv_strides(kv_cache), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(max(head_dim, 16)), TILE=key_tile(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype), PDL=pdl, num_warps=8 if block_m >= 128 else 4, **launch_options(pdl),
    )
    merge_splits(part_out, part_lse, out, num_splits, MAX_SPLITS, None, pdl)
    return out

