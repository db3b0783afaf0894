"""Paged attention as the model calls it: the decode kernel for one-row-per-sequence steps, the extend kernel for
the others, and the plain-torch reference both are tested against (the CPU backend and the specification); and the
same from the raw projections (``paged_rope_attention``: q/k norm, RoPE and the K/V store first).

Index math (kernels/attention_common.py has it in full): kv_cache[2, num_blocks, block_size, Hkv, D], key position p
of sequence b in block ``block_tables[b, p // block_size]``; query rows packed ragged by ``cu_seqlens_q``, each
sequence's last q_len rows of its ``seq_lens[b]`` positions, bottom-right causal; GQA.
"""
import torch
import torch.nn.functional as F

from relaykern.kernels.attention_common import check_attention_inputs
from relaykern.kernels.decode_attention import SMALL_DECODE_BATCH, paged_decode_attention
from relaykern.kernels.extend_attention import paged_extend_attention
from relaykern.kernels.rope import NewKV, qk_norm_rope_store, qk_norm_rope_store_reference


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, max_q_len: int, scale: float, pdl: bool = False) -> torch.Tensor:
    """Attention from a ready q (the new K/V already stored): decode kernel when every sequence has one query row
    (max_q_len == 1, then T must equal B), extend kernel otherwise."""
    if max_q_len == 1:
        return paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, pdl=pdl)
    return paged_extend_attention(q, kv_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale, pdl=pdl)


def paged_rope_attention(q: torch.Tensor, new_kv: NewKV, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_q_len: int, scale: float,
                         split_counters: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """The model's attention from its raw projections: q and k normed and rotated, k and v stored, then attention.
    Given ``split_counters``, a decode step of up to ``SMALL_DECODE_BATCH`` sequences does it all in the decode
    kernel (at positions ``seq_lens - 1``, as the model's decode rows are), its splits merging themselves, reading
    ahead if launched with PDL; other steps run kernels/rope.py's kernel first (at ``new_kv.positions``), then
    attention with merge kernels."""
    if max_q_len == 1 and q.shape[0] <= SMALL_DECODE_BATCH and split_counters is not None:
        return paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, split_counters=split_counters,
                                      new_kv=new_kv, read_ahead=pdl, pdl=pdl)
    q = qk_norm_rope_store(q, new_kv.k, new_kv.v, new_kv.positions, new_kv.cos_sin_cache, kv_cache,
                           new_kv.slot_mapping, new_kv.q_weight, new_kv.k_weight, new_kv.eps, pdl=pdl)
    return paged_attention(q, kv_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale, pdl=pdl)


def paged_rope_attention_reference(q: torch.Tensor, new_kv: NewKV, kv_cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                   max_q_len: int, scale: float, split_counters: torch.Tensor | None = None
                                   ) -> torch.Tensor:
    """``qk_norm_rope_store_reference``, then ``paged_attention_reference`` (split_counters unused)."""
    q = qk_norm_rope_store_reference(q, new_kv.k, new_kv.v, new_kv.positions, new_kv.cos_sin_cache, kv_cache,
                                     new_kv.slot_mapping, new_kv.q_weight, new_kv.k_weight, new_kv.eps)
    return paged_attention_reference(q, kv_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, scale)


def paged_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                              seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_q_len: int,
                              scale: float) -> torch.Tensor:
    """The spec (and CPU backend): per sequence, gather K/V from its blocks and run SDPA in fp32 with an explicit
    bottom-right causal mask. max_q_len is unused (kept for the common signature)."""
    check_attention_inputs(q, kv_cache, block_tables, seq_lens, cu_seqlens_q)
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
