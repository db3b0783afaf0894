"""Paged attention: the reference against naive dense math, the Triton kernels against the reference.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), so CPU shapes are tiny and fp32 only.
"""
import random
from dataclasses import dataclass

import pytest
import torch

from memory_bounds import kernels_stay_in_bounds
from relaykern.kernels import attention_common
from relaykern.kernels.attention import (paged_attention, paged_attention_reference, paged_rope_attention,
                                        paged_rope_attention_reference)
from relaykern.kernels.attention_common import TILE_N, choose_num_splits
from relaykern.kernels.decode_attention import MAX_DECODE_SPLITS, SMALL_DECODE_BATCH, paged_decode_attention
from relaykern.kernels.extend_attention import MAX_SPLITS, MIN_SPLIT_KEYS, choose_extend_tile, paged_extend_attention
from relaykern.kernels.pdl import pdl_supported
from relaykern.kernels.rope import NewKV
from relaykern.models.layers import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # atol = rtol


@dataclass
class Case:
    q: torch.Tensor  # [T, Hq, D], a strided view of a fused qkv buffer
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    scale: float

    def args(self):
        return (self.q, self.kv_cache, self.block_tables, self.seq_lens, self.cu_seqlens_q, self.max_q_len,
                self.scale)


def make_case(q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32,
              device=DEVICE, seed=0) -> Case:
    """Sequences get distinct shuffled blocks; spare blocks and unused block-table entries hold junk that a
    kernel reading out of bounds would pick up."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + n for ctx, n in zip(context_lens, q_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    block_tables = torch.randint(0, num_blocks, (len(q_lens), max(blocks_per_seq) + 1), generator=gen)
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = torch.tensor(free_blocks[:count], dtype=torch.long)
        free_blocks = free_blocks[count:]
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    qkv = torch.randn(sum(q_lens), num_q_heads + 2 * num_kv_heads, head_dim, generator=gen)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Case(qkv[:, :num_q_heads].to(device, dtype), kv_cache.to(device, dtype),
                block_tables.to(device, torch.int32), torch.tensor(seq_lens, dtype=torch.int32, device=device),
                cu_seqlens_q.to(device), max(q_lens), head_dim ** -0.5)


def naive_attention(case: Case) -> torch.Tensor:
    """Dense float64 softmax(q k^T * scale + causal) v, one sequence at a time, K/V looked up key by key."""
    kv, tables = case.kv_cache.double().cpu(), case.block_tables.cpu().long()
    block_size, num_kv_heads = kv.shape[2], kv.shape[3]
    group = case.q.shape[1] // num_kv_heads
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    bounds = case.cu_seqlens_q.tolist()
    for seq, seq_len in enumerate(case.seq_lens.tolist()):
        q = case.q[bounds[seq]:bounds[seq + 1]].double().cpu()
        positions = torch.arange(seq_len)
        blocks, offsets = tables[seq, positions // block_size], positions % block_size
        heads = torch.arange(q.shape[1]) // group
        key, value = kv[0, blocks, offsets][:, heads], kv[1, blocks, offsets][:, heads]  # [seq_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q, key) * case.scale
        query_positions = seq_len - q.shape[0] + torch.arange(q.shape[0])
        scores[:, positions[None, :] > query_positions[:, None]] = float("-inf")
        out[bounds[seq]:bounds[seq + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), value)
    return out


def assert_close(actual, expected, dtype=torch.float32):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), atol=tol, rtol=tol)


def random_case(seed: int, decode: bool, block_sizes=(16, 32), dtype=torch.float32) -> Case:
    """Ragged batch: GQA 1/2/4/8, head_dim 16/32/64, contexts 0..80 (crossing blocks), q_len 1..20."""
    rng = random.Random(seed)
    group, num_kv_heads = rng.choice([1, 2, 4, 8]), rng.choice([1, 2])
    batch = rng.randint(1, 4)
    q_lens = [1] * batch if decode else [rng.randint(1, 20) for _ in range(batch)]
    context_lens = [rng.choice([0, rng.randint(0, 80)]) for _ in range(batch)]
    if decode:
        context_lens = [ctx + rng.randint(0, 60) for ctx in context_lens]
    return make_case(q_lens, context_lens, group * num_kv_heads, num_kv_heads, rng.choice([16, 32, 64]),
                     rng.choice(block_sizes), dtype, seed=seed)


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


def counters(case: Case) -> torch.Tensor:
    return torch.zeros(case.q.shape[0] * case.kv_cache.shape[3], dtype=torch.int32, device=case.q.device)


@pytest.mark.parametrize("num_splits", [None, 1, 3, 40])
@pytest.mark.parametrize("seed", range(4))
def test_decode_self_merge_matches_reference(seed, num_splits):
    """The last split of each (sequence, kv head) merges: same output, and the counters are zero again for the next
    launch (here, the same call twice)."""
    case = random_case(300 + seed, decode=True)
    expected = paged_attention_reference(*case.args())
    split_counters = counters(case)
    for _ in range(2):
        assert_close(paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale,
                                            num_splits, split_counters), expected)
        assert not split_counters.any()


@pytest.mark.parametrize("from_projections", [False, True])
def test_decode_self_merge_short_padding_and_group(from_projections):
    """A sequence whose keys fit in its first split writes directly, a padding row gets zeros (rotated nowhere
    outside the RoPE table: its seq_len is 0), the merging program merges each of a group's 5 heads, and no load or
    store leaves the kernel's tensors (reading ahead, as the fused step with PDL; the interpreter has no PDL)."""
    case = make_case([1, 1, 1], [200, 3, 0], 10, 2, 16, 16)
    case.seq_lens[2] = 0
    new_kv = new_kv_of(case, True, 0) if from_projections else None
    expected_cache = case.kv_cache.clone()
    expected = (paged_rope_attention_reference(case.q, new_kv, expected_cache, *case.args()[2:]) if new_kv
                else paged_attention_reference(*case.args()))
    split_counters = counters(case)
    with kernels_stay_in_bounds():
        out = paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale, 8,
                                     split_counters, new_kv, read_ahead=True)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and not split_counters.any()
    assert_close(out[:2], expected[:2])
    assert_close(case.kv_cache, expected_cache)


def test_decode_split_counters_are_checked():
    case = make_case([1, 1], [40, 5], 4, 2, 16, 16)
    for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int64),
                torch.zeros(8, dtype=torch.int32)[::2]):
        with pytest.raises(ValueError, match="split_counters must be a contiguous int32"):
            paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale, 2, bad)


def new_kv_of(case: Case, with_norm: bool, seed: int) -> NewKV:
    """Raw k and v for each sequence's last token, going to the slot of its position (seq_len - 1); a seq_len 0
    row stores nowhere. Random norm weights and Qwen3's RoPE table."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs, (block_size, num_kv_heads, head_dim) = case.q.shape[0], case.kv_cache.shape[2:]
    k, v = (torch.randn(num_seqs, num_kv_heads, head_dim, generator=gen).to(case.q) for _ in range(2))
    last = (case.seq_lens.long() - 1).clamp(min=0)
    blocks = case.block_tables.long().gather(1, (last // block_size)[:, None])[:, 0]
    slots = torch.where(case.seq_lens > 0, blocks * block_size + last % block_size, -1)
    cos_sin = RotaryEmbedding(head_dim, int(case.seq_lens.max()) + 1, 1e6, None).cos_sin_cache.to(case.q.device)
    norms = tuple(torch.randn(head_dim, generator=gen).to(case.q) for _ in range(2)) if with_norm else ()
    return NewKV(k, v, last, cos_sin, slots, *norms)


@pytest.mark.parametrize("with_norm", [True, False], ids=["qwen3", "llama"])
@pytest.mark.parametrize("num_splits,self_merge", [(None, False), (1, False), (3, True), (40, True)])
@pytest.mark.parametrize("seed", range(3))
def test_decode_from_raw_projections_matches_reference(seed, num_splits, self_merge, with_norm):
    """Norm, RoPE and the K/V store done inside the decode kernel: the reference's output and cache (the new
    token's K/V written, nothing else touched)."""
    case = random_case(400 + seed, decode=True)
    new_kv = new_kv_of(case, with_norm, seed)
    expected_cache = case.kv_cache.clone()
    expected = paged_rope_attention_reference(case.q, new_kv, expected_cache, *case.args()[2:])
    split_counters = counters(case) if self_merge else None
    out = paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale, num_splits,
                                 split_counters, new_kv)
    assert_close(out, expected)
    assert_close(case.kv_cache, expected_cache)
    assert split_counters is None or not split_counters.any()


@pytest.mark.parametrize("from_projections", [False, True])
def test_decode_reading_ahead_matches_reference(from_projections):
    """Splits that read their first key tile before the PDL wait (all but the last, which holds the new token):
    the same output. The interpreter has no PDL: reading ahead without it."""
    for seed in range(3):
        case = random_case(500 + seed, decode=True)
        new_kv = new_kv_of(case, True, seed) if from_projections else None
        expected_cache = case.kv_cache.clone()
        expected = (paged_rope_attention_reference(case.q, new_kv, expected_cache, *case.args()[2:]) if new_kv
                    else paged_attention_reference(*case.args()))
        for num_splits, split_counters in ((3, counters(case)), (40, None), (1, None)):
            out = paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale,
                                         num_splits, split_counters, new_kv, read_ahead=True)
            assert_close(out, expected)


@pytest.mark.parametrize("fused", [True, False])
def test_rope_attention_dispatches_decode_and_extend(fused):
    """The model's call: given counters (``fused``), a small decode step in the decode kernel alone; a larger one,
    a ragged one, and any without counters through the rope kernel first; a padding row (seq_len 0, slot -1) gets
    zeros and stores nothing."""
    large = SMALL_DECODE_BATCH + 1
    for q_lens, context_lens in (([1, 1, 1], [30, 0, 7]), ([1] * large, list(range(3, 3 + large))),
                                 ([3, 1], [20, 5])):
        case = make_case(q_lens, context_lens, 4, 2, 16, 16, seed=len(q_lens))
        if q_lens == [1, 1, 1]:
            case.seq_lens[1] = 0
        new_kv = new_kv_of(case, True, 0)
        if len(q_lens) == 2:  # rows at positions seq_len - q_len ..., slots of the first blocks' offsets
            new_kv = NewKV(*(t.repeat(2, 1, 1)[:4] for t in (new_kv.k, new_kv.v)),
                           torch.tensor([20, 21, 22, 5]), new_kv.cos_sin_cache, torch.tensor([-1, 1, 2, 3]),
                           new_kv.q_weight, new_kv.k_weight)
        expected_cache = case.kv_cache.clone()
        expected = paged_rope_attention_reference(case.q, new_kv, expected_cache, *case.args()[2:])
        split_counters = counters(case) if fused else None
        out = paged_rope_attention(case.q, new_kv, case.kv_cache, *case.args()[2:], split_counters=split_counters)
        assert_close(out, expected)
        assert_close(case.kv_cache, expected_cache)
        assert split_counters is None or not split_counters.any()


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
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_fused_decode_from_projections_with_pdl(batch):
    """The fused decode step as the runner launches it (Qwen3-8B heads, bf16): from the raw projections, splits
    merging themselves, launched with PDL and reading ahead when the GPU has PDL; launches back to back, each
    against the reference (its K/V store rewrites the same slot with the same values)."""
    dtype = torch.bfloat16
    case = make_case([1] * batch, [2047] * batch, 32, 8, 128, 16, dtype, seed=batch)
    new_kv = new_kv_of(case, True, batch)
    expected_cache = case.kv_cache.clone()
    expected = paged_rope_attention_reference(case.q, new_kv, expected_cache, *case.args()[2:])
    pdl = pdl_supported(case.q.device)
    split_counters = counters(case)
    outs = [paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, case.scale,
                                   split_counters=split_counters, new_kv=new_kv, read_ahead=pdl, pdl=pdl)
            for _ in range(20)]
    assert_close(outs[0], expected, dtype)
    assert_close(case.kv_cache, expected_cache, dtype)
    assert all(torch.equal(out, outs[0]) for out in outs)
    assert not split_counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_lens,context_lens", [([512], [4096]), ([2048], [0]), ([16, 1, 300, 7], [4000, 0, 100, 33])])
def test_gpu_extend_qwen3_8b(q_lens, context_lens, dtype):
    for block_size in (16, 256):
        case = make_case(q_lens, context_lens, 32, 8, 128, block_size, dtype, seed=len(q_lens))
        assert_close(paged_attention(*case.args()), paged_attention_reference(*case.args()), dtype)
