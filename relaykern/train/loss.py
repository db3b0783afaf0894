"""Token log-probs and the GRPO policy loss (clipped ratio, dual clip, low-variance KL), as in the official verl code.

All tensors are ``[batch, response_len]`` over response tokens; ``mask`` is 1 where a token is trained on (the
SLM wrote it) and 0 for padding and for LLM-written tokens, which are context, not actions of the policy.
Sums are returned alongside token counts so a caller can take one token mean over micro-batches and ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)[targets]`` in fp32, without materialising the full log-softmax.

    ``logits[b, t]`` must be the prediction for ``targets[b, t]``. Dividing by the rollout temperature makes these
    the log-probs of the distribution that was sampled from (verl does the same).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def low_var_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy ‖ ref) per token: e^(r−p) − (r−p) − 1, clamped to [−10, 10]."""
    diff = (ref_log_probs.float() - log_probs.float()).clamp(-20.0, 20.0)
    return (diff.exp() - diff - 1.0).clamp(-10.0, 10.0)


@dataclass
class LossTerms:
    """Per-token terms of one micro-batch, summed over ``mask`` (divide by the token count for means)."""

    pg_loss: torch.Tensor
    kl: torch.Tensor
    clip_high: torch.Tensor
    """Tokens whose ratio was clipped by the PPO clip (1 − clip_low, 1 + clip_high)."""
    clip_dual: torch.Tensor
    """Tokens with negative advantage whose loss was capped by the dual clip."""
    tokens: torch.Tensor


def policy_loss_terms(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float = 3.0,
) -> LossTerms:
    """Dual-clip PPO (arXiv 1912.09729) with asymmetric clip (DAPO), the k3 KL term, summed over ``mask``.

    Per token: ``max(−A·r, −A·clip(r))``, and for ``A < 0`` additionally ``min(·, −A·dual_clip)``.
    ``advantages`` broadcasts from ``[batch, 1]``.
    """
    mask = mask.to(log_probs.dtype)
    log_ratio = (log_probs - old_log_probs).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    clipped_ratio = log_ratio.clamp(math.log(1.0 - clip_low), math.log(1.0 + clip_high)).exp()
    loss = -advantages * ratio
    loss_clipped = torch.maximum(loss, -advantages * clipped_ratio)
    loss_dual = torch.minimum(loss_clipped, -advantages * dual_clip)
    negative = (advantages < 0).expand_as(loss)
    final = torch.where(negative, loss_dual, loss_clipped)
    kl = low_var_kl(log_probs, ref_log_probs) if ref_log_probs is not None else torch.zeros_like(final)
    with torch.no_grad():
        clipped = (loss < loss_clipped).to(mask.dtype)
        dual = ((loss_clipped > -advantages * dual_clip) & negative).to(mask.dtype)
    return LossTerms(
        pg_loss=masked_sum(final, mask),
        kl=masked_sum(kl, mask),
        clip_high=masked_sum(clipped, mask),
        clip_dual=masked_sum(dual, mask),
        tokens=mask.sum(),
    )


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: ``(r − mean) / (std + eps)`` within each consecutive group of ``group_size`` samples.

    ``std`` is the unbiased estimate (torch.std), as in verl; a group with equal rewards gets zero advantages.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"GRPO needs group_size >= 2 dividing the batch ({rewards.numel()} samples, "
                         f"group_size {group_size})")
    grouped = rewards.float().view(-1, group_size)
    normalised = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)
    return normalised.view(-1)
