"""Admission: a request is checked against both models before it is queued, so bad input fails alone, at once,
with a message naming the problem, and never inside a step where it could take other requests down."""
from __future__ import annotations

import dataclasses
import operator
import random
from typing import TYPE_CHECKING, Iterable, Sequence as Seq

from relaykern.config import SamplingParams
from relaykern.engine.runner import ModelRunner
from relaykern.engine.sequence import Sequence
from relaykern.stop_rule import StopRule

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def new_sequences(prompts: Iterable[str | list[int]], sampling: SamplingParams | Seq[SamplingParams] | None,
                  llm_sampling: SamplingParams | None, tokenizer: PreTrainedTokenizerBase, slm: ModelRunner,
                  llm: ModelRunner | None) -> list[Sequence]:
    """A batch's requests as Sequences (``sampling``: one for all, or one per prompt), or the first ValueError (see
    ``new_sequence``), saying which prompt it is. One string is a mistake, not a batch of one-character prompts."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings or of token id lists, not one string")
    prompts = list(prompts)
    samplings = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(samplings) != len(prompts):
        raise ValueError(f"{len(samplings)} SamplingParams for {len(prompts)} prompts")
    seqs = []
    for index, (prompt, params) in enumerate(zip(prompts, samplings)):
        try:
            seqs.append(new_sequence(prompt, params, llm_sampling, tokenizer, slm, llm))
        except ValueError as error:
            raise ValueError(f"prompt {index}: {error}") from None
    return seqs


def new_sequence(prompt: str | list[int], sampling: SamplingParams | None, llm_sampling: SamplingParams | None,
                 tokenizer: PreTrainedTokenizerBase, slm: ModelRunner, llm: ModelRunner | None) -> Sequence:
    """The request as a Sequence, or ValueError: an empty prompt, ids outside the vocabulary, a prompt + max_tokens
    longer than either model's context or than either KV pool can ever hold."""
    sampling = sampling or SamplingParams()
    runners = [slm] + ([llm] if llm is not None else [])
    prompt_ids = _prompt_ids(prompt, tokenizer, slm.sampled_vocab)  # (the ids both models embed)
    limit = min(runner.max_model_len for runner in runners)
    if len(prompt_ids) + sampling.max_tokens > limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens {sampling.max_tokens} exceeds the "
                         f"model context of {limit} tokens; shorten the prompt or lower max_tokens")
    for runner in runners:
        need = runner.blocks_needed(len(prompt_ids) + sampling.max_tokens)
        if need > runner.num_blocks:
            raise ValueError(f"one request needs up to {need} KV blocks but the pool has {runner.num_blocks}; "
                             "raise num_blocks / kv_cache_memory_gb or lower max_tokens")
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(62)
    # The LLM's own seed when given; else one derived from the request's, so that the models' draws differ.
    llm_seed = llm_sampling.seed if llm_sampling is not None and llm_sampling.seed is not None else seed ^ 0x5EED
    if llm_sampling is None:  # the teacher samples like the student, stop rules included, without its scripting
        llm_sampling = dataclasses.replace(sampling, logits_processors=())
    llm_eos = llm.model_config.eos_token_ids if llm is not None else ()
    return Sequence(prompt_ids, sampling, llm_sampling, llm is not None, seed, llm_seed,
                    StopRule.of(sampling, slm.model_config.eos_token_ids), StopRule.of(llm_sampling, llm_eos))


def _prompt_ids(prompt: str | list[int], tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        try:  # ints, and integer numpy / torch scalars; a float or a string is a mistake, not a token id
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError(f"a prompt is a string or a sequence of integer token ids, got {_describe(prompt)}"
                             ) from None
    bad = [t for t in ids if not 0 <= t < vocab_size]  # (a string's too: a checkpoint may have fewer rows than ids)
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    if not ids:
        raise ValueError("empty prompt: give at least one token")
    return ids


def _describe(prompt: object) -> str:
    """A short account of a bad prompt: its type, and its first element's if it has one."""
    try:
        first = next(iter(prompt))  # type: ignore[call-overload]
    except (TypeError, StopIteration):
        return type(prompt).__name__
    return f"{type(prompt).__name__} of {type(first).__name__} (first: {first!r:.40})"
