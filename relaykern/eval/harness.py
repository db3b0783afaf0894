"""``relaykern eval``: accuracy and call ratio of a relay on a maths set, the paper's two metrics.

Input: JSONL records with the problem under ``problem`` (or ``question``/``prompt``) and the reference answer under
``answer`` (a list of one answer is that answer). Each problem gets the paper's prompt (Qwen3 chat template in
thinking mode, as the official eval, problem + the \\boxed{} instruction); the relay answers it; correctness is
math-verify on the last \\boxed{} (exact match when math-verify is missing: the summary's ``grader`` says so).
The call ratio is token-weighted over the set (LLM-written tokens / all response tokens), as in the paper.
Optional ``--samples k`` draws k answers per problem (avg@k, the paper's AIME metric: 32 samples).

Where the official eval (eval/generate_withhelp.py) differs: it counts SLM turns, not calls (5 turns serve at most
4 calls, and the command ending the 5th turn ends the request: ``--max-calls 4 --after-max-calls finish``, which
still does not count ``<call>0</call>`` as a turn); a malformed command (``<call>12 tokens</call>``, ``<call>abc``)
ends the request here, while there the SLM writes on to ``</call>`` or EOS, ``<call>\\s*(\\d+)`` serves what it
finds and the whole text is graded; it grades the first box (see eval/grading.py); and its scripts then re-grade
every wrong answer with an LLM judge (gpt-4o-mini, eval/results_recheck.py), which this does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from relaykern.cli import plain
from relaykern.config import EngineConfig, RelayConfig, SamplingParams
from relaykern.eval import grading
from relaykern.eval.grading import extract_boxed, grader_in_use, is_correct
from relaykern.outputs import RelayOutput
from relaykern.train.data import chat_prompt_ids, read_jsonl, reference_answer

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
    grader: str


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
        finish_reasons=reasons, grader=grader_in_use())


def evaluate(data: str | Path, slm: str | Path, llm: str | Path | None, *, sampling: SamplingParams,
             llm_sampling: SamplingParams | None = None, relay: RelayConfig | None = None, samples: int = 1,
             engine_config: EngineConfig | None = None, llm_engine_config: EngineConfig | None = None,
             out: str | Path | None = None, enable_thinking: bool = True) -> EvalSummary:
    """Accuracy and call ratio of the relay on the JSONL set ``data`` (module docstring); ``engine_config`` serves
    the SLM, and the LLM unless ``llm_engine_config`` is given. ``relay`` defaults to RelayConfig's with N capped
    by the tokens left only, as in the official eval. ``enable_thinking``: Qwen3's thinking mode, on as in the
    official eval (training prompts have it off)."""
    from relaykern.engine.relay import RelayEngine

    records = read_jsonl(data)
    problems = [problem_of(r, i) for i, r in enumerate(records)]
    answers = [reference_answer(r, i) for i, r in enumerate(records) for _ in range(samples)]
    if grading.math_verify is None:
        warnings.warn("math-verify is not installed (pip install 'relaykern[eval]'): grading falls back to exact "
                      "match of the boxed answer, which fails equal answers written differently", stacklevel=2)
    relay = relay or RelayConfig(max_call_tokens=sampling.max_tokens)
    engine = RelayEngine(slm, llm, relay=relay, slm_config=engine_config, llm_config=llm_engine_config or engine_config)
    prompts = [chat_prompt_ids(engine.tokenizer, problem, enable_thinking=enable_thinking) for problem in problems]
    expanded = [p for p in prompts for _ in range(samples)]
    # a seed of its own for every (problem, sample): the sampling noise is a function of the seed and position only
    samplings = [dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + i * samples + k)
                 for i in range(len(prompts)) for k in range(samples)]
    outputs = engine.generate(expanded, samplings, llm_sampling)
    correct = [is_correct(o.text, a) for o, a in zip(outputs, answers)]
    summary = summarize(outputs, correct, len(records))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.with_suffix(".jsonl").open("w") as f:
            for o, a, ok in zip(outputs, answers, correct):
                f.write(json.dumps({"text": o.text, "answer": a, "boxed": extract_boxed(o.text), "correct": ok,
                                    "spans": o.spans, "finish_reason": o.finish_reason, "calls": o.stats.calls,
                                    "llm_tokens": o.stats.llm_tokens, "slm_tokens": o.stats.slm_tokens}) + "\n")
        out.with_suffix(".json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relaykern eval", description=plain(__doc__),
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
    parser.add_argument("--max-call-tokens", type=int,
                        help="cap on N besides the tokens left (default: --max-tokens; the official eval has none)")
    parser.add_argument("--no-thinking", action="store_true",
                        help="prompts in Qwen3's non-thinking mode (the official eval thinks; training does not)")
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
        relay=RelayConfig(max_calls=args.max_calls, after_max_calls=args.after_max_calls,
                          max_call_tokens=args.max_tokens if args.max_call_tokens is None else args.max_call_tokens),
        samples=args.samples, out=args.out, enable_thinking=not args.no_thinking,
        engine_config=EngineConfig(device=args.device),
        llm_engine_config=EngineConfig(device=args.llm_device or args.device))
    print(json.dumps(asdict(summary), indent=2))
    return 0
