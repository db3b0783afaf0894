"""Paged decode attention: one query row per sequence, split-KV (flash-decoding) over the keys, a Triton kernel.

A decode step reads each sequence's whole K/V for one query: memory bound, and at a small batch the grid of
(sequence, kv head) programs is far too small to fill the GPU. The keys are split as finely as one key tile (a
batch-1 step at a long context is otherwise a chain of dependent tile loads); splits past a sequence's length return
at once and the merge reads only the splits that hold keys.

Given ``split_counters`` (zeros, one int32 per (sequence, kv head), left zero again), the splits merge themselves:
each program that wrote its partial output counts its arrival, and the last of a (sequence, kv head) to arrive
merges the group's rows (as split-K GEMMs and TensorRT-LLM's multi-block decode do). A batch-1 step then launches
one kernel per layer instead of two (on an H200 the merge kernels took 0.07 ms of a 1.7B step at 512 keys, the
attention 0.18 ms). A sequence whose keys fit in its first split writes its output directly.

Given the step's raw q, k and v (``new_kv``; kernels/attention.py does so at small batches), each program also does
what kernels/rope.py's kernel would have done before it: norms and rotates its q heads (at position seq_len - 1),
and the split holding that position writes the new token's k (normed, rotated) and v to the cache before it reads
them back with the rest: one launch fewer per layer again.

Reading ahead (launched with PDL, kernels/pdl.py), every split but the last reads its first key tile before it
waits for the kernel before (which writes q, and the new token's K/V that only the last split reads): at a short
context, that is all a split reads.

Index math and the shared pieces: kernels/attention_common.py; the reference: ``paged_attention_reference`` in
kernels/attention.py.
"""
import torch
import triton
import triton.language as tl

from relaykern.kernels.attention_common import (LOG2E, PER_STEP_ARGS, attend_tile, check_attention_inputs,
                                                choose_num_splits, decode_split_len, decode_splits_with_keys,
                                                dot_precision, key_tile, kv_strides, load_kv_tile, merge_row,
                                                merge_splits, partial_buffers, store_result)
from relaykern.kernels.pdl import launch_options, wait_for_earlier_kernels
from relaykern.kernels.rope import NewKV, norm_rope_rows, store_kv_rows

MAX_DECODE_SPLITS = 64
SMALL_DECODE_BATCH = 8
"""Decode steps of at most this many sequences are latency-bound (a launch or a round trip to memory saved shows):
given split counters, the model's call (kernels/attention.py) runs them fused (their splits merging themselves, the
norm, rotation and store inside, reading ahead with PDL). That costs the kernel registers, hence resident programs
per SM, which larger batches need. (The fused and the separate q/k norms sum in other orders: in bf16 a K/V may
differ in its last bit between them.)"""


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _decode_kernel(
    q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr, split_counters_ptr,
    k_ptr, v_ptr, slot_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
    qk_scale, num_splits, stride_q_seq, stride_q_head, stride_kv, stride_block, stride_offset, stride_head,
    stride_table, stride_k_seq, stride_k_head, stride_v_seq, stride_v_head, stride_cos_sin,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, TILE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SELF_MERGE: tl.constexpr, ROPE: tl.constexpr, HAS_NORM: tl.constexpr, READ_AHEAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (b, kv_head, split): the GROUP query heads of kv_head (rows of a BLOCK_H tile, so K/V is read once)
    over keys [split * split_len, (split + 1) * split_len) of sequence b, split_len = ceil(seq_len / num_splits)
    rounded up to TILE. One split writes the output; several write partial outputs and base-2 log-sum-exps, except
    splits after the first that start past seq_len (the merge skips them). SELF_MERGE: the last split to finish
    merges; ROPE: q, k, v are the raw projections; READ_AHEAD: the first key tile is read before the wait (see
    the module's docstring)."""
    # Launched with PDL, the kernel just before (the q/k/v projection, or the rope kernel) may still run: what it
    # does not write (sequence lengths, block tables, the keys of earlier steps) is read before the wait.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = decode_split_len(seq_len, num_splits, TILE)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    # Split 0 never returns here (nor before the wait): every launch waits for the kernel before it, which the
    # PDL chain needs (kernels/pdl.py), and a padding row's split 0 writes its zeros.
    if num_splits > 1 and split > 0 and start >= seq_len:
        return

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    table_row_ptr = block_tables_ptr + seq * stride_table
    if READ_AHEAD:  # every split but the last, whose keys end with the new token's, reads its first key tile now
        first = start + tl.arange(0, TILE)
        ahead = end < seq_len
        k_first, v_first = load_kv_tile(kv_ptr, table_row_ptr, first, (first < end) & ahead, kv_head, offs_d,
                                        d_mask, stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE)
    wait_for_earlier_kernels(PDL)
    if ROPE:
        dtype = kv_ptr.dtype.element_ty
        position = seq_len - 1  # (-1 for a padding row: norm_rope_rows reads no table row then)
        slot = tl.load(slot_ptr + seq)
        if end == seq_len and seq_len > 0 and slot >= 0:  # this split reads the new token's K/V: it writes them
            one_row = tl.full([1], True, tl.int1)
            k = norm_rope_rows(k_ptr, seq * stride_k_seq + kv_head * stride_k_head + tl.zeros([1], tl.int64), one_row,
                               position, cos_sin_ptr, stride_cos_sin, k_weight_ptr, eps, HEAD_DIM, BLOCK_D,
                               HAS_NORM, dtype)
            kv_heads = kv_head + tl.zeros([1], tl.int32)
            store_kv_rows(kv_ptr, slot, kv_heads, k, one_row, stride_kv, stride_offset, stride_head, 0, HEAD_DIM,
                          BLOCK_D)
            v = tl.load(v_ptr + seq * stride_v_seq + kv_head * stride_v_head + offs_d[None, :],
                        mask=d_mask[None, :])
            store_kv_rows(kv_ptr, slot, kv_heads, v, one_row, stride_kv, stride_offset, stride_head, 1, HEAD_DIM,
                          BLOCK_D)
            tl.debug_barrier()  # every thread's loads below see them
        q = norm_rope_rows(q_ptr, seq * stride_q_seq + heads * stride_q_head, h_mask, position, cos_sin_ptr,
                           stride_cos_sin, q_weight_ptr, eps, HEAD_DIM, BLOCK_D, HAS_NORM, dtype).to(dtype)
    else:
        q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
                    mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    loop_start = start
    if READ_AHEAD:  # (peeled off the loop only here: its tile, held through the wait, costs registers)
        if not ahead:
            k_first, v_first = load_kv_tile(kv_ptr, table_row_ptr, first, first < end, kv_head, offs_d, d_mask,
                                            stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE)
        m, l, acc = attend_tile(q, k_first, v_first, (first < end)[None, :], m, l, acc, qk_scale, DOT_PRECISION,
                                True)
        loop_start = start + TILE
    for tile_start in range(loop_start, end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        pos_mask = pos < end
        k, v = load_kv_tile(kv_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                             stride_kv, stride_block, stride_offset, stride_head, BLOCK_SIZE)
        m, l, acc = attend_tile(q, k, v, pos_mask[None, :], m, l, acc, qk_scale, DOT_PRECISION, True)

    rows = seq * (tl.num_programs(1) * GROUP) + heads
    if not SELF_MERGE:
        store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, num_splits, offs_d, h_mask, d_mask, m, l, acc,
                     HEAD_DIM)
    else:
        num_parts = decode_splits_with_keys(seq_len, num_splits, TILE)
        if num_parts <= 1:  # split 0 holds every key (or none: a padding row gets zeros)
            store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, 1, offs_d, h_mask, d_mask, m, l, acc,
                         HEAD_DIM)
        else:
            store_result(out_ptr, part_out_ptr, part_lse_ptr, rows, split, num_splits, offs_d, h_mask, d_mask, m, l,
                         acc, HEAD_DIM)
            # Every thread's partial stores come before the arrival, whose release makes them visible to the
            # program that sees the last arrival (its acquire).
            tl.debug_barrier()
            counter = split_counters_ptr + seq * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == num_parts - 1:
                tl.store(counter, 0)  # every split has arrived: ready for the next layer's launch
                for h in tl.static_range(GROUP):
                    merge_row(part_out_ptr, part_lse_ptr, out_ptr, seq * (tl.num_programs(1) * GROUP) + kv_head *
                              GROUP + h, num_splits, num_parts, HEAD_DIM, BLOCK_S, BLOCK_D)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                           split_counters: torch.Tensor | None = None, new_kv: NewKV | None = None,
                           read_ahead: bool = False, pdl: bool = False) -> torch.Tensor:
    """One query per sequence (q [B, Hq, D], at position seq_lens[b] - 1) -> [B, Hq, D]. num_splits None picks it
    from B x Hkv and the context bound block_tables.shape[1] * block_size. A sequence with seq_lens[b] == 0
    (batch padding) gets zeros. ``split_counters``: int32 zeros, at least B x Hkv of them, for the splits to merge
    themselves (module docstring), which must not be in use by another launch at the same time; None: a merge
    kernel. ``new_kv``: q is the step's raw q, normed, rotated and its k/v stored here (kernels/rope.py's
    ``qk_norm_rope_store``; row b at position seq_lens[b] - 1, as a decode row is: ``new_kv.positions`` go unread);
    None: q is ready and the cache holds the new K/V. ``read_ahead``: every split but the last reads its first key
    tile before it waits for the kernel before (worth it launched with ``pdl``: programmatic dependent launch,
    kernels/pdl.py)."""
    check_attention_inputs(q, kv_cache, block_tables, seq_lens, None)
    if new_kv is not None:
        new_kv.check(q, kv_cache)
    num_seqs, num_q_heads, head_dim = q.shape
    if num_seqs != seq_lens.shape[0]:
        raise ValueError(f"decode needs one query row per sequence: q has {num_seqs} rows, seq_lens "
                         f"{seq_lens.shape[0]}; use paged_extend_attention for other layouts")
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs * num_kv_heads, block_tables.shape[1] * block_size, q.device,
                                       min_split_keys=key_tile(q.dtype), max_splits=MAX_DECODE_SPLITS)
    check_split_counters(split_counters, num_seqs * num_kv_heads, q.device)
    out = torch.empty((num_seqs, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    part_out, part_lse = partial_buffers(out, num_splits, MAX_DECODE_SPLITS)
    if num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    self_merge = split_counters is not None
    rope = new_kv if new_kv is not None else NewKV(q, q, seq_lens, q, seq_lens)  # (unread stand-ins)
    has_norm = rope.q_weight is not None
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse, split_counters if self_merge else seq_lens,
        rope.k, rope.v, rope.slot_mapping, rope.cos_sin_cache, rope.q_weight if has_norm else q,
        rope.k_weight if has_norm else q, rope.eps, scale * LOG2E, num_splits, q.stride(0), q.stride(1),
        *kv_strides(kv_cache), block_tables.stride(0), rope.k.stride(0), rope.k.stride(1), rope.v.stride(0),
        rope.v.stride(1), rope.cos_sin_cache.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
        BLOCK_S=triton.next_power_of_2(MAX_DECODE_SPLITS), TILE=key_tile(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype), SELF_MERGE=self_merge, ROPE=new_kv is not None, HAS_NORM=has_norm,
        READ_AHEAD=read_ahead, PDL=pdl, **launch_options(pdl),
        num_warps=4, num_stages=2,  # two K/V buffers in shared memory leave room for more resident programs
    )
    if not self_merge:
        merge_splits(part_out, part_lse, out, num_splits, MAX_DECODE_SPLITS, seq_lens, pdl)
    return out


def check_split_counters(split_counters: torch.Tensor | None, needed: int, device: torch.device,
                         per: str = "sequences x kv heads") -> None:
    """Arrival counters (here and for kernels/gemv.py's split tiles): None, or int32 [>= needed], one ``per``."""
    if split_counters is None:
        return
    if (split_counters.dtype != torch.int32 or split_counters.dim() != 1 or split_counters.numel() < needed
            or split_counters.device != device or not split_counters.is_contiguous()):
        raise ValueError(f"split_counters must be a contiguous int32 [>= {needed}] ({per}) on "
                         f"{device}, got {split_counters.dtype} {tuple(split_counters.shape)} strides "
                         f"{split_counters.stride()} on {split_counters.device}")

