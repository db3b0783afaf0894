"""Write new tokens' K/V into the paged KV cache: a Triton kernel and its plain-torch reference.

Cache layout of one layer: ``kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim]`` (index 0 = K, 1 = V).
Token t goes to slot ``s = slot_mapping[t]``, i.e. block ``s // block_size``, offset ``s % block_size``;
``s == -1`` means "do not store" (padding rows, e.g. of a CUDA-graph batch).

The models store through ``relaykern.kernels.rope.qk_norm_rope_store`` or, at a decode step, the decode attention
kernel (the same layout and checks, fused with the rotation of k); this kernel is the store alone, for callers that
have k and v ready.
"""
import torch
import triton
import triton.language as tl


def check_kv_cache(kv_cache: torch.Tensor) -> None:
    """The one layout every paged kernel assumes: contiguous [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be a contiguous [2, num_blocks, block_size, num_kv_heads, head_dim] tensor "
                         f"(one layer of the KV pool, pool[layer]); got shape {tuple(kv_cache.shape)}, "
                         f"contiguous={kv_cache.is_contiguous()}")


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_cache_kv, stride_cache_slot, stride_cache_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: all kv heads of the token are one [BLOCK_H, BLOCK_D] tile.
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_value_t + offs_h[:, None] * stride_value_h + offs_d[None, :],
                    mask=mask)
    # (block, offset) is contiguous in the cache, so slot * stride(offset) addresses it directly.
    dst = cache_ptr + slot * stride_cache_slot + offs_h[:, None] * stride_cache_h + offs_d[None, :]
    tl.store(dst, key, mask=mask)
    tl.store(dst + stride_cache_kv, value, mask=mask)


def check_store_inputs(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    check_kv_cache(kv_cache)
    if key.shape != value.shape or key.dim() != 3 or key.shape[1:] != kv_cache.shape[3:]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be "
                         f"[T, {kv_cache.shape[3]}, {kv_cache.shape[4]}] to match kv_cache {tuple(kv_cache.shape)}")
    if key.dtype != kv_cache.dtype or value.dtype != kv_cache.dtype:
        raise ValueError(f"key/value dtype {key.dtype}/{value.dtype} must equal kv_cache dtype {kv_cache.dtype}; "
                         "cast before storing")
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 of shape ({key.shape[0]},), got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache[0].flat_slot[slot_mapping[t]] = key[t] and likewise V, skipping slot -1. key/value: [T, Hkv, D]
    (head_dim contiguous; token/head strides may be those of a fused qkv view)."""
    check_store_inputs(key, value, kv_cache, slot_mapping)
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key/value need a contiguous last (head_dim) dimension; call .contiguous() first")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Plain-torch store_kv: index_copy into the [num_blocks * block_size, Hkv, D] view of K and of V."""
    check_store_inputs(key, value, kv_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kv_cache[0].view(-1, *kv_cache.shape[3:]).index_copy_(0, slots, key[keep])
    kv_cache[1].view(-1, *kv_cache.shape[3:]).index_copy_(0, slots, value[keep])
