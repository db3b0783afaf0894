"""gumbel_sample: the Triton kernel draws the reference's tokens from the reference's noise, with its log-probs.

The noise u is exact in fp32 on both sides; only ``log`` may differ in the last ulp, so tokens are compared on rows
whose two best perturbed logits are not razor-close (nearly all rows of random logits).
"""
import math

import pytest
import torch

from relaykern.kernels.sample import (
    CHUNK, U_STEP, gumbel_noise, gumbel_sample, gumbel_sample_reference, hash32, row_keys, token_logprobs,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASK32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """The published lowbias32 (Wellons), in plain Python integers."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def random_case(rows: int, vocab: int, seed: int):
    """Random logits; every third row greedy, the others at temperatures in [0.25, 1.75); random seeds and steps."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    temperature = torch.rand(rows, generator=generator) * 1.5 + 0.25
    temperature[::3] = 0
    seeds = torch.randint(0, 2**62, (rows,), generator=generator)
    steps = torch.randint(0, 10_000, (rows,), generator=generator)
    return logits.to(DEVICE), temperature.to(DEVICE), row_keys(seeds, steps).to(DEVICE)


def clear_rows(logits, temperature, row_key, gap: float = 1e-4) -> torch.Tensor:
    """Rows whose best perturbed logit beats the second by more than ``gap`` (a last-ulp log cannot flip them)."""
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    perturbed = torch.where(greedy[:, None], logits, scaled + gumbel_noise(row_key, logits.shape[1]))
    best = perturbed.topk(2, dim=-1).values
    return best[:, 0] - best[:, 1] > gap


def test_reference_noise_is_the_documented_formula():
    values = torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(0))
    assert hash32(values).tolist() == [lowbias32(v) for v in values.tolist()]
    bit_patterns = torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)  # the int32 lanes' form
    assert (hash32(bit_patterns).long() & MASK32).tolist() == [lowbias32(v) for v in values.tolist()]
    keys = row_keys(torch.tensor([0, 5, 2**40 + 3]), torch.tensor([0, 1, 7]))
    assert ((keys >= 0) & (keys <= MASK32)).all()
    noise = gumbel_noise(keys, 300)
    for row, key in enumerate(keys.tolist()):
        for column in (0, 1, 2, 299):
            u = ((lowbias32(key ^ (column * 0x85EBCA6B & MASK32)) >> 9) + 0.5) * U_STEP  # float64: exact
            assert noise[row, column].item() == pytest.approx(-math.log(-math.log(u)), rel=1e-6, abs=1e-6)
    # The extreme uniforms stay strictly inside (0, 1) in fp32: every Gumbel is finite.
    extremes = torch.tensor([0.5, 2**23 - 0.5]) * U_STEP
    assert extremes[0] > 0 and extremes[1] < 1 and torch.isfinite(-torch.log(-torch.log(extremes))).all()


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("vocab", [37, 1000, CHUNK + 904])  # a tiny tile; one partial tile; two chunks, partial
def test_kernel_matches_reference(rows, vocab):
    case = random_case(rows, vocab, seed=rows * 7919 + vocab)
    tokens, logprobs = gumbel_sample(*case, want_logprobs=True)
    want_tokens, want_logprobs = gumbel_sample_reference(*case, want_logprobs=True)
    clear = clear_rows(*case)
    assert clear.float().mean() > 0.9 and clear[0]
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens[clear], want_tokens[clear])
    assert torch.allclose(logprobs[clear], want_logprobs[clear], rtol=1e-5, atol=1e-5)
    logits, temperature, _ = case
    scaled = logits / torch.where(temperature == 0, 1.0, temperature)[:, None]
    assert torch.allclose(logprobs, token_logprobs(scaled, tokens), rtol=1e-5, atol=1e-5)  # unclear rows too
    tokens_only, none = gumbel_sample(*case, want_logprobs=False)
    assert none is None and torch.equal(tokens_only, tokens)


def test_greedy_ties_take_the_lowest_column_like_torch_argmax():
    vocab = 2 * CHUNK + 100
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    for row, columns in enumerate(([CHUNK + 500, 700], [1024 + 10, 10], [5, 3])):  # chunks; lane; tile
        logits[row, columns] = 10.0
    logits = logits.to(DEVICE)
    tokens, _ = gumbel_sample(logits, torch.zeros(3, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE),
                              want_logprobs=False)
    assert tokens.tolist() == logits.argmax(-1).tolist() == [700, 10, 3]


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")  # row 2
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_minus_infinity_logits(temperature):
    vocab = CHUNK + 50
    logits = torch.full((3, vocab), float("-inf"))
    logits[0, CHUNK + 7] = 1.5  # a forced token (as a logits processor leaves it), in the second chunk
    logits[1, :CHUNK] = torch.randn(CHUNK, generator=torch.Generator().manual_seed(2))  # the second chunk all -inf
    case = (logits.to(DEVICE), torch.full((3,), temperature, device=DEVICE),
            row_keys(torch.arange(3), torch.zeros(3, dtype=torch.int64)).to(DEVICE))
    tokens, logprobs = gumbel_sample(*case, want_logprobs=True)
    want_tokens, want_logprobs = gumbel_sample_reference(*case, want_logprobs=True)
    assert tokens.tolist() == want_tokens.tolist() and tokens[0] == CHUNK + 7 and tokens[2] == 0  # row 2: all -inf
    assert logprobs[0] == 0 and torch.allclose(logprobs[1], want_logprobs[1], rtol=1e-5, atol=1e-5)
    assert logprobs[2].isnan() and want_logprobs[2].isnan()  # as log_softmax of an all -inf row


def test_a_row_draws_the_same_in_any_batch():
    logits, temperature, row_key = random_case(9, CHUNK + 904, seed=3)
    tokens, logprobs = gumbel_sample(logits, temperature, row_key, want_logprobs=True)
    subset = torch.tensor([7, 2, 4], device=DEVICE)
    again, again_logprobs = gumbel_sample(logits[subset], temperature[subset], row_key[subset], want_logprobs=True)
    assert torch.equal(again, tokens[subset]) and torch.equal(again_logprobs, logprobs[subset])  # bit for bit


def test_strided_rows_and_empty_batch():
    logits, temperature, row_key = random_case(4, 1000, seed=4)
    wide = torch.zeros(4, 1200, device=DEVICE)
    wide[:, :1000] = logits
    assert torch.equal(gumbel_sample(wide[:, :1000], temperature, row_key, False)[0],
                       gumbel_sample(logits, temperature, row_key, False)[0])
    tokens, logprobs = gumbel_sample(logits[:0], temperature[:0], row_key[:0], want_logprobs=True)
    assert tokens.shape == logprobs.shape == (0,)


def test_bad_inputs_raise_value_error():
    logits, temperature, row_key = random_case(4, 100, seed=5)
    with pytest.raises(ValueError, match="logits must be fp32"):
        gumbel_sample(logits.bfloat16(), temperature, row_key, False)
    with pytest.raises(ValueError, match="logits must be fp32"):
        gumbel_sample(logits[:, ::2], temperature, row_key, False)
    with pytest.raises(ValueError, match="temperature must be"):
        gumbel_sample(logits, temperature[:3], row_key, False)
    with pytest.raises(ValueError, match="row_key must be"):
        gumbel_sample(logits, temperature, row_key.int(), False)
