"""Training data: JSONL IO, prompts (a synthetic arithmetic task or a file), and the warm-up SFT data builder.

SFT records teach the command syntax on the SLM's own solutions: at chosen token positions we insert the tokens
of ``<call>N</call>`` followed by N tokens the LLM writes there (seeing the prompt and its view of the response so
far, ``protocol.llm_view``, as at inference). ``loss_mask`` is 1 on SLM-written tokens, commands included, and 0 on
LLM-written ones, which are context the SLM learns to read on from, not to imitate. The SLM's original tokens
resume after the LLM's (the official code inserts empty tags into unchanged text; this at least shows the
format of an answered call).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from relaykern import protocol
from relaykern.outputs import Source, append_span
from relaykern.tokenizer import encode_bytes, token_bytes
from relaykern.train.runtime import derive_seed

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
LLMContinue = Callable[[list[int], int], list[int]]
"""``(llm_context_ids, n) -> up to n token ids`` the LLM writes after that context."""
ViewOf = Callable[[list[int], list[tuple[Source, int, int]]], list[int]]
"""``(response_ids, spans) -> the LLM's view of the response`` (``protocol.llm_view`` over the tokenizer's bytes)."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def make_arithmetic_prompts(n: int, seed: int, low: int = 10, high: int = 99, ops: Sequence[str] = ("+",)
                            ) -> list[dict[str, str]]:
    """``n`` problems like ``"What is 37 + 48?"`` with ``answer`` ("85") and a worked ``solution`` ending in
    ``\\boxed{85}``, from operands in [low, high] and operators among ``+ - *``."""
    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    if not ops or any(op not in apply for op in ops):
        raise ValueError(f"arithmetic ops must be a non-empty subset of {sorted(apply)}, got {list(ops)}")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(list(ops))
        answer = str(apply[op](a, b))
        records.append({"prompt": f"What is {a} {op} {b}?", "answer": answer,
                        "solution": f"{a} {op} {b} = {answer}. The answer is \\boxed{{{answer}}}."})
    return records


@dataclass
class PromptSource:
    """Where prompts come from: ``kind="arithmetic"`` (``num_prompts`` generated from ``seed``) or a ``jsonl``
    file of ``{"prompt", "answer"}`` records at ``path`` (the first ``num_prompts`` if > 0)."""

    kind: Literal["arithmetic", "jsonl"] = "arithmetic"
    path: str | None = None
    num_prompts: int = 64
    seed: int = 0
    ops: tuple[str, ...] = ("+",)

    def load(self) -> list[dict[str, Any]]:
        if self.kind == "arithmetic":
            return make_arithmetic_prompts(self.num_prompts, self.seed, ops=self.ops)
        if self.kind == "jsonl":
            if not self.path:
                raise ValueError("prompt source kind 'jsonl' needs a path")
            records = read_jsonl(self.path)
            return records[: self.num_prompts] if self.num_prompts > 0 else records
        raise ValueError(f"prompt source kind must be 'arithmetic' or 'jsonl', got {self.kind!r}")


def reference_answer(record: dict[str, Any], index: int) -> str:
    """A record's ``answer`` as text. A list holding one answer (OlympiadBench's ``final_answer``) is that answer;
    several answers are an error, not one string that no response could match."""
    if "answer" not in record:
        raise ValueError(f"record {index} has no 'answer'")
    answer = record["answer"]
    if isinstance(answer, (list, tuple)):
        if len(answer) != 1:
            raise ValueError(f"record {index}: 'answer' is a list of {len(answer)}; give one answer")
        answer = answer[0]
    return str(answer)


def chat_prompt_ids(tokenizer: Any, problem: str, *, enable_thinking: bool) -> list[int]:
    """The paper's prompt: the chat template around ``problem + "\\n" + PROMPT_SUFFIX`` (a newline between them, as
    the official SFT, RL and eval code write it), with the generation prompt. ``enable_thinking=False`` pre-fills
    Qwen3's empty think block, as the official SFT, data filter and RL rollouts do; its eval leaves thinking on.
    (Templates without the switch ignore it.)"""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{problem}\n{PROMPT_SUFFIX}"}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class CallInsertion:
    """Where SFT commands go. ``"random"``: before each solution token with probability ``call_rate``;
    ``"count"``: as many as drawn uniformly from 0 to ``max_calls``, before tokens drawn uniformly (the official
    SFT data's distribution, whose tags are empty ``<call></call>``); ``"entropy"``: before the tokens whose SLM
    entropy is at least ``entropy_threshold``, highest first. At most ``max_calls`` per response, N uniform in
    ``n_range`` (inclusive)."""

    mode: Literal["random", "count", "entropy"] = "random"
    call_rate: float = 0.02
    n_range: tuple[int, int] = (4, 32)
    max_calls: int = 3
    entropy_threshold: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ("random", "count", "entropy"):
            raise ValueError(f"CallInsertion.mode must be 'random', 'count' or 'entropy', got {self.mode!r}")
        if not 1 <= self.n_range[0] <= self.n_range[1]:
            raise ValueError(f"CallInsertion.n_range must be (lo, hi) with 1 <= lo <= hi, got {self.n_range}")


def choose_call_positions(num_tokens: int, insertion: CallInsertion, rng: random.Random,
                          entropies: Sequence[float] | None = None) -> list[int]:
    """Sorted token indices in ``[0, num_tokens)`` before which a command goes."""
    if insertion.mode == "random":
        positions = [i for i in range(num_tokens) if rng.random() < insertion.call_rate]
        return sorted(rng.sample(positions, min(len(positions), insertion.max_calls)))
    if insertion.mode == "count":
        return sorted(rng.sample(range(num_tokens), min(num_tokens, rng.randint(0, insertion.max_calls))))
    if entropies is None or len(entropies) < num_tokens:
        raise ValueError("CallInsertion mode 'entropy' needs one entropy per solution token")
    candidates = [i for i in range(num_tokens) if entropies[i] >= insertion.entropy_threshold]
    candidates.sort(key=lambda i: -entropies[i])
    return sorted(candidates[: insertion.max_calls])


def command_ids(tokenizer: Any, n: int) -> list[int]:
    """The tokens of ``<call>n</call>`` on its own (its canonical tokenization)."""
    return tokenizer.encode(f"<call>{n}</call>", add_special_tokens=False)


def insert_calls(prompt_ids: list[int], solution_ids: list[int], calls: Sequence[tuple[int, int]],
                 command: Callable[[int], list[int]], llm_continue: LLMContinue, view_of: ViewOf,
                 eos_ids: Sequence[int] = ()) -> dict[str, list[int]]:
    """The SFT record with a command ``(position, n)`` for each call, answered by ``llm_continue``.

    The LLM's context is the prompt plus ``view_of`` the response so far, as at inference. An LLM EOS ends the
    response there (as it ends the request at inference).
    """
    by_position = dict(calls)
    response: list[int] = []
    mask: list[int] = []
    spans: list[tuple[Source, int, int]] = []

    def write(tokens: list[int], source: Source) -> None:
        append_span(spans, source, len(response), len(response) + len(tokens))
        response.extend(tokens)
        mask.extend([1 if source == "slm" else 0] * len(tokens))

    for i, token in enumerate(solution_ids):
        if i in by_position:
            write(command(by_position[i]), "slm")
            written = list(llm_continue(list(prompt_ids) + view_of(response, spans), by_position[i]))
            written = written[: by_position[i]]
            end = next((j + 1 for j, t in enumerate(written) if t in eos_ids), None)
            write(written[:end], "llm")
            if end is not None:
                break
        write([token], "slm")
    return {"prompt_ids": list(prompt_ids), "response_ids": response, "loss_mask": mask}


@torch.no_grad()
def token_entropies(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
    """Entropy (nats) of the model's next-token distribution at each response position."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    log_p = logits.log_softmax(-1)
    return (-(log_p.exp() * log_p).sum(-1)).tolist()


@torch.no_grad()
def hf_generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                top_p: float, eos_ids: Sequence[int], pad_id: int) -> list[list[int]]:
    """Plain ``model.generate`` over a left-padded batch; each output is cut after its first EOS."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # Every sampling knob explicit, so a checkpoint's generation_config.json (Qwen3: top-k 20) cannot leak in.
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         eos_token_id=list(eos_ids), pad_token_id=pad_id, **sampling)
    results = []
    for row in out[:, width:].tolist():
        end = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:end])
    return results


@dataclass
class SFTDataConfig:
    """How ``build_sft_data`` makes records: solutions from the ``"slm"`` (sampled) or the prompt ``"record"``'s
    ``solution`` field; LLM continuations sampled at ``llm_temperature`` (0.7 as in the official eval). Prompts in
    Qwen3's non-thinking mode unless ``enable_thinking`` (the official SFT text holds the empty think block)."""

    prompts: PromptSource = field(default_factory=PromptSource)
    insertion: CallInsertion = field(default_factory=CallInsertion)
    solutions: Literal["slm", "record"] = "slm"
    max_new_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    llm_temperature: float = 0.7
    batch_size: int = 8
    seed: int = 0
    enable_thinking: bool = False


def build_sft_records(records: list[dict[str, Any]], tokenizer: Any, slm: torch.nn.Module | None,
                      llm: torch.nn.Module, config: SFTDataConfig) -> list[dict[str, Any]]:
    """SFT records (``prompt_ids``, ``response_ids``, ``loss_mask``, plus the prompt's ``prompt``/``answer``)."""
    if slm is None and (config.solutions == "slm" or config.insertion.mode == "entropy"):
        raise ValueError("SFTDataConfig: solutions='slm' and insertion mode 'entropy' need an SLM model")
    eos_ids = [tokenizer.eos_token_id]
    prompts = [chat_prompt_ids(tokenizer, r["prompt"], enable_thinking=config.enable_thinking) for r in records]
    if config.solutions == "record":
        solutions = [tokenizer.encode(r["solution"], add_special_tokens=False) + eos_ids for r in records]
    else:
        solutions = []
        for start in range(0, len(prompts), config.batch_size):
            torch.manual_seed(derive_seed(config.seed, start, "slm"))
            solutions += hf_generate(slm, prompts[start : start + config.batch_size], config.max_new_tokens,
                                     config.temperature, config.top_p, eos_ids, tokenizer.pad_token_id)

    def llm_continue(context: list[int], n: int) -> list[int]:
        return hf_generate(llm, [context], n, config.llm_temperature, 1.0, eos_ids, tokenizer.pad_token_id)[0]

    table = token_bytes(tokenizer)

    def view_of(response: list[int], spans: list[tuple[Source, int, int]]) -> list[int]:
        return protocol.llm_view(response, spans, table, lambda raw: encode_bytes(tokenizer, raw))

    out = []
    for index, (record, prompt_ids, solution) in enumerate(zip(records, prompts, solutions)):
        rng = random.Random(derive_seed(config.seed, index, "insert"))
        torch.manual_seed(derive_seed(config.seed, index, "llm"))
        body = len(solution) - (1 if solution and solution[-1] in eos_ids else 0)  # never call after the EOS
        entropies = token_entropies(slm, prompt_ids, solution) if config.insertion.mode == "entropy" else None
        positions = choose_call_positions(body, config.insertion, rng, entropies)
        calls = [(p, rng.randint(*config.insertion.n_range)) for p in positions]
        built = insert_calls(prompt_ids, solution, calls, lambda n: command_ids(tokenizer, n), llm_continue, view_of,
                             eos_ids)
        out.append({"prompt": record["prompt"], "answer": record.get("answer"), **built})
    return out


def build_sft_data(in_jsonl: str | Path | None, out_jsonl: str | Path, slm_dir: str | Path, llm_dir: str | Path,
                   config: SFTDataConfig | None = None, device: str | None = None) -> int:
    """Reads prompts (``in_jsonl``, or ``config.prompts`` when None), writes SFT records; returns their count."""
    from relaykern.config import resolve_device
    from relaykern.tokenizer import load_qwen3_tokenizer
    from relaykern.train.runtime import frozen_dtype, load_causal_lm

    config = config or SFTDataConfig()
    records = read_jsonl(in_jsonl) if in_jsonl is not None else config.prompts.load()
    resolved = resolve_device(device)
    dtype = frozen_dtype("bf16" if resolved.type == "cuda" else "fp32")
    needs_slm = config.solutions == "slm" or config.insertion.mode == "entropy"
    slm = load_causal_lm(slm_dir, resolved, trainable=False, dtype=dtype) if needs_slm else None
    llm = load_causal_lm(llm_dir, resolved, trainable=False, dtype=dtype)
    built = build_sft_records(records, load_qwen3_tokenizer(), slm, llm, config)
    write_jsonl(out_jsonl, built)
    return len(built)
