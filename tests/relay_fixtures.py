"""Shared relay test fixtures: two tiny random Qwen3 checkpoints and a scripted SLM.

Import explicitly in a test file (``from relay_fixtures import *``): pytest puts ``tests/`` on ``sys.path`` (no
``__init__.py``, default "prepend" import mode), and fixtures imported into a test module are registered there.
Each importing module gets its own copy of a session fixture, so the checkpoints and models are cached here (on
disk under the session's base temp, in memory per path) to be built once per session all the same.

The SLM is scripted with ``force_tokens``: a logits processor that, at given response positions, leaves only the
wanted token possible. Positions are indices into the response (``len(generated_token_ids)``), which counts the
LLM's tokens too, so a schedule can place a second command after a served call.
"""
from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from relaykern.config import SamplingParams
from relaykern.engine.relay import RelayEngine
from relaykern.scripted import force_tokens
from relaykern.tiny import save_tiny_checkpoint
from relaykern.tokenizer import load_qwen3_tokenizer

__all__ = [
    "tokenizer", "slm_dir", "llm_dir", "slm_model", "llm_model",
    "force_tokens", "text_tokens", "command_tokens", "greedy_tokens", "assert_no_blocks_held",
    "assert_nothing_to_sample_fails_alone", "EOS", "MAX_TOKENS", "scripted", "scenarios", "comparable", "record_calls",
    "random_script", "run_with_random_aborts",
]

# The two models share the vocabulary and differ in width and depth, so a mix-up shows in their tokens.
SLM_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, seed=0)
LLM_SHAPE = dict(hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=256, seed=1)


@pytest.fixture(scope="session")
def tokenizer():
    return load_qwen3_tokenizer()


def tiny_checkpoint(root: Path, name: str, shape: dict) -> Path:
    """``root / name``, the tiny checkpoint of ``shape``, built unless it is there."""
    path = root / name
    if not (path / "config.json").is_file():
        save_tiny_checkpoint(path, **shape)
    return path


@functools.cache
def hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="session")
def slm_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.getbasetemp(), "tiny-slm", SLM_SHAPE)


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.getbasetemp(), "tiny-llm", LLM_SHAPE)


@pytest.fixture(scope="session")
def slm_model(slm_dir):
    return hf_model(slm_dir)


@pytest.fixture(scope="session")
def llm_model(llm_dir):
    return hf_model(llm_dir)


def assert_no_blocks_held(engine) -> None:
    """Every KV block of the engine's models is free again and no sequence is left in a block manager."""
    for runner in (engine.slm, engine.llm):
        if runner is not None:
            assert runner.blocks.num_seqs == 0 and runner.blocks.num_free_blocks == runner.num_blocks


def text_tokens(tokenizer, text: str) -> list[int]:
    """Qwen3 ids of ``text`` (no special tokens added)."""
    return tokenizer.encode(text, add_special_tokens=False)


def command_tokens(tokenizer, n: int | str) -> list[int]:
    """Ids of ``<call>n</call>``: ``<``, ``call``, ``>``, one token per digit, ``</``, ``call``, ``>``."""
    return text_tokens(tokenizer, f"<call>{n}</call>")


def greedy_tokens(model, input_ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens by full forwards, no cache and no ``generate``: an independent check of the relay."""
    ids = list(input_ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(input_ids):]


def assert_nothing_to_sample_fails_alone(engine, prompts: list[list[int]]) -> None:
    """Five requests: two sane ones (greedy; sampled with top-k), and three whose logits at response token 2 have
    nothing to sample (all -inf; NaN, sampled; all +inf). The last three end with an error after two tokens, their
    KV freed; the first two write what they write alone. The processor reads the position only, so it runs in
    overlapped steps, where the bad token was already fed on before the host reads it."""
    def broken(value: float):
        def processor(generated, logits):
            return torch.full_like(logits, value) if len(generated) == 2 else logits
        processor.position_only = True
        return processor

    good = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_k=5, max_tokens=5, ignore_eos=True, seed=1)
    bad = [SamplingParams(temperature=t, max_tokens=5, ignore_eos=True, logits_processors=[broken(v)])
           for t, v in ((0, -math.inf), (0.8, math.nan), (0, math.inf))]
    alone = engine.generate(prompts[:2], [good, sampled])
    outs = engine.generate(prompts, [good, sampled] + bad)
    assert [o.token_ids for o in outs[:2]] == [o.token_ids for o in alone]
    for out in outs[2:]:
        assert out.finish_reason == "error" and "nothing to sample" in out.error and len(out.token_ids) == 2
    assert_no_blocks_held(engine)


EOS = 151645
MAX_TOKENS = 24


def scripted(schedule: dict[int, list[int]], max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    kw.setdefault("temperature", 0)
    return SamplingParams(max_tokens=max_tokens, logits_processors=[force_tokens(schedule)], **kw)


def scenarios(tok) -> dict[str, SamplingParams]:
    call = lambda n: command_tokens(tok, n)  # noqa: E731
    return {
        "call": scripted({3: call(5)}),
        "two_calls": scripted({1: call(3), 14: call(2)}),
        "n_zero": scripted({2: call(0)}),
        "huge_n": scripted({1: call(99999999999)}),
        "malformed": scripted({2: text_tokens(tok, "<call>abc")}),
        "unterminated_at_max_tokens": scripted({MAX_TOKENS - 4: text_tokens(tok, "<call>12")}),
        "straddling": scripted({2: text_tokens(tok, "x.<call>7</call>,")}),
        "glued_zero_then_call": scripted({1: text_tokens(tok, ".<call>0</call>,") + call(4)}),
        "call_at_last_token": scripted({MAX_TOKENS - len(call(3)): call(3)}),
        "stop_string": scripted({5: text_tokens(tok, " STOP")}, stop=["STOP"]),
        "no_call": scripted({}),
    }


def comparable(out):
    s = out.stats
    records = [(r.n_asked, r.n_served, r.slm_catchup) for r in s.call_records]
    return (out.token_ids, out.spans, out.finish_reason, s.slm_tokens, s.llm_tokens, s.calls, s.unserved_calls,
            s.slm_catchup_tokens, records, out.text)


def record_calls(obj, method: str = "execute") -> list[tuple]:
    """The positional arguments of every call of ``obj.<method>`` from now on (a runner's: ``(rows,)`` per
    forward)."""
    calls, original = [], getattr(obj, method)

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(obj, method, recorded)
    return calls


def random_script(rng: random.Random, tok) -> SamplingParams:
    schedule, position = {}, rng.randint(0, 3)
    for _ in range(rng.randint(0, 2)):
        command = command_tokens(tok, rng.randint(0, 6))
        schedule[position] = command
        position += len(command) + 7 + rng.randint(0, 4)
    return scripted(schedule, max_tokens=rng.randint(4, 28))


def run_with_random_aborts(engine: RelayEngine, prompts, samplings, expected, rng: random.Random, rate: float) -> int:
    """Runs the requests, aborting each running or waiting one with probability ``rate`` after every step: the
    others must write ``expected`` (``comparable`` outputs of a run without aborts), the aborted ones a prefix of
    theirs, and no block may stay held. The number aborted."""
    seqs = [engine.add_request(prompt, sampling) for prompt, sampling in zip(prompts, samplings)]
    while engine.scheduler.has_work:
        engine.step()
        for seq in engine.scheduler.sequences():
            if rng.random() < rate:
                engine.abort(seq)
    outs = [comparable(engine.output(seq)) for seq in seqs]
    aborted = [i for i, seq in enumerate(seqs) if seq.finish_reason == "abort"]
    assert all(out == want if i not in aborted else out[0] == want[0][:len(out[0])]
               for i, (out, want) in enumerate(zip(outs, expected)))
    assert_no_blocks_held(engine)
    return len(aborted)
