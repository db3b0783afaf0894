"""Row preparation for a forward over packed ragged rows: token ids, positions and KV slots, one launch per batch.

Row b owns the packed tokens ``cu_rows[b] <= i < cu_rows[b + 1]``; token i of row b sits at position
``pos = start_pos[b] + (i - cu_rows[b])`` and its K/V go to slot
``block_tables[b, pos // block_size] * block_size + pos % block_size``. This serves every forward: decode rows
(one token), prefill and catch-up rows (the LLM's tokens injected into the SLM's sequence, the SLM's tag-free
tokens into the LLM's), all in one batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 1 << 16
"""The binary search over the rows always takes log2(MAX_ROWS) steps: one compiled variant for every batch (a few
extra loads of a tiny vector per token)."""


@dataclass
class InjectedRows:
    """The forward's inputs over the packed tokens, all int64[total]."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor


@triton.jit(do_not_specialize=["stride_table_row", "total", "num_rows"])  # they change every step
def _inject_kernel(
    new_tokens_ptr, cu_rows_ptr, start_pos_ptr, block_tables_ptr, stride_table_row,
    input_ids_ptr, positions_ptr, slot_mapping_ptr,
    total, num_rows, block_size, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per BLOCK packed tokens. Each token finds its row by binary search over cu_rows: the last row b
    # with cu_rows[b] <= i (so empty rows, whose cu_rows repeat, are skipped). No host sync for the row lengths.
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = tokens < total
    low = tl.zeros([BLOCK], dtype=tl.int32)
    high = tl.zeros([BLOCK], dtype=tl.int32) + (num_rows - 1)
    for _ in range(SEARCH_STEPS):  # invariant: cu_rows[low] <= i and the answer is in [low, high]
        middle = (low + high + 1) // 2
        go_up = tl.load(cu_rows_ptr + middle, mask=mask, other=0) <= tokens
        low = tl.where(go_up, middle, low)
        high = tl.where(go_up, high, middle - 1)
    row = low
    row_start = tl.load(cu_rows_ptr + row, mask=mask, other=0)
    position = tl.load(start_pos_ptr + row, mask=mask, other=0).to(tl.int64) + (tokens - row_start)
    block = tl.load(block_tables_ptr + row.to(tl.int64) * stride_table_row + position // block_size, mask=mask,
                    other=0).to(tl.int64)
    tl.store(input_ids_ptr + tokens, tl.load(new_tokens_ptr + tokens, mask=mask), mask=mask)
    tl.store(positions_ptr + tokens, position, mask=mask)
    tl.store(slot_mapping_ptr + tokens, block * block_size + position % block_size, mask=mask)


def _check_inputs(new_tokens: torch.Tensor, cu_rows: torch.Tensor, start_pos: torch.Tensor,
                  block_tables: torch.Tensor, block_size: int, out_input_ids: torch.Tensor | None) -> None:
    if new_tokens.dim() != 1 or new_tokens.dtype != torch.int64 or not new_tokens.is_contiguous():
        raise ValueError(f"new_tokens must be a contiguous int64 vector, got {new_tokens.dtype} "
                         f"{tuple(new_tokens.shape)}")
    if cu_rows.dim() != 1 or cu_rows.dtype != torch.int32 or cu_rows.numel() < 2 or not cu_rows.is_contiguous():
        raise ValueError(f"cu_rows must be a contiguous int32 [B + 1] vector (B >= 1) of row offsets, got "
                         f"{cu_rows.dtype} {tuple(cu_rows.shape)}")
    rows = cu_rows.numel() - 1
    if rows > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} rows per forward, got {rows}")
    if start_pos.shape != (rows,) or start_pos.dtype != torch.int32 or not start_pos.is_contiguous():
        raise ValueError(f"start_pos must be a contiguous int32 [{rows}] vector (one per row of cu_rows), got "
                         f"{start_pos.dtype} {tuple(start_pos.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != rows or block_tables.dtype != torch.int32 \
            or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be int32 [{rows}, max_blocks] with contiguous rows, got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)} strides {block_tables.stride()}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if out_input_ids is not None and (out_input_ids.shape != new_tokens.shape or out_input_ids.dtype != torch.int64):
        raise ValueError(f"out_input_ids must be int64 of new_tokens' shape {tuple(new_tokens.shape)}, got "
                         f"{out_input_ids.dtype} {tuple(out_input_ids.shape)}; pass a slice of a larger buffer")
    devices = {t.device for t in (new_tokens, cu_rows, start_pos, block_tables)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def inject_tokens(new_tokens: torch.Tensor, cu_rows: torch.Tensor, start_pos: torch.Tensor,
                  block_tables: torch.Tensor, block_size: int, out_input_ids: torch.Tensor | None = None,
                  ) -> InjectedRows:
    """Ids, positions and slots of the packed rows (see the module docstring), in one launch.

    ``new_tokens`` int64[total], ``cu_rows`` int32[B+1] (``cu_rows[0] == 0``, ``cu_rows[B] == total``),
    ``start_pos`` int32[B], ``block_tables`` int32[B, M] covering every position written. These are not checked
    on the device (that would sync). ``out_input_ids`` (int64[total], e.g. a view of a persistent buffer) receives
    the ids instead of a new tensor.
    """
    _check_inputs(new_tokens, cu_rows, start_pos, block_tables, block_size, out_input_ids)
    total, rows = new_tokens.numel(), cu_rows.numel() - 1
    out = InjectedRows(
        input_ids=torch.empty_like(new_tokens) if out_input_ids is None else out_input_ids,
        positions=torch.empty_like(new_tokens),
        slot_mapping=torch.empty_like(new_tokens),
    )
    if total == 0:
        return out
    block = 256
    _inject_kernel[(triton.cdiv(total, block),)](
        new_tokens, cu_rows, start_pos, block_tables, block_tables.stride(0),
        out.input_ids, out.positions, out.slot_mapping,
        total, rows, block_size, SEARCH_STEPS=MAX_ROWS.bit_length() - 1, BLOCK=block,
    )
    return out


def inject_tokens_reference(new_tokens: torch.Tensor, cu_rows: torch.Tensor, start_pos: torch.Tensor,
                            block_tables: torch.Tensor, block_size: int, out_input_ids: torch.Tensor | None = None,
                            ) -> InjectedRows:
    """``inject_tokens`` in plain torch (searchsorted finds each token's row, as the kernel's binary search)."""
    _check_inputs(new_tokens, cu_rows, start_pos, block_tables, block_size, out_input_ids)
    index = torch.arange(new_tokens.numel(), device=new_tokens.device)
    row = torch.searchsorted(cu_rows.long(), index, right=True) - 1
    positions = start_pos.long()[row] + index - cu_rows.long()[row]
    blocks = block_tables.long()[row, positions // block_size]
    input_ids = new_tokens.clone() if out_input_ids is None else out_input_ids.copy_(new_tokens)
    slot_mapping = blocks * block_size + positions % block_size
    return InjectedRows(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping)
