"""The reference relay's hooks into HF ``generate``: a stopping criterion that sees each token, logits processors
for what HF lacks (vLLM's presence / frequency penalties, ``min_tokens``, relaykern's per-row processors), and a
generation config with every sampling field explicit."""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from relaykern import protocol
from relaykern.config import SamplingParams
from relaykern.stop_rule import StopRule


class TurnWatcher(StoppingCriteria):
    """Sees each token of one ``generate`` call (batch of one) and stops it at the first that ends the turn.

    ``stopped``: the token ends the request (EOS, stop id, stop string). ``event``: the command event the token
    raised (only when ``scan_state`` is given, i.e. for the SLM); ``protocol.scan`` keeps its offsets relative to
    the token.
    """

    def __init__(self, input_len: int, table: list[bytes], text: bytes, response_len: int, stop_rule: StopRule,
                 scan_state: protocol.ScanState | None):
        """``text``, ``response_len``: the response's bytes and length before this call."""
        self.input_len = input_len
        self.table = table
        self.text = bytearray(text)
        self.response_len = response_len
        self.stop_rule = stop_rule
        self.scan_state = scan_state
        self.tokens: list[int] = []
        self.stopped = False
        self.event: protocol.Event | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for token in input_ids[0, self.input_len + len(self.tokens) :].tolist():
            self._see(token)
        return torch.tensor([self.done], device=input_ids.device)

    @property
    def done(self) -> bool:
        return self.stopped or self.event is not None

    def _see(self, token: int) -> None:
        if self.done:
            raise RuntimeError("generate went on after the stopping criterion ended it")
        self.tokens.append(token)
        data = bytes_of(self.table, token)
        before = len(self.text)
        self.text += data
        self.stopped = self.stop_rule.ends(token, self.text, before, self.response_len + len(self.tokens))
        if self.stopped or self.scan_state is None:
            return
        events = protocol.scan(self.scan_state, data)
        if len(events) > 1:
            raise ValueError(f"token {token} ({data!r}) raises {len(events)} command events; the relay needs one")
        self.event = events[0] if events else None


class ProcessorAdapter(LogitsProcessor):
    """HF's batched ``(input_ids, scores)`` → relaykern's per-row ``(response_so_far, logits)`` processors."""

    def __init__(self, processors: Sequence, response: list[int], input_len: int):
        self.processors, self.response, self.input_len = processors, response, input_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = self.response + input_ids[0, self.input_len :].tolist()
        row = scores[0]
        for processor in self.processors:
            row = processor(generated, row)
        return row.unsqueeze(0)


class NoStopBefore(LogitsProcessor):
    """``min_tokens``: the stop ids (EOS included) cannot be sampled before this call's token number ``count``."""

    def __init__(self, stop_ids: frozenset[int], count: int, input_len: int):
        self.stop_ids, self.count, self.input_len = sorted(stop_ids), count, input_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.input_len < self.count:
            scores[:, [t for t in self.stop_ids if 0 <= t < scores.shape[-1]]] = float("-inf")
        return scores


class SharedIdsOnly(LogitsProcessor):
    """Ids from ``limit`` on, which one model of the pair has no embedding for (vocabularies padded to different
    sizes), cannot be sampled: the engine's ``ModelRunner.sampled_vocab``."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.limit:] = float("-inf")
        return scores


class ResponsePenalties(LogitsProcessor):
    """vLLM's presence and frequency penalties over the response part of ``input_ids`` (HF has none; HF's
    ``repetition_penalty`` runs before it, over the whole of ``input_ids``, as vLLM's does)."""

    def __init__(self, params: SamplingParams, prompt_len: int):
        self.presence, self.frequency, self.prompt_len = params.presence_penalty, params.frequency_penalty, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.bincount(input_ids[0, self.prompt_len:], minlength=scores.shape[-1])[:scores.shape[-1]]
        return scores - self.frequency * counts.to(scores.dtype) - self.presence * (counts > 0).to(scores.dtype)


def bytes_of(table: list[bytes], token: int) -> bytes:
    """Ids past the tokenizer (the embedding's padding rows) write nothing."""
    return table[token] if token < len(table) else b""


def generation_config(params: SamplingParams, max_length: int, output_scores: bool) -> GenerationConfig:
    """Every sampling field explicit, so a checkpoint's generation_config.json (Qwen3: temperature 0.6, top-k 20)
    cannot leak in. EOS is left to ``TurnWatcher`` (``eos_token_id=[]``), which also honours ``ignore_eos``.
    transformers 5 leaves unset fields None and fills them from the checkpoint, so its library defaults are set
    explicitly; older releases have no such helper and put the defaults in ``GenerationConfig()`` itself."""
    library_defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)
    config = GenerationConfig(**library_defaults())
    sample = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                                       "min_p": params.min_p or None}
    config.update(
        do_sample=not params.greedy, max_length=max_length, eos_token_id=[], pad_token_id=0,
        repetition_penalty=params.repetition_penalty,
        output_scores=output_scores, return_dict_in_generate=True, **sample,
    )
    return config
