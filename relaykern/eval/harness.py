"""``relaykern eval``: accuracy and call ratio of a relay on a maths set, as the paper reports them.

Input: JSONL records with the problem under ``problem`` (or ``question``/``prompt``) and the reference answer under
``answer``. Each problem gets the paper's prompt (Qwen3 chat template, problem + the \\boxed{} instruction); the
relay answers it; correctness is math-verify on the last \\boxed{} (exact match when math-verify is missing).
The call ratio is token-weighted over the set (LLM-written tokens / all response tokens), as in the paper.
Optional ``--samples k`` draws k answers per problem (avg@k, the paper's AIME metric).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from relaykern.config import EngineConfig, RelayConfig, SamplingParams
from relaykern.eval.grading import is_correct
from relaykern.outputs import RelayOutput
from relaykern.train.data import chat_prompt_ids, read_jsonl

PROBLEM_KEYS = ("problem", "question", "prompt")


@dataclass
class EvalSummary:
    problems: int
    samples: int
    accuracy: float
    call_ratio: float
    calls_per_response: float
    mean_response_tokens: float
    finish_reasons: dict[str, int]


def problem_of(record: dict, index: int) -> str:
    for key in PROBLEM_KEYS:
        if key in record:
            return str(record[key])
    raise ValueError(f"record {index} has none of the keys {PROBLEM_KEYS}")


def summarize(outputs: list[RelayOutput], correct: list[bool], problems: int) -> EvalSummary:
    llm = sum(o.stats.llm_tokens for o in outputs)
    total = sum(o.stats.llm_tokens + o.stats.slm_tokens for o in outputs)
    reasons: dict[str, int] = {}
    for o in outputs:
        reasons[o.finish_reason] = reasons.get(o.finish_reason, 0) + 1
    n = max(len(outputs), 1)
    return EvalSummary(
        problems=problems, samples=len(outputs), accuracy=sum(correct) / n, call_ratio=llm / total if total else 0.0,
        calls_per_response=sum(o.stats.calls for o in outputs) / n, mean_response_tokens=total / n,
        finish_reasons=reasons)


def evaluate(data: str | Path, slm: str | Path, llm: str | Path | None, *, sampling: SamplingParams,
             llm_sampling: SamplingParams | None = None, relay: RelayConfig | None = None, samples: int = 1,
             engine_config: EngineConfig | None = None, llm_engine_config: EngineConfig | None = None,
             out: str | Path | None = None) -> EvalSummary:
    """Accuracy and call ratio of the relay on the JSONL set ``data`` (module docstring); ``engine_config`` serves
    the SLM, and the LLM unless ``llm_engine_config`` is given."""
    from relaykern.engine.relay import RelayEngine

    records = read_jsonl(data)
    for i, record in enumerate(records):
        problem_of(record, i)
        if "answer" not in record:
            raise ValueError(f"record {i} of {data} has no 'answer'")
    engine = RelayEngine(slm, llm, relay=relay, slm_config=engine_config, llm_config=llm_engine_config or engine_config)
    prompts = [chat_prompt_ids(engine.tokenizer, problem_of(r, i)) for i, r in enumerate(records)]
    expanded = [p for p in prompts for _ in range(samples)]
    # a seed of its own for every (problem, sample): the sampling noise is a function of the seed and position only
    samplings = [dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + i * samples + k)
                 for i in range(len(prompts)) for k in range(samples)]
    outputs = engine.generate(expanded, samplings, llm_sampling)
    answers = [str(r["answer"]) for r in records for _ in range(samples)]
    correct = [is_correct(o.text, a) for o, a in zip(outputs, answers)]
    summary = summarize(outputs, correct, len(records))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.with_suffix(".jsonl").open("w") as f:
            for o, a, ok in zip(outputs, answers, correct):
                f.write(json.dumps({"text": o.text, "answer": a, "correct": ok, "spans": o.spans,
                                    "finish_reason": o.finish_reason, "calls": o.stats.calls,
                                    "llm_tokens": o.stats.llm_tokens, "slm_tokens": o.stats.slm_tokens}) + "\n")
        out.with_suffix(".json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relaykern eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="JSONL with problem/question and answer fields")
    parser.add_argument("--slm", required=True)
    parser.add_argument("--llm")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--llm-temperature", type=float, default=0.7)
    parser.add_argument("--max-calls", type=int, default=5)
    parser.add_argument("--after-max-calls", choices=("continue", "finish"), default="continue",
                        help="what a command past --max-calls does: stays text, or ends the request (the official "
                             "eval's 5 SLM turns are --max-calls 4 --after-max-calls finish)")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="writes OUT.json (summary) and OUT.jsonl (every response)")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if there is one)")
    parser.add_argument("--llm-device", help="the LLM's device (default: --device)")
    args = parser.parse_args(argv)
    summary = evaluate(
        args.data, args.slm, args.llm,
        sampling=SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed),
        llm_sampling=SamplingParams(temperature=args.llm_temperature, max_tokens=args.max_tokens),
        relay=RelayConfig(max_calls=args.max_calls, after_max_calls=args.after_max_calls), samples=args.samples,
        out=args.out,
        engine_config=EngineConfig(device=args.device),
        llm_engine_config=EngineConfig(device=args.llm_device or args.device))
    print(json.dumps(asdict(summary), indent=2))
    return 0
