"""The device sampler: greedy, filters, counter-based noise, and that it draws from the right distribution."""
import torch

from relaykern.engine.sampler import SamplingBatch, filter_logits, sample, uniform_noise


def batch(rows: int, temperature=1.0, top_p=1.0, top_k=0, seed=0) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((rows,), temperature), top_p=torch.full((rows,), top_p),
        top_k=torch.full((rows,), top_k, dtype=torch.int64), seeds=torch.full((rows,), seed, dtype=torch.int64),
        steps=torch.arange(rows, dtype=torch.int64), needs_filter=top_k > 0 or top_p < 1,
        all_greedy=temperature == 0)


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = torch.randn(5, 50)
    tokens, logprobs = sample(logits, batch(5, temperature=0), want_logprobs=True)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1))


def test_noise_is_uniform_and_depends_only_on_seed_and_step():
    seeds = torch.tensor([1, 1, 2], dtype=torch.int64)
    steps = torch.tensor([0, 1, 0], dtype=torch.int64)
    u = uniform_noise(seeds, steps, 4096)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = uniform_noise(seeds[[2, 0]], steps[[2, 0]], 4096)  # another batch layout, same rows
    assert torch.equal(again[1], u[0]) and torch.equal(again[0], u[2])


def test_sampling_matches_softmax_frequencies():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(20000, 1)
    b = batch(20000, temperature=0.7)
    tokens, _ = sample(logits, b, want_logprobs=False)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    assert torch.allclose(freq, (logits[0] / 0.7).softmax(-1), atol=0.015)


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    kept_k = filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(kept_k).tolist() == [[True, True, False, False]]
    probs = logits.softmax(-1)[0]  # ≈ .64 .24 .09 .03
    kept_p = filter_logits(logits, torch.tensor([0]), torch.tensor([float(probs[0]) + 0.01]))
    assert torch.isfinite(kept_p).tolist() == [[True, True, False, False]]
    tokens, _ = sample(logits.repeat(2000, 1), batch(2000, top_k=2), want_logprobs=False)
    assert set(tokens.tolist()) == {0, 1}


def test_seeded_rows_reproduce():
    logits = torch.randn(4, 100)
    a, _ = sample(logits, batch(4, seed=7), want_logprobs=False)
    b, _ = sample(logits, batch(4, seed=7), want_logprobs=False)
    assert torch.equal(a, b)
