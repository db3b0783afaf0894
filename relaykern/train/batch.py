"""Prompt + response sequences → padded tensors → per-token log-probs of the response under a causal LM.

Both trainers need the same thing: ``log p(response[j] | prompt, response[:j])`` for every response token, with a
mask saying which tokens count. Layout: row ``b`` is ``prompt_b + response_b`` right-padded to ``L``; response
token ``j`` of row ``b`` sits at ``prompt_len_b + j`` and is predicted at ``positions[b, j] = prompt_len_b + j − 1``.
Response-aligned tensors are ``[B, R]`` with ``R`` the longest response; padding has mask 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from relaykern.train.loss import token_log_probs


@dataclass
class ResponseBatch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, R] where each response token is predicted
    targets: torch.Tensor  # [B, R] the response tokens
    mask: torch.Tensor  # [B, R] float, 1 where the token is trained on

    def to(self, device: torch.device) -> "ResponseBatch":
        return ResponseBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.positions,
                                                       self.targets, self.mask)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
            masks: Sequence[Sequence[float]], pad_id: int) -> ResponseBatch:
    """Packs rows (see the module docstring). Every prompt needs at least one token."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (its last one predicts the first response token)")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    resp_width = max(1, max(len(r) for r in responses))
    rows = len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.zeros((rows, resp_width), dtype=torch.long)
    targets = torch.full((rows, resp_width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, resp_width), dtype=torch.float32)
    for b, (prompt, response, weights) in enumerate(zip(prompts, responses, masks)):
        n_p, n_r = len(prompt), len(response)
        input_ids[b, : n_p + n_r] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention[b, : n_p + n_r] = 1
        positions[b, :n_r] = torch.arange(n_p - 1, n_p + n_r - 1)
        targets[b, :n_r] = torch.tensor(list(response), dtype=torch.long)
        mask[b, :n_r] = torch.tensor(list(weights), dtype=torch.float32)
    return ResponseBatch(input_ids, attention, positions, targets, mask)


def _chunk_log_probs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    return token_log_probs(head(hidden), targets, temperature)


class ResponseLogProbs(torch.nn.Module):
    """Wraps an HF causal LM: ``forward(batch) -> [B, R]`` fp32 log-probs of the response tokens.

    The LM head runs only on response positions, ``chunk`` positions at a time under activation checkpointing,
    so the ``[tokens, vocab]`` logits (151,936 wide for Qwen3) never exist for a whole sequence at once. Wrap this
    module, not the HF model, in DDP: its forward is then the one DDP hooks.
    """

    def __init__(self, lm: torch.nn.Module, chunk: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk = chunk

    def forward(self, batch: ResponseBatch, temperature: float = 1.0) -> torch.Tensor:
        hidden = self.lm.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       use_cache=False).last_hidden_state
        picked = hidden.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        flat, targets = picked.reshape(-1, picked.shape[-1]), batch.targets.reshape(-1)
        head = self.lm.get_output_embeddings()
        pieces = []
        for start in range(0, flat.shape[0], self.chunk):
            args = (head, flat[start : start + self.chunk], targets[start : start + self.chunk], temperature)
            pieces.append(checkpoint(_chunk_log_probs, *args, use_reentrant=False) if torch.is_grad_enabled()
                          else _chunk_log_probs(*args))
        return torch.cat(pieces).view_as(batch.targets)
