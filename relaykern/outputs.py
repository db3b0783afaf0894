"""What a request returns: tokens, text, which model wrote what, and the relay's statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Source = Literal["slm", "llm"]


@dataclass
class CallRecord:
    """One served command. ``slm_catchup`` is 0 when the request ended during the call."""

    n_asked: int
    n_served: int = 0
    llm_catchup: int = 0
    """Tokens the LLM read at this call before its first token (those it had not read ahead)."""
    slm_catchup: int = 0
    latency_s: float = 0.0
    """From the command read to the LLM's last token of the call, or to the end of a request ended during it."""


@dataclass
class RelayStats:
    slm_tokens: int = 0
    llm_tokens: int = 0
    calls: int = 0
    llm_prefill_tokens: int = 0
    """Tokens the LLM read before its calls' first tokens, read ahead or at the call (a view recomputed after
    preemption during a call is not counted)."""
    slm_catchup_tokens: int = 0
    unserved_calls: int = 0
    """Commands seen but not served: no LLM configured, or ``max_calls`` reached."""
    call_records: list[CallRecord] = field(default_factory=list)

    @property
    def call_ratio(self) -> float:
        """LLM-generated tokens / all response tokens (the paper's metric; prefill is not counted)."""
        total = self.slm_tokens + self.llm_tokens
        return self.llm_tokens / total if total else 0.0


@dataclass
class RelayOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    spans: list[tuple[Source, int, int]]
    """Contiguous ``(source, start, end)`` runs over ``token_ids``: which model wrote each token."""
    finish_reason: str
    """``stop`` (EOS or a stop string), ``length``, ``malformed_call``, ``max_calls``, ``abort`` or ``error``."""
    stats: RelayStats = field(default_factory=RelayStats)
    logprobs: list[float] | None = None
    error: str | None = None


def append_span(spans: list[tuple[Source, int, int]], source: Source, start: int, end: int) -> None:
    """Adds tokens [start, end) written by ``source``, merging with the last run when it is the same model."""
    if end <= start:
        return
    if spans and spans[-1][0] == source and spans[-1][2] == start:
        spans[-1] = (source, spans[-1][1], end)
    else:
        spans.append((source, start, end))
