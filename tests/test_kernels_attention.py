"""Paged attention: the reference against naive dense math, the Triton kernels against the reference.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), so CPU shapes are tiny and fp32 only.
"""
import pytest
import torch

from attention_cases import assert_close, counters, make_case, naive_attention, random_case
from relaykern.kernels import attention_common
from relaykern.kernels.attention import paged_attention, paged_attention_reference
from relaykern.kernels.attention_common import TILE_N, choose_num_splits
from relaykern.kernels.decode_attention import MAX_DECODE_SPLITS, paged_decode_attention
from relaykern.kernels.extend_attention import MAX_SPLITS, MIN_SPLIT_KEYS, choose_extend_tile, paged_extend_attention

REFERENCE_CASES = {
    "prefill": ([5, 12], [0, 0], 4, 2, 16, 16),
    "decode_gqa8": ([1, 1, 1], [0, 15, 40], 8, 1, 32, 16),
    "catch_up_block_edges": ([3, 16, 1], [16, 31, 32], 4, 4, 16, 16),
    "odd_group_and_dim": ([7, 2], [9, 33], 6, 2, 24, 32),
}


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_reference_matches_naive(name):
    case = make_case(*REFERENCE_CASES[name], device="cpu")
    assert_close(paged_attention_reference(*case.args()), naive_attention(case), torch.float32)


@pytest.mark.parametrize("seed", range(20))
def test_extend_matches_reference_random(seed):
    case = random_case(seed, decode=False)
    # Forced splits include empty ones and rows that see no key in a split. The merge runs one program per
    # (row, head), which the interpreter pays for: split only the smaller cases.
    num_splits = [None, 1, 2, 5][seed % 4] if case.q.shape[0] * case.q.shape[1] <= 128 else None
    assert_close(paged_extend_attention(*case.args(), num_splits), paged_attention_reference(*case.args()))


@pytest.mark.parametrize("q_lens,context_lens,num_q_heads,num_kv_heads,head_dim,block_size,num_splits", [
    ([150, 3], [40, 0], 1, 1, 16, 32, 3),  # q tiles per sequence > 1 without GQA
    ([20, 17], [5, 64], 16, 2, 16, 16, 1),  # group 8: BLOCK_Q = 16 tiles both sequences
    ([4, 0, 2], [30, 10, 0], 4, 2, 32, 16, 2),  # a sequence with no query rows
    ([7, 2], [9, 33], 6, 2, 24, 32, 1),  # non-power-of-two group and head_dim
    ([3, 1], [40, 70], 8, 1, 16, 16, 4),  # group 8 with splits
    ([5, 1], [12, 30], 10, 2, 64, 16, 1),  # group 5 (Qwen3-14B, Qwen2.5-14B/32B), head_dim 64 (Llama 3.2 1B)
    ([3, 2], [20, 7], 7, 1, 128, 16, 2),  # group 7 (Qwen2.5-0.5B/7B), head_dim 128, splits
])
def test_extend_edge_cases(q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, num_splits):
    case = make_case(q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size)
    expected = paged_attention_reference(*case.args())
    assert_close(paged_extend_attention(*case.args(), num_splits), expected)


def test_extend_max_q_len_is_only_a_bound():
    case = make_case([3, 5], [20, 0], 4, 2, 16, 16)
    args = list(case.args())
    args[5] = 40  # a bigger tile than needed must give the same answer
    assert_close(paged_extend_attention(*args), paged_attention_reference(*case.args()))


@pytest.mark.parametrize("num_splits", [None, 1, 3, 8, 40])
@pytest.mark.parametrize("seed", range(6))
def test_decode_matches_reference_random(seed, num_splits):
    case = random_case(100 + seed, decode=True)
    expected = paged_attention_reference(*case.args())
    assert_close(paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale,
                                        num_splits), expected)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(10, 2, 64), (7, 1, 128), (12, 2, 128)])
def test_decode_real_model_groups(num_q_heads, num_kv_heads, head_dim):
    """Groups of 5, 7 and 6 query heads per KV head (Qwen3-14B, Qwen2.5-7B, Qwen2.5-1.5B): not powers of two."""
    case = make_case([1, 1], [37, 5], num_q_heads, num_kv_heads, head_dim, 16)
    for num_splits in (None, 3):
        assert_close(paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale,
                                            num_splits), paged_attention_reference(*case.args()))


def test_decode_zero_length_padding_row_gives_zeros():
    case = make_case([1, 1], [70, 0], 4, 2, 16, 16)
    case.seq_lens[1] = 0
    for num_splits in (1, 4, MAX_DECODE_SPLITS):  # most of 64 splits hold no key: they write nothing
        out = paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale, num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert_close(out[:1], paged_attention_reference(*case.args())[:1])


def test_dispatcher():
    decode = make_case([1, 1], [33, 5], 4, 2, 16, 16)
    assert_close(paged_attention(*decode.args()), paged_attention_reference(*decode.args()))
    extend = make_case([2, 1], [33, 5], 4, 2, 16, 16)
    assert_close(paged_attention(*extend.args()), paged_attention_reference(*extend.args()))
    with pytest.raises(ValueError, match="one query row per sequence"):
        paged_attention(extend.q, *extend.args()[1:5], 1, extend.scale)


def test_extend_tile_shapes():
    assert choose_extend_tile(4, 4) == (16, 4)  # a 4-row catch-up packs 4 heads into a 16-row tile
    assert choose_extend_tile(1, 1) == (16, 16)
    assert choose_extend_tile(2048, 4) == (128, 32)
    assert choose_extend_tile(3, 32) == (128, 4)


def test_num_splits_heuristic(monkeypatch):
    monkeypatch.setattr(attention_common, "_num_sms", lambda device: 132)  # an H100
    cpu = torch.device("cpu")
    extend = dict(min_split_keys=MIN_SPLIT_KEYS, max_splits=MAX_SPLITS)
    assert choose_num_splits(32 * 8, 4096, cpu, **extend) == 3  # bs 32 x 8 kv heads nearly fills the GPU
    assert choose_num_splits(1 * 8, 4096, cpu, **extend) == 16  # bs 1: split as far as MIN_SPLIT_KEYS allows
    assert choose_num_splits(1 * 8, 300, cpu, **extend) == 1  # short context: not worth a merge
    assert choose_num_splits(256 * 8, 4096, cpu, **extend) == 1
    decode = dict(min_split_keys=TILE_N, max_splits=MAX_DECODE_SPLITS)
    assert choose_num_splits(1 * 8, 4096, cpu, **decode) == 64  # decode bs 1: a key tile per split
    assert choose_num_splits(1 * 8, 300, cpu, **decode) == 4


def test_split_counts_out_of_range_are_errors():
    case = make_case([1], [40], 4, 2, 16, 16)
    with pytest.raises(ValueError, match=r"num_splits must be in \[1, 64\]"):
        paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale, 65)
    with pytest.raises(ValueError, match=r"num_splits must be in \[1, 16\]"):
        paged_extend_attention(*case.args(), 17)


def test_rejects_bad_inputs():
    case = make_case([2], [3], 4, 2, 16, 16)
    q, kv_cache, tables, seq_lens, cu, max_q_len, scale = case.args()
    with pytest.raises(ValueError, match="dtype"):
        paged_extend_attention(q.double(), kv_cache, tables, seq_lens, cu, max_q_len, scale)
    with pytest.raises(ValueError, match="multiple"):
        paged_extend_attention(q[:, :3], kv_cache, tables, seq_lens, cu, max_q_len, scale)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_extend_attention(q, kv_cache, tables.long(), seq_lens, cu, max_q_len, scale)
    with pytest.raises(ValueError, match="B \\+ 1"):
        paged_extend_attention(q, kv_cache, tables, seq_lens, cu[:1], max_q_len, scale)


GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_gpu_random_small(seed, dtype):
    for decode in (False, True):
        case = random_case(seed + 200 * decode, decode, (16, 32, 256), dtype)
        assert_close(paged_attention(*case.args()), naive_attention(case), dtype)
        if decode:
            for split_counters in (None, counters(case)):
                out = paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale, 4,
                                             split_counters)
                assert_close(out, naive_attention(case), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_decode_qwen3_8b(batch, block_size, dtype):
    case = make_case([1] * batch, [4095] * batch, 32, 8, 128, block_size, dtype, seed=batch)
    expected = paged_attention_reference(*case.args())
    assert_close(paged_attention(*case.args()), expected, dtype)
    assert_close(paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale, 1),
                 expected, dtype)
    # The splits merging themselves (64 at batch 1, the most): launches queued back to back, each reading counters
    # the one before left zero, all exact.
    split_counters = counters(case)
    outs = [paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale,
                                   split_counters=split_counters) for _ in range(20)]
    assert_close(outs[0], expected, dtype)
    assert all(torch.equal(out, outs[0]) for out in outs)
    assert not split_counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_lens,context_lens", [([512], [4096]), ([2048], [0]), ([16, 1, 300, 7], [4000, 0, 100, 33])])
def test_gpu_extend_qwen3_8b(q_lens, context_lens, dtype):
    for block_size in (16, 256):
        case = make_case(q_lens, context_lens, 32, 8, 128, block_size, dtype, seed=len(q_lens))
        assert_close(paged_attention(*case.args()), paged_attention_reference(*case.args()), dtype)
