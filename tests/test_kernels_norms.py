"""rms_norm, qk_norm_rope_store and silu_and_mul (Triton) against their torch references; CPU runs the interpreter.

In fp32 the kernels equal the references up to summation order. In bf16 they round after every op as torch does,
so on a GPU they are off by at most two roundings (an fp32 sum in another order moves a last bit, and the next
rounding may double it); the interpreter's conversions to bf16 do not round to nearest, so it gets more slack.
"""
import pytest
import torch

from relaykern.kernels.activation import silu_and_mul, silu_and_mul_reference
from relaykern.kernels.rms_norm import rms_norm, rms_norm_reference
from relaykern.kernels.rope import qk_norm_rope_store, qk_norm_rope_store_reference
from relaykern.models.layers import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_TOLERANCE = 2 ** -6 if DEVICE == "cuda" else 2 ** -4


def randn(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def assert_close(actual, expected):
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=BF16_TOLERANCE, atol=BF16_TOLERANCE)


def qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, seed, device=DEVICE):
    """q, k and v as the strided views of a fused qkv projection the model hands over."""
    qkv = randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed, device=device)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.view(num_tokens, num_q_heads, head_dim), *(t.view(num_tokens, num_kv_heads, head_dim) for t in (k, v))


def check_qk_norm_rope_store(q, k, v, positions, cos_sin_cache, slots, norms, num_blocks, block_size=4,
                             heads_per_program=None):
    """The kernel's rotated q and cache against the reference's, from the same random cache (unstored slots keep
    their values)."""
    cache = randn(2, num_blocks, block_size, k.shape[1], k.shape[2], dtype=q.dtype, seed=9)
    expected_cache = cache.clone()
    expected = qk_norm_rope_store_reference(q, k, v, positions, cos_sin_cache, expected_cache, slots, *norms)
    actual = qk_norm_rope_store(q, k, v, positions, cos_sin_cache, cache, slots, *norms,
                                heads_per_program=heads_per_program)
    assert actual.is_contiguous() and actual.shape == expected.shape
    assert_close(actual, expected)
    assert_close(cache, expected_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows,hidden", [(1, 64), (7, 48), (3, 100)])
def test_rms_norm(num_rows, hidden, dtype):
    x, residual = randn(num_rows, hidden, dtype=dtype, seed=1), randn(num_rows, hidden, dtype=dtype, seed=2)
    weight = randn(hidden, dtype=dtype, seed=3)
    assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    for actual, expected in zip(rms_norm(x, weight, 1e-6, residual), rms_norm_reference(x, weight, 1e-6, residual)):
        assert_close(actual, expected)


def test_rms_norm_rejects_strided_rows():
    x = randn(4, 32)
    with pytest.raises(ValueError, match="contiguous rows"):
        rms_norm(x.t(), randn(4), 1e-6)
    assert rms_norm(x[:0], randn(32), 1e-6).shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [True, False], ids=["qwen3", "llama"])
@pytest.mark.parametrize("num_tokens,num_q_heads,num_kv_heads,head_dim", [(5, 4, 2, 16), (3, 3, 1, 24)])
@pytest.mark.parametrize("heads_per_program", [1, 2, None], ids=["gpu", "2", "interpreted"])  # None: all heads
def test_qk_norm_rope_store(num_tokens, num_q_heads, num_kv_heads, head_dim, with_norm, dtype, heads_per_program):
    q, k, v = qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, seed=num_tokens)
    cos_sin = RotaryEmbedding(head_dim, 64, 1e6, None).cos_sin_cache.to(DEVICE)
    positions = torch.tensor([0, 63, 7, 1, 30][:num_tokens], device=DEVICE)
    slots = torch.tensor([9, -1, 0, 17, 4][:num_tokens], device=DEVICE)  # -1: a padding row, stored nowhere
    norms = (randn(head_dim, dtype=dtype, seed=5), randn(head_dim, dtype=dtype, seed=6), 1e-6) if with_norm else ()
    check_qk_norm_rope_store(q, k, v, positions, cos_sin, slots, norms, num_blocks=5,
                             heads_per_program=heads_per_program)


def test_qk_norm_rope_store_bad_input():
    q, k, v = qkv_views(2, 2, 1, 16, torch.float32, seed=0)
    cos_sin = RotaryEmbedding(16, 8, 1e4, None).cos_sin_cache.to(DEVICE)
    positions, slots = torch.tensor([0, 1], device=DEVICE), torch.tensor([0, 1], device=DEVICE)
    cache = randn(2, 2, 4, 1, 16)
    with pytest.raises(ValueError, match="both be None"):
        qk_norm_rope_store(q, k, v, positions, cos_sin, cache, slots, randn(16), None)
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope_store(q, k, v, positions[:1], cos_sin, cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope_store(q, k, v, positions, cos_sin, cache, slots[:1])
    with pytest.raises(ValueError, match="kv_cache"):
        qk_norm_rope_store(q, k, v, positions, cos_sin, cache[0], slots)
    with pytest.raises(ValueError, match="power of two, got 3"):
        qk_norm_rope_store(q, k, v, positions, cos_sin, cache, slots, heads_per_program=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows,width", [(1, 32), (4, 2 * 1500)])  # 1500: two column blocks, the last partial
def test_silu_and_mul(num_rows, width, dtype):
    x = randn(num_rows, width, dtype=dtype, seed=width) * 4
    assert_close(silu_and_mul(x), silu_and_mul_reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("with_norm", [True, False], ids=["qwen3", "llama"])
def test_gpu_qwen3_8b_shapes(with_norm):
    """bf16 at the 8B model's widths: hidden 4096, intermediate 12288, 32 q / 8 kv heads of 128."""
    x, residual = (randn(37, 4096, dtype=torch.bfloat16, seed=s) for s in (1, 2))
    weight = randn(4096, dtype=torch.bfloat16, seed=3)
    normed, summed = rms_norm(x, weight, 1e-6, residual)
    expected_normed, expected_summed = rms_norm_reference(x, weight, 1e-6, residual)
    assert torch.equal(summed, expected_summed)
    assert_close(normed, expected_normed)
    q, k, v = qkv_views(37, 32, 8, 128, torch.bfloat16, seed=4)
    cos_sin = RotaryEmbedding(128, 40960, 1e6, None).cos_sin_cache.cuda()
    positions = torch.randint(0, 40960, (37,), device="cuda")
    norms = (randn(128, dtype=torch.bfloat16, seed=5), randn(128, dtype=torch.bfloat16, seed=6), 1e-6) \
        if with_norm else ()
    slots = torch.randperm(16 * 16, device="cuda")[:37]
    check_qk_norm_rope_store(q, k, v, positions, cos_sin, slots, norms, num_blocks=16, block_size=16)
    gate_up = randn(37, 2 * 12288, dtype=torch.bfloat16, seed=7) * 4
    assert_close(silu_and_mul(gate_up), silu_and_mul_reference(gate_up))
