"""Where GRPO's samples come from: any object with ``generate`` and ``sync_weights`` (a ``RolloutBackend``).

``RelayOutput.spans`` must say which tokens the LLM wrote: the trainer masks them out of the loss and the KL.
``logprobs``, when given, are compared with the trainer's own log-probs of the same tokens (the mismatch metric).
``SamplingParams.seed`` seeds the whole batch's random stream (derived from the run's seed and step), not each
request: the G samples of a prompt are repeated prompts and must differ.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Protocol

import torch

from relaykern.config import RelayConfig, SamplingParams
from relaykern.outputs import RelayOutput


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[RelayOutput]:
        """One relay response per prompt (prompt token ids), in order."""
        ...

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes the policy's current weights, HF parameter names (``model.layers.0.self_attn.q_proj.weight``)."""
        ...


class ReferenceRollout:
    """Rollouts with ``relaykern.reference.reference_generate`` on the live HF policy (shared module: no sync)."""

    def __init__(self, policy: torch.nn.Module, llm: torch.nn.Module | None, tokenizer,
                 llm_sampling: SamplingParams | None = None, relay: RelayConfig | None = None):
        self.policy, self.llm, self.tokenizer = policy, llm, tokenizer
        self.llm_sampling, self.relay = llm_sampling, relay

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[RelayOutput]:
        from relaykern.reference import reference_generate

        if sampling.seed is not None:  # the reference re-seeds per request from sampling.seed: seed once instead
            torch.manual_seed(sampling.seed)
            sampling = dataclasses.replace(sampling, seed=None)
        was_training = self.policy.training
        self.policy.eval()
        try:
            return reference_generate(prompts, self.policy, self.llm, self.tokenizer, sampling, self.llm_sampling,
                                      self.relay)
        finally:
            self.policy.train(was_training)

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: generation runs on the very module the optimizer updates."""


def slm_mask(output: RelayOutput) -> list[float]:
    """1.0 on tokens the SLM wrote (the policy's actions), 0.0 on the LLM's (context, out of the loss and KL)."""
    mask = [0.0] * len(output.token_ids)
    for source, start, end in output.spans:
        if source == "slm":
            mask[start:end] = [1.0] * (end - start)
    return mask


class EngineRollout:
    """Rollouts from relaykern's relay engine (paged KV for both models, batched), the policy's weights pushed into
    it in process after each update (``sync_weights``: HF names, no disk round-trip).

    The engine seeds each request from its own ``SamplingParams.seed``, so the G samples of a prompt get distinct
    seeds derived from the step's seed and their index (one shared seed would make them identical).
    """

    def __init__(self, engine, llm_sampling: SamplingParams | None = None):
        self.engine, self.llm_sampling = engine, llm_sampling

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[RelayOutput]:
        base = sampling.seed if sampling.seed is not None else 0
        samplings = [dataclasses.replace(sampling, seed=(base * 1_000_003 + i) % 2**62) for i in range(len(prompts))]
        return self.engine.generate(prompts, samplings, self.llm_sampling)

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.load_slm_weights((name, tensor.detach()) for name, tensor in named_tensors)
