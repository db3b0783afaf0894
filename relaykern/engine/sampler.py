"""Sampling on the device: greedy, temperature, top-k, top-p, per-request seeds, log-probs of the sampled tokens.

Randomness is counter-based: the noise for (request seed, step, vocabulary index) is a hash, so a request's samples
do not depend on which other requests share its batch, on preemption, or on the device's RNG state. Sampling is
Gumbel-max over the filtered, temperature-scaled logits, which draws exactly from their softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons) on int64 lanes holding uint32 values; the low 32 bits of each product are exact."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0,1) noise of shape [rows, vocab] from (seed, step) per row, identical on every device and batch layout."""
    row_key = _hash32((_hash32(seeds & _MASK32) ^ _hash32((steps * 0x9E3779B1 + (seeds >> 32)) & _MASK32)) & _MASK32)
    column = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32((row_key[:, None] ^ ((column[None, :] * 0x85EBCA6B) & _MASK32)) & _MASK32)
    return (bits.to(torch.float64) + 0.5).div_(2.0**32).to(torch.float32)


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors (built once per step by the runner)."""

    temperature: torch.Tensor  # float32 [R]; 0 = greedy
    top_p: torch.Tensor  # float32 [R]
    top_k: torch.Tensor  # int64 [R]; 0 = off
    seeds: torch.Tensor  # int64 [R]
    steps: torch.Tensor  # int64 [R]: index of the token being sampled in its response
    needs_filter: bool  # some row uses top-k or top-p (skips the sort otherwise)
    all_greedy: bool


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets logits outside each row's top-k and top-p nucleus to -inf (the most likely token always survives)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch, want_logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits fp32 [R, V] → (token ids int64 [R], log-probs [R] of those tokens under the sampled distribution)."""
    greedy = batch.temperature == 0
    if batch.all_greedy:
        tokens = logits.argmax(dim=-1)
        scaled = logits
    else:
        scaled = logits / torch.where(greedy, 1.0, batch.temperature)[:, None]
        if batch.needs_filter:
            scaled = filter_logits(scaled, batch.top_k, batch.top_p)
        gumbel = -torch.log(-torch.log(uniform_noise(batch.seeds, batch.steps, logits.shape[-1])))
        tokens = torch.where(greedy, logits.argmax(dim=-1), (scaled + gumbel).argmax(dim=-1))
    logprobs = None
    if want_logprobs:
        logprobs = scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
