"""The systems relaykern is compared with, each run on the very workload our engine ran (same prompts, same scripted
commands, greedy, every request writing ``max_tokens``):

- the official-style engine mode (``llm_cache="reprefill"``): the LLM re-reads its whole context on every call (the
  official code's LLM server without its prefix cache);
- the official evaluation loop's rounds over our engine, one model per engine, prefix caching on as in vLLM's V1
  engine (``official_loop.py``);
- the reference relay over ``transformers`` (``relaykern.reference``), one request at a time as the official
  evaluation loop runs: only its first requests are run, since one at a time its tokens/s does not depend on how
  many there are;
- HF ``generate`` of the SLM alone, batched, against our engine's SLM-only run.

Each is loaded only while it runs, after the previous system's memory is released.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import torch

from relaykern.config import RelayConfig, SamplingParams
from relaykern.engine.relay import RelayEngine
from relaykern.outputs import RelayOutput
from relaykern.reference import load_reference_models, reference_generate
from relaykern.reference_hooks import generation_config
from relaykern.bench.official_loop import official_loop
from relaykern.bench.presets import Preset
from relaykern.bench.relay_bench import run_workload
from relaykern.bench.timing import timed
from relaykern.bench.workloads import Workload


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def official_style(build_engine: Callable[[str], RelayEngine], workload: Workload) -> dict:
    """``build_engine(llm_cache)`` makes a RelayEngine like the one measured, in the given LLM cache mode. No
    warm-up run: the kernels were compiled by our engine's runs in this process, and CUDA graphs are captured at
    start-up."""
    engine = build_engine("reprefill")
    try:
        figures, _ = run_workload(engine, workload)
        return figures
    finally:
        del engine
        release_memory()


def official_rounds(build_engines: Callable[[], tuple[RelayEngine, RelayEngine]], runs: list[tuple[Workload, list]],
                    relay: RelayConfig) -> list[dict]:
    """The official loop's rounds on each ``(workload, our relay's outputs for it)``, the SLM and the LLM each in an
    engine of its own (``build_engines``), counting the outputs identical to ours."""
    slm, llm = build_engines()
    try:
        results = []
        for workload, ours in runs:
            hits, slm_steps, llm_steps = llm.slm.prefix_hit_tokens, slm.steps, llm.steps
            (outputs, rounds), seconds = timed(lambda: official_loop(
                slm, llm, workload.prompts, workload.samplings, workload.schedules, relay), slm.slm.device)
            tokens = sum(len(o.token_ids) for o in outputs)
            submitted = sum(o.stats.llm_prefill_tokens for o in outputs)
            results.append({
                "name": f"official loop (rounds), our engine, prefix caching: {workload.name}",
                "rounds": rounds,
                "slm_steps": slm.steps - slm_steps,
                "llm_steps": llm.steps - llm_steps,
                "tokens": tokens,
                "llm_tokens": sum(o.stats.llm_tokens for o in outputs),
                "llm_prompt_tokens": submitted,
                "llm_prefill_tokens": submitted - (llm.slm.prefix_hit_tokens - hits),
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "identical_to_ours": sum(a.token_ids == b.token_ids for a, b in zip(outputs, ours)),
            })
        return results
    finally:
        del slm, llm
        release_memory()


def hf_baselines(slm: Path, llm: Path, preset: Preset, relay_workload: Workload, ours: list[RelayOutput],
                 slm_only_workload: Workload, alone_prompt: list[int]) -> dict:
    """The reference relay on the first requests of ``relay_workload`` (``ours``: our outputs for it, to count
    identical ones), HF ``generate`` of the SLM on the whole ``slm_only_workload``, and on ``alone_prompt`` alone
    for ``preset.alone_tokens`` tokens."""
    device = torch.device(preset.device)
    slm_model, llm_model, tokenizer = load_reference_models(slm, llm, device, getattr(torch, preset.dtype))
    try:
        requests = relay_workload.head(preset.reference_requests)
        warmup = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        reference_generate(requests.prompts[:1], slm_model, llm_model, tokenizer, warmup)
        outputs, seconds = timed(lambda: [
            reference_generate([prompt], slm_model, llm_model, tokenizer, sampling)[0]
            for prompt, sampling in zip(requests.prompts, requests.samplings)], device)
        tokens = sum(len(o.token_ids) for o in outputs)
        reference = {
            "name": "reference relay (HF, one request at a time)",
            "requests": requests.batch,
            "tokens": tokens,
            "llm_tokens": sum(o.stats.llm_tokens for o in outputs),
            "llm_prefill_tokens": sum(o.stats.llm_prefill_tokens for o in outputs),
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "identical_to_ours": sum(a.token_ids == b.token_ids for a, b in zip(outputs, ours)),
        }
        generate = _hf_generate(slm_model, slm_only_workload.prompts, slm_only_workload.max_tokens, device)
        alone = _hf_generate(slm_model, [alone_prompt], preset.alone_tokens, device)
        alone["ms_per_token"] = alone["seconds"] / alone["tokens"] * 1e3
    finally:
        del slm_model, llm_model
        release_memory()
    return {"reference_relay": reference, "hf_generate_slm_only": generate, "hf_generate_alone": alone}


def _hf_generate(model, prompts: list[list[int]], max_tokens: int, device: torch.device) -> dict:
    """Batched greedy HF ``generate`` of exactly ``max_tokens`` tokens per prompt (equal-length prompts: no pad)."""
    input_ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(input_ids)

    def generate(new_tokens: int):
        # The reference's config: every sampling field explicit, no EOS, so each row writes new_tokens tokens.
        config = generation_config(SamplingParams(temperature=0, max_tokens=new_tokens),
                                    input_ids.shape[1] + new_tokens, output_scores=False)
        with torch.inference_mode():
            return model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)

    generate(4)  # warm-up
    out, seconds = timed(lambda: generate(max_tokens), device)
    tokens = out.sequences[:, input_ids.shape[1]:].numel()
    return {"name": "HF generate, SLM only", "batch": len(prompts), "max_tokens": max_tokens,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
