"""The fused decode step (kernels/attention.py's ``paged_rope_attention`` with split counters): splits merging
themselves, q/k norm + RoPE + K/V store inside the decode kernel, reading ahead before the PDL wait; against the
references. On CPU the kernels run under the Triton interpreter (tests/conftest.py): tiny fp32 shapes.
"""
import pytest
import torch

from attention_cases import assert_close, counters, make_case, new_kv_of, random_case
from relaykern.kernels.attention import paged_attention_reference, paged_rope_attention, paged_rope_attention_reference
from relaykern.kernels.decode_attention import SMALL_DECODE_BATCH, paged_decode_attention
from relaykern.kernels.pdl import pdl_supported
from relaykern.kernels.rope import NewKV


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
    outside the RoPE table: its seq_len is 0, and tests/conftest.py fails any load outside the kernel's tensors), the
    merging program merges each of a group's 5 heads (reading ahead, as the fused step with PDL; the interpreter has
    no PDL)."""
    case = make_case([1, 1, 1], [200, 3, 0], 10, 2, 16, 16)
    case.seq_lens[2] = 0
    new_kv = new_kv_of(case, True, 0) if from_projections else None
    expected_cache = case.kv_cache.clone()
    expected = (paged_rope_attention_reference(case.q, new_kv, expected_cache, *case.args()[2:]) if new_kv
                else paged_attention_reference(*case.args()))
    split_counters = counters(case)
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
