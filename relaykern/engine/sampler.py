"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds, log-probs of sampled tokens,
and no stop before ``min_tokens``.

Randomness is counter-based: the noise for (request seed, step, vocabulary index) is a hash, so a request's samples
do not depend on which other requests share its batch, on preemption, or on the device's RNG state. Sampling is
Gumbel-max over the filtered, temperature-scaled logits, which draws exactly from their softmax. The draw (noise,
argmax, log-prob) is ``relaykern.kernels.sample``: one fused kernel on the triton backend, its torch reference else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from relaykern.engine.row import Row
from relaykern.engine.transfer import host_to_device
from relaykern.kernels.sample import gumbel_sample, gumbel_sample_reference, token_logprobs


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors (built once per step by the runner)."""

    temperature: torch.Tensor  # float32 [R]; 0 = greedy
    top_p: torch.Tensor  # float32 [R]
    top_k: torch.Tensor  # int64 [R]; 0 = off
    min_p: torch.Tensor  # float32 [R]; 0 = off
    row_key: torch.Tensor  # int64 [R]: kernels.sample.row_keys(request seed, index of the token in its response)
    needs_filter: bool  # some row uses top-k, top-p or min-p (skips the sort otherwise)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
                  ) -> torch.Tensor:
    """Sets logits outside each row's top-k, then top-p nucleus, then min-p cut to -inf, as HF's warpers in that
    order (the most likely token always survives). Top-k keeps every token tied with the k-th largest logit (as
    vLLM and HF); a row with top_p 1 loses nothing to top-p (a float32 running sum over a large vocabulary passes 1
    before its tail); min-p drops what is less likely than min_p times the most likely token top-p kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)[:, None]
    drop = sorted_logits < sorted_logits.gather(-1, k - 1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    drop[:, 0] = False
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= probs < min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def block_early_stops(logits: torch.Tensor, rows: list[Row], eos: Sequence[int]) -> None:
    """Sets to -inf, in place, the logits of the tokens that would end a request (EOS unless ``ignore_eos``, stop
    ids) in the rows whose response is shorter than their ``min_tokens``."""
    rows_index, tokens = [], []
    for i, row in enumerate(rows):
        if row.samples and row.step < row.sampling.min_tokens:
            kept = [t for t in row.sampling.stop_ids(eos) if 0 <= t < logits.shape[1]]
            rows_index += [i] * len(kept)
            tokens += kept
    if tokens:
        logits[host_to_device(logits.device, [rows_index, tokens], torch.int64).unbind()] = float("-inf")


def sample(logits: torch.Tensor, batch: SamplingBatch | None, want_logprobs: bool, backend: str,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits fp32 [R, V] → (token ids int64 [R], log-probs [R] of those tokens under the sampled distribution).

    ``batch`` None: every row is greedy (an argmax; no settings sent to the device). ``backend`` "triton" draws
    with the fused kernel (no [R, V] noise), "torch" with its reference; both draw the same tokens from the same
    noise. Top-k / top-p / min-p filtering needs a sort, done here in torch before the draw.
    """
    if batch is None:
        tokens = logits.argmax(dim=-1)
        return tokens, token_logprobs(logits, tokens) if want_logprobs else None
    draw = gumbel_sample if backend == "triton" else gumbel_sample_reference
    if batch.needs_filter:
        greedy = batch.temperature == 0
        scaled = filter_logits(logits / torch.where(greedy, 1.0, batch.temperature)[:, None], batch.top_k, batch.top_p,
                               batch.min_p)
        # Already scaled: draw at temperature 1 (x / 1 is exact), greedy rows at 0 (the filter keeps their argmax).
        return draw(scaled, (~greedy).to(torch.float32), batch.row_key, want_logprobs)
    return draw(logits, batch.temperature, batch.row_key, want_logprobs)
