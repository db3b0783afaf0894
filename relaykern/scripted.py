"""Scripting a model's output with a logits processor: how demos, tests and benchmarks make a random SLM write
commands (a random model never calls on its own)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from relaykern.config import LogitsProcessor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def force_tokens(schedule: Mapping[int, Sequence[int]]) -> LogitsProcessor:
    """A processor writing ``schedule[p]`` from response position ``p`` on (positions p, p+1, ...).

    Positions index the whole response, the LLM's tokens included, so a schedule can place a command after a
    served call. At a forced position every other token gets -inf and the forced one 0, so greedy and sampling
    both pick it (its log-prob is 0); elsewhere the logits pass through untouched.
    """
    forced: dict[int, int] = {}
    for start, tokens in schedule.items():
        for offset, token in enumerate(tokens):
            if forced.setdefault(start + offset, token) != token:
                raise ValueError(f"force_tokens: two tokens scheduled at position {start + offset}")

    def processor(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        token = forced.get(len(generated))
        if token is None:
            return logits
        out = torch.full_like(logits, -math.inf)
        out[token] = 0.0
        return out

    processor.position_only = True  # it reads the position alone: overlapped steps may run it (config.py)
    return processor


def force_command(tokenizer: "PreTrainedTokenizerBase", at: int, n: int) -> LogitsProcessor:
    """Makes the SLM write ``<call>n</call>`` starting at response position ``at``."""
    return force_tokens({at: tokenizer.encode(f"<call>{n}</call>", add_special_tokens=False)})
