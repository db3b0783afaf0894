"""Paged attention: Triton decode (split-KV) and extend (ragged prefill / catch-up) kernels, and the torch reference.

Index math shared by every function here:
  kv_cache[2, num_blocks, block_size, Hkv, D]; key position p of sequence b lives in physical block
  ``block_tables[b, p // block_size]`` at offset ``p % block_size`` (index 0 of dim 0 = K, 1 = V).
  Query rows are packed ragged: sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (q_len_b of them) and
  its K/V for all ``seq_lens[b]`` positions are already in the cache. Row i of b sits at position
  ``context_len_b + i`` with ``context_len_b = seq_lens[b] - q_len_b`` and sees keys at positions <= that
  (bottom-right causal). Query head h reads kv head ``h // (Hq // Hkv)`` (GQA).
Both kernels split the keys of a program over a third grid axis when the grid would not fill the GPU
(flash-decoding); a second kernel merges the splits by their log-sum-exps. Decode splits as finely as one key tile
(a batch-1 step at a long context is otherwise a chain of dependent tile loads): its splits past a sequence's
length return at once and the merge reads only the splits that hold keys.
Kernels keep softmax statistics and accumulators in fp32 (base-2 exponent); tl.dot takes the cache dtype with fp32
accumulation (probabilities are rounded to that dtype for P @ V, as flash-attention does); output is q's dtype.
"""
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from relaykern.kernels.pdl import launch_options, wait_for_earlier_kernels
from relaykern.kernels.store_kv import check_kv_cache

LOG2E = 1.4426950408889634
TILE_N = 64  # keys per inner-loop step; a tile may span several cache blocks (each key looks its block up)
FP32_TILE_N, FP32_MAX_EXTEND_ROWS = 16, 16  # exact fp32 dots hold their operands in registers: smaller tiles
MIN_SPLIT_KEYS = 256  # extend split-KV: fewer keys per split than this costs more in the merge than it gains
MAX_SPLITS = 16
MAX_DECODE_SPLITS = 64
PROGRAMS_PER_SM = 4  # decode is memory bound: several resident programs per SM hide load latency
PER_STEP_ARGS = ["num_seqs", "num_splits", "stride_table"]
"""Integers that change from step to step (batch, split count, block-table width): Triton would otherwise compile a
variant for each value class it specializes on (== 1, divisible by 16), each a stall of a second or more on first
use in the middle of serving."""


@triton.jit
def _load_kv_tile(kv_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                  stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE: tl.constexpr):
    """K and V ([len(pos), BLOCK_D] each) of key positions pos for one kv head, through the block table row."""
    block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
    rows = block * stride_block + (pos % BLOCK_SIZE) * stride_offset + kv_head * stride_head
    ptrs = kv_ptr + rows[:, None] + offs_d[None, :]
    mask = pos_mask[:, None] & d_mask[None, :]
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + stride_kv, mask=mask, other=0.0)


@triton.jit
def _attend_tile(q, k, v, visible, m, l, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step: fold keys k/v into running max m, sum l and acc of rows q; visible[row, key] masks
    keys a row may not see. A row that has seen no key yet keeps m = -inf and l = 0."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoids -inf - -inf = nan for such rows
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m - m_shift)
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def _store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, num_splits, offs_d, row_mask, d_mask, m, l, acc,
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
        k, v = _load_kv_tile(kv_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                             stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE)
        m, l, acc = _attend_tile(q, k, v, pos_mask[None, :], m, l, acc, qk_scale, DOT_PRECISION)

    rows = seq * (tl.num_programs(1) * GROUP) + heads
    _store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, num_splits, offs_d, h_mask, d_mask, m, l, acc,
                  HEAD_DIM)


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, seq_lens_ptr, num_splits, rows_per_seq,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                         DECODE: tl.constexpr, PDL: tl.constexpr):
    """Program row = (token, query head): out = sum_s 2^(lse_s - max) * part_s / sum_s 2^(lse_s - max). DECODE:
    over the splits that hold keys of the row's sequence (as _decode_kernel splits seq_len), else over all."""
    wait_for_earlier_kernels(PDL)
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    if DECODE:
        seq_len = tl.load(seq_lens_ptr + row // rows_per_seq)
        split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), TILE) * TILE, 1)
        s_mask = offs_s < tl.cdiv(seq_len, split_len)
    else:
        s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))  # all -inf: seq_len 0, out = 0
    parts = tl.load(part_out_ptr + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


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
    for tile_start in range(start, end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        pos_mask = pos < end
        k, v = _load_kv_tile(kv_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                             stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE)
        visible = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        m, l, acc = _attend_tile(q, k, v, visible, m, l, acc, qk_scale, DOT_PRECISION)

    rows = tokens * (tl.num_programs(1) * GROUP) + heads
    _store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, num_splits, offs_d, r_mask, d_mask, m, l, acc,
                  HEAD_DIM)


def _check_attention_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
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


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 caches (tests, debugging) get exact fp32 products; "tf32" is ignored by 16-bit dots.
    return "ieee" if dtype == torch.float32 else "tf32"


def _key_tile(dtype: torch.dtype) -> int:
    return FP32_TILE_N if dtype == torch.float32 else TILE_N


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def choose_num_splits(num_programs: int, max_context: int, device: torch.device, min_split_keys: int = MIN_SPLIT_KEYS,
                      max_splits: int = MAX_SPLITS) -> int:
    """Split the keys only when the grid without splits (num_programs) cannot fill the GPU (PROGRAMS_PER_SM per
    SM), keeping >= min_split_keys keys per split and at most max_splits splits. Uses host shapes only (no sync)."""
    wanted = math.ceil(PROGRAMS_PER_SM * _num_sms(device) / max(1, num_programs))
    return max(1, min(wanted, max_context // min_split_keys, max_splits))


def _partial_buffers(out: torch.Tensor, num_splits: int, max_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (part_out [rows, Hq, splits, D], part_lse [rows, Hq, splits]); with one split the kernel writes out
    directly and the buffers are unused."""
    if not 1 <= num_splits <= max_splits:
        raise ValueError(f"num_splits must be in [1, {max_splits}], got {num_splits}")
    if num_splits == 1:
        return out, out
    rows, heads, head_dim = out.shape
    return (torch.empty((rows, heads, num_splits, head_dim), dtype=torch.float32, device=out.device),
            torch.empty((rows, heads, num_splits), dtype=torch.float32, device=out.device))


def _merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, num_splits: int,
                  seq_lens: torch.Tensor | None, pdl: bool) -> None:
    """``seq_lens``: decode's (one row per sequence), whose splits past a sequence's length wrote nothing."""
    if num_splits > 1:
        rows, heads, head_dim = out.shape
        decode = seq_lens is not None
        _merge_splits_kernel[(rows * heads,)](
            part_out, part_lse, out, seq_lens if decode else part_lse, num_splits, heads, HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(MAX_DECODE_SPLITS if decode else MAX_SPLITS),
            BLOCK_D=triton.next_power_of_2(max(head_dim, 16)), TILE=_key_tile(out.dtype), DECODE=decode, PDL=pdl,
            **launch_options(pdl),
        )


def _kv_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    # (K -> V, block, offset in block, kv head); head_dim is contiguous.
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int | None = None, pdl: bool = False
                           ) -> torch.Tensor:
    """One query per sequence (q [B, Hq, D], at position seq_lens[b] - 1) -> [B, Hq, D]. num_splits None picks it
    from B x Hkv and the context bound block_tables.shape[1] * block_size. A sequence with seq_lens[b] == 0
    (batch padding) gets zeros. ``pdl``: launched with programmatic dependent launch (kernels/pdl.py)."""
    _check_attention_inputs(q, kv_cache, block_tables, seq_lens, None)
    num_seqs, num_q_heads, head_dim = q.shape
    if num_seqs != seq_lens.shape[0]:
        raise ValueError(f"decode needs one query row per sequence: q has {num_seqs} rows, seq_lens "
                         f"{seq_lens.shape[0]}; use paged_extend_attention for other layouts")
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs * num_kv_heads, block_tables.shape[1] * block_size, q.device,
                                       min_split_keys=_key_tile(q.dtype), max_splits=MAX_DECODE_SPLITS)
    out = torch.empty((num_seqs, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    part_out, part_lse = _partial_buffers(out, num_splits, MAX_DECODE_SPLITS)
    if num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse, scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), *_kv_strides(kv_cache), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
        TILE=_key_tile(q.dtype), DOT_PRECISION=_dot_precision(q.dtype), PDL=pdl, **launch_options(pdl),
        num_warps=4, num_stages=2,  # two K/V buffers in shared memory leave room for more resident programs
    )
    _merge_splits(part_out, part_lse, out, num_splits, seq_lens, pdl)
    return out


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
    _check_attention_inputs(q, kv_cache, block_tables, seq_lens, cu_seqlens_q)
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    block_m, block_q = choose_extend_tile(max_q_len, group, q.dtype)
    num_q_tiles = num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = choose_num_splits(num_q_tiles * num_kv_heads, block_tables.shape[1] * block_size, q.device)
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    part_out, part_lse = _partial_buffers(out, num_splits, MAX_SPLITS)
    if num_tokens == 0 or num_seqs == 0:
        return out
    _extend_kernel[(num_q_tiles, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, cu_seqlens_q, out, part_out, part_lse, scale * LOG2E, num_seqs,
        num_splits, q.stride(0), q.stride(1), *_kv_strides(kv_cache), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(max(head_dim, 16)), TILE=_key_tile(q.dtype),
        DOT_PRECISION=_dot_precision(q.dtype), PDL=pdl, num_warps=8 if block_m >= 128 else 4, **launch_options(pdl),
    )
    _merge_splits(part_out, part_lse, out, num_splits, None, pdl)
    return out


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, max_q_len: int, scale: float, pdl: bool = False) -> torch.Tensor:
    """The model's attention call: decode kernel when every sequence has one query row (max_q_len == 1, then
    T must equal B), extend kernel otherwise."""
    if max_q_len == 1:
        return paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, pdl=pdl)
    return paged_extend_attention(q, kv_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale, pdl=pdl)


def paged_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                              seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_q_len: int,
                              scale: float) -> torch.Tensor:
    """The spec (and CPU backend): per sequence, gather K/V from its blocks and run SDPA in fp32 with an explicit
    bottom-right causal mask. max_q_len is unused (kept for the common signature)."""
    _check_attention_inputs(q, kv_cache, block_tables, seq_lens, cu_seqlens_q)
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = bounds[seq], bounds[seq + 1]
        q_len = q_end - q_start
        if seq_len == 0:  # batch padding, as in the kernels
            out[q_start:q_end] = 0
        if q_len == 0 or seq_len == 0:
            continue
        blocks = block_tables[seq, : -(-seq_len // block_size)].long()
        key, value = kv_cache[:, blocks].flatten(1, 2)[:, :seq_len].float().unbind(0)  # [seq_len, Hkv, D] each
        key, value = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (key, value))  # [Hq, seq_len, D]
        # Row i sits at position seq_len - q_len + i: bottom-right aligned causal mask.
        mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(diagonal=seq_len - q_len)
        query = q[q_start:q_end].float().transpose(0, 1)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        out[q_start:q_end] = attended.transpose(0, 1).to(q.dtype)
    return out
