"""store_kv (Triton) and store_kv_reference against a per-token loop; CPU runs the Triton interpreter."""
import pytest
import torch

from relaykern.kernels.store_kv import store_kv, store_kv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(num_tokens, num_kv_heads, head_dim, block_size, num_blocks, dtype, slot_dtype, seed, device="cpu"):
    """key/value as strided views of a fused qkv buffer (as the model produces them), unique slots with some -1."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.25] = -1
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    return key.to(device), value.to(device), kv_cache.to(device), slots.to(slot_dtype).to(device)


def store_naive(key, value, kv_cache, slot_mapping):
    block_size = kv_cache.shape[2]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            kv_cache[0, slot // block_size, slot % block_size] = key[token]
            kv_cache[1, slot // block_size, slot % block_size] = value[token]


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reference_matches_naive(block_size, slot_dtype):
    key, value, kv_cache, slots = make_inputs(23, 2, 16, block_size, 4, torch.float32, slot_dtype, seed=block_size)
    expected = kv_cache.clone()
    store_naive(key, value, expected, slots)
    store_kv_reference(key, value, kv_cache, slots)
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # a pure copy: exact in any dtype
@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim,block_size,slot_dtype", [
    (1, 1, 16, 16, torch.int32),
    (37, 2, 32, 16, torch.int64),
    (20, 3, 24, 32, torch.int32),  # non-power-of-two heads and head_dim exercise the masks
    (9, 4, 64, 32, torch.int64),
])
def test_triton_matches_reference(num_tokens, num_kv_heads, head_dim, block_size, slot_dtype, dtype):
    key, value, kv_cache, slots = make_inputs(num_tokens, num_kv_heads, head_dim, block_size, 5, dtype, slot_dtype,
                                              seed=num_tokens, device=DEVICE)
    expected = kv_cache.clone()
    store_kv_reference(key, value, expected, slots)
    store_kv(key, value, kv_cache, slots)
    assert torch.equal(kv_cache, expected)


def test_all_skipped_and_empty():
    key, value, kv_cache, slots = make_inputs(4, 1, 16, 16, 1, torch.float32, torch.int32, seed=0, device=DEVICE)
    before = kv_cache.clone()
    store_kv(key, value, kv_cache, torch.full_like(slots, -1))
    store_kv(key[:0], value[:0], kv_cache, slots[:0])
    assert torch.equal(kv_cache, before)


def test_rejects_bad_inputs():
    key, value, kv_cache, slots = make_inputs(4, 2, 16, 16, 2, torch.float32, torch.int32, seed=0)
    with pytest.raises(ValueError, match="kv_cache dtype"):
        store_kv(key.half(), value.half(), kv_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(key, value, kv_cache, slots.float())
    with pytest.raises(ValueError, match="must both be"):
        store_kv(key[:, :1], value[:, :1], kv_cache, slots)
    with pytest.raises(ValueError, match="contiguous"):
        store_kv(key, value, kv_cache.transpose(1, 2), slots)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_qwen3_shapes(block_size):
    key, value, kv_cache, slots = make_inputs(2048, 8, 128, block_size, 4096 // block_size * 3, torch.bfloat16,
                                              torch.int32, seed=1, device="cuda")
    expected = kv_cache.clone()
    store_kv_reference(key, value, expected, slots)
    store_kv(key, value, kv_cache, slots)
    assert torch.equal(kv_cache, expected)
