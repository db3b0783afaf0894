"""The device sampler: greedy, filters, counter-based noise, and that it draws from the right distribution.

Every sampling test runs on both backends: "torch" (the reference, noise materialised) and "triton" (the fused
kernel; under the interpreter on CPU, where each row costs milliseconds, the frequency test draws 500 rows, not
20000: its 4-sigma bounds are wider, and test_backends_draw_the_same_tokens checks the tokens one by one).
"""
import math

import pytest
import torch

from relaykern.engine.sampler import SamplingBatch, filter_logits, sample
from relaykern.kernels.sample import gumbel_noise, row_keys

BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EULER_GAMMA = 0.5772156649


def batch(rows: int, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=0) -> SamplingBatch:
    full = lambda value, dtype: torch.full((rows,), value, dtype=dtype, device=DEVICE)  # noqa: E731
    return SamplingBatch(
        temperature=full(temperature, torch.float32), top_p=full(top_p, torch.float32), top_k=full(top_k, torch.int64),
        min_p=full(min_p, torch.float32),
        row_key=row_keys(full(seed, torch.int64), torch.arange(rows, dtype=torch.int64, device=DEVICE)),
        needs_filter=top_k > 0 or top_p < 1 or min_p > 0)


def keep(logits: torch.Tensor, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """filter_logits with one setting for every row."""
    rows = logits.shape[0]
    return filter_logits(logits, torch.full((rows,), top_k), torch.full((rows,), top_p), torch.full((rows,), min_p))


def rows_for(backend: str, rows: int) -> int:
    """``rows`` draws, a fortieth (at least 50) for the kernel under the interpreter (~7 ms a row)."""
    return rows if backend == "torch" or torch.cuda.is_available() else max(rows // 40, 50)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("all_greedy", [True, False], ids=["no_batch", "temperature_0"])
def test_greedy_is_argmax_and_logprob_is_log_softmax(backend, all_greedy):
    logits = torch.randn(5, 50, device=DEVICE)
    settings = None if all_greedy else batch(5, temperature=0)
    tokens, logprobs = sample(logits, settings, want_logprobs=True, backend=backend)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1), atol=1e-6)


def test_row_keys_of_python_ints_equal_the_tensor_ones():
    seeds, steps = [0, 7, 2**62 - 1, -5], [0, 1, 40959, 3]
    keys = row_keys(torch.tensor(seeds), torch.tensor(steps)).tolist()
    assert [row_keys(seed, step) for seed, step in zip(seeds, steps)] == keys


def test_noise_is_gumbel_and_depends_only_on_seed_and_step():
    seeds = torch.tensor([1, 1, 2], dtype=torch.int64)
    steps = torch.tensor([0, 1, 0], dtype=torch.int64)
    noise = gumbel_noise(row_keys(seeds, steps), 4096)
    assert torch.isfinite(noise).all()
    assert abs(noise.mean().item() - EULER_GAMMA) < 0.03 and abs(noise.std().item() - math.pi / 6**0.5) < 0.03
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    again = gumbel_noise(row_keys(seeds[[2, 0]], steps[[2, 0]]), 4096)  # another batch layout, same rows
    assert torch.equal(again[1], noise[0]) and torch.equal(again[0], noise[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_matches_softmax_frequencies(backend):
    rows = rows_for(backend, 20000)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0], device=DEVICE).repeat(rows, 1)
    tokens, _ = sample(logits, batch(rows, temperature=0.7), want_logprobs=False, backend=backend)
    freq = torch.bincount(tokens, minlength=4).float().cpu() / rows
    probs = (logits[0].cpu() / 0.7).softmax(-1)
    assert (freq - probs).abs().le(4 * (probs * (1 - probs) / rows).sqrt() + 1 / rows).all(), (freq, probs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_and_top_p_filter(backend):
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(keep(logits, top_k=2)).tolist() == [[True, True, False, False]]
    probs = logits.softmax(-1)[0]  # ≈ .64 .24 .09 .03
    assert torch.isfinite(keep(logits, top_p=float(probs[0]) + 0.01)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(keep(logits, min_p=0.1)).tolist() == [[True, True, True, False]]  # .09 / .64 > .1 > .05
    rows = rows_for(backend, 2000)
    tokens, _ = sample(logits.to(DEVICE).repeat(rows, 1), batch(rows, top_k=2), want_logprobs=False, backend=backend)
    assert set(tokens.tolist()) == {0, 1}


def test_top_k_keeps_ties_and_top_p_1_keeps_the_whole_vocabulary():
    tied = keep(torch.tensor([[3.0, 2.0, 2.0, 1.0]]), top_k=2)
    assert torch.isfinite(tied).tolist() == [[True, True, True, False]]  # as vLLM and HF: ties at the k-th stay
    # A float32 running sum over Qwen3's vocabulary reaches 1 before its tail: rows asking no top-p keep it all.
    logits = torch.randn(2, 151936, generator=torch.Generator().manual_seed(0))
    kept = filter_logits(logits, torch.tensor([0, 5]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(kept[0]).all() and torch.isfinite(kept[1]).sum() == 5


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.05), (20, 0.95, 0.0), (20, 0.95, 0.1), (0, 0.8, 0.3),
                                                  (50, 1.0, 0.02), (1, 1.0, 0.0), (0, 1.0, 1.0)])
def test_filters_keep_what_hf_warpers_keep(top_k, top_p, min_p):
    """The reference relay samples with HF's warpers (top-k, top-p, min-p, in that order): same survivors."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(top_k)) * 4
    hf = logits.clone()
    warpers = ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + \
        ([MinPLogitsWarper(min_p)] if min_p else [])
    for warper in warpers:
        hf = warper(None, hf)
    assert torch.equal(torch.isfinite(keep(logits, top_k, top_p, min_p)), torch.isfinite(hf))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_rows_reproduce(backend):
    logits = torch.randn(4, 100, device=DEVICE)
    a, _ = sample(logits, batch(4, seed=7), want_logprobs=False, backend=backend)
    b, _ = sample(logits, batch(4, seed=7), want_logprobs=False, backend=backend)
    assert torch.equal(a, b)


def test_backends_draw_the_same_tokens_with_and_without_filters():
    rows, vocab = 12, 3000
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(DEVICE)
    mixed = batch(rows, temperature=0.8, seed=11)
    mixed.temperature[::4] = 0  # greedy rows among the sampled ones
    for top_k, top_p, min_p in ((0, 1.0, 0.0), (50, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.1)):
        mixed.top_k.fill_(top_k)
        mixed.top_p.fill_(top_p)
        mixed.min_p.fill_(min_p)
        mixed.needs_filter = top_k > 0 or top_p < 1 or min_p > 0
        torch_tokens, torch_logprobs = sample(logits, mixed, want_logprobs=True, backend="torch")
        triton_tokens, triton_logprobs = sample(logits, mixed, want_logprobs=True, backend="triton")
        assert torch.equal(torch_tokens, triton_tokens), (top_k, top_p, min_p)
        assert torch.allclose(torch_logprobs, triton_logprobs, rtol=1e-5, atol=1e-5), (top_k, top_p, min_p)
