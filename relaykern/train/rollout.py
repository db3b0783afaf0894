"""Where GRPO's samples come from: any object with ``generate`` and ``sync_weights`` (a ``RolloutBackend``).

``RelayOutput.spans`` must say which tokens the LLM wrote: the trainer masks them out of the loss and the KL.
``logprobs``, when given, are compared with the trainer's own log-probs of the same tokens (the mismatch metric).
``SamplingParams.seed`` seeds the whole batch's random stream (derived from the run's seed and step), not each
request: the G samples of a prompt are repeated prompts and must differ.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Protocol

import torch

from relaykern.config import RelayConfig, SamplingParams
from relaykern.outputs import RelayOutput

if TYPE_CHECKING:
    from relaykern.train.grpo import GRPOTrainer
    from relaykern.train.grpo_config import GRPOConfig


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


def _relay_settings(c: "GRPOConfig") -> tuple[SamplingParams, RelayConfig]:
    llm_sampling = SamplingParams(temperature=c.llm_temperature, top_p=c.llm_top_p, max_tokens=c.max_tokens)
    return llm_sampling, RelayConfig(max_calls=c.max_calls, after_max_calls=c.after_max_calls,
                                     max_call_tokens=c.max_call_tokens,
                                     llm_batch_wait_steps=c.llm_batch_wait_steps,
                                     llm_batch_min_rows=c.llm_batch_min_rows)


def reference_backend(trainer: "GRPOTrainer") -> RolloutBackend:
    """The HF reference relay on the trainer's live policy (and its HF teacher)."""
    llm_sampling, relay = _relay_settings(trainer.config)
    return ReferenceRollout(trainer.lm, trainer.llm, trainer.tokenizer, llm_sampling, relay)


def engine_backend(trainer: "GRPOTrainer") -> RolloutBackend:
    """A relay engine on the trainer's device, its KV budget ``rollout_kv_cache_gb`` (default: 30 % of the free
    GPU memory, shared by the two models)."""
    from relaykern.config import EngineConfig
    from relaykern.engine.relay import RelayEngine

    c, device = trainer.config, trainer.runtime.device
    kv_gb = c.rollout_kv_cache_gb
    if kv_gb is None and device.type == "cuda":
        kv_gb = 0.3 * torch.cuda.mem_get_info(device)[0] / 2**30 / (2 if trainer.llm_path else 1)
    dtype = torch.bfloat16 if c.precision == "bf16" else torch.float32
    config = EngineConfig(device=device, dtype=dtype, kv_cache_memory_gb=kv_gb)
    llm_sampling, relay = _relay_settings(c)
    engine = RelayEngine(trainer.slm_path, trainer.llm_path, relay=relay, slm_config=config, llm_config=config)
    return EngineRollout(engine, llm_sampling)
