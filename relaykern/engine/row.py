"""What one sequence feeds one model's forward: the unit the scheduler plans and the runner packs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from relaykern.config import SamplingParams

FED_ON_DEVICE = -1
"""The token of a decode row whose input the forward takes from a device tensor (``execute``'s ``fed_tokens``)."""


@dataclass
class Row:
    """What one sequence feeds a forward: ``tokens`` at positions ``start...``; the next token is sampled after them."""

    seq_id: int
    tokens: list[int]
    start: int
    samples: bool
    """Whether the row ends its view, so that its sampled token is the model's next one (a prefill or catch-up
    chunk that does not end it is computed for its KV alone; what it samples is ignored)."""
    sampling: SamplingParams
    seed: int
    step: int
    """Index in the response of the token to sample (the noise counter; also what logits processors see)."""
    history: list[int]
    """The response so far (logits processors get it)."""
    want_logprobs: bool
    context: Sequence[int] = ()
    """The model's view of the request (the list the scheduler feeds from, not a copy): what penalties count."""
    prompt_len: int = 0
    """How many of ``context`` are the prompt."""
