"""The paper's data filter: keep the training prompts the teacher solves at least once in k samples.

Prompts no sample of the LLM can solve teach the SLM nothing about when calling pays off (the paper's ablation: no
filter → 3.30 % call ratio instead of 1.07 %). The LLM answers alone here, on relaykern's engine (batched, all k
samples of a prompt sharing its prompt blocks through the prefix cache).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from relaykern.config import EngineConfig, SamplingParams
from relaykern.eval.grading import is_correct
from relaykern.train.data import chat_prompt_ids, read_jsonl, reference_answer, write_jsonl


def solved_counts(problems: list[str], answers: list[str], llm: str | Path, *, k: int, sampling: SamplingParams,
                  enable_thinking: bool = False, engine_config: EngineConfig | None = None) -> list[int]:
    """How many of ``k`` samples of the LLM answer each problem with its answer."""
    from relaykern.engine.relay import RelayEngine

    engine = RelayEngine(llm, slm_config=engine_config)
    prompts = [chat_prompt_ids(engine.tokenizer, problem, enable_thinking=enable_thinking) for problem in problems]
    base = sampling.seed if sampling.seed is not None else 0
    samplings = [dataclasses.replace(sampling, seed=base + i * k + j) for i in range(len(prompts)) for j in range(k)]
    outputs = engine.generate([p for p in prompts for _ in range(k)], samplings)
    return [sum(is_correct(o.text, answer) for o in outputs[i * k:(i + 1) * k]) for i, answer in enumerate(answers)]


def filter_prompts(in_jsonl: str | Path, out_jsonl: str | Path, llm: str | Path, *, k: int = 16,
                   temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 8192, seed: int = 0,
                   enable_thinking: bool = False, engine_config: EngineConfig | None = None) -> tuple[int, int]:
    """Writes the records of ``in_jsonl`` the LLM solves at least once in ``k`` samples; returns (kept, total).
    Defaults are the official filter's (16 samples at temperature 0.7, top-p 0.95, 8192 tokens, Qwen3's
    non-thinking mode, as the RL rollouts that train on the kept prompts). Every record's prompt and answer are
    read before the LLM loads, so a bad record fails at once."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    records = read_jsonl(in_jsonl)
    for i, record in enumerate(records):
        if "prompt" not in record:
            raise ValueError(f"record {i} of {in_jsonl} has no 'prompt'")
    answers = [reference_answer(record, i) for i, record in enumerate(records)]
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    counts = solved_counts([r["prompt"] for r in records], answers, llm, k=k, sampling=sampling,
                           enable_thinking=enable_thinking, engine_config=engine_config)
    kept = [{**r, "teacher_solved": c, "teacher_samples": k} for r, c in zip(records, counts) if c > 0]
    write_jsonl(out_jsonl, kept)
    return len(kept), len(records)
