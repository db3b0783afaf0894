"""Scripted relay workloads: random prompts, and an SLM made to call the LLM at chosen response positions.

A random model never writes ``<call>N</call>`` on its own, so a logits processor forces the command's tokens at
given response positions (positions count every response token, the LLM's too). The LLM's N tokens follow the
command; the SLM goes on after them. Greedy sampling and ``ignore_eos`` make every request write exactly its
``max_tokens`` tokens, so any two systems given a workload do the same work.

For an LLM-token ratio r of ``max_tokens`` = T, the LLM writes L = max(1, round(r T)) tokens per request in
``clamp(L // 4, 1, 4)`` calls of near-equal N, one call per equal segment of the response. Within its segment a
call starts at the same offset in every request (``aligned``: each step runs one model over the whole batch, the
case the ideal token-weighted mix describes) or at an offset spread over the batch (``staggered``: some request is
usually in a call, so most steps run both models). ``varied`` requests write between a quarter of ``max_tokens``
and all of it, each call at a random offset in its segment: runs of unequal lengths, as real answers are, where
a system that makes requests wait for each other (the official loop's rounds) pays for it.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from typing import TYPE_CHECKING

from relaykern.config import SamplingParams
from relaykern.scripted import force_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from relaykern.bench.presets import Preset

MAX_CALLS_PER_REQUEST = 4
"""Below RelayConfig's default max_calls (5), so every scripted call is served."""
LOWEST_PROMPT_TOKEN = 1000


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    samplings: list[SamplingParams]
    schedules: list[dict[int, int]]
    """Each request's forced tokens by response position (what its logits processor writes)."""
    calls: list[list[int]]
    """Each request's scripted calls (their N)."""

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def max_tokens(self) -> int:
        return max(s.max_tokens for s in self.samplings)

    @property
    def target_ratio(self) -> float:
        return sum(map(sum, self.calls)) / sum(s.max_tokens for s in self.samplings)

    def prompts_only(self) -> "Workload":
        """The same prompts, each request writing one token: the workload's prompt prefill."""
        return Workload(self.name, self.prompts, [SamplingParams(temperature=0, max_tokens=1) for _ in self.prompts],
                        [{} for _ in self.prompts], [[] for _ in self.prompts])

    def head(self, count: int) -> "Workload":
        """The first ``count`` requests (same scripts)."""
        return Workload(self.name, self.prompts[:count], self.samplings[:count], self.schedules[:count],
                        self.calls[:count])


def call_lengths(max_tokens: int, ratio: float) -> list[int]:
    """The N of each call of a request writing ``ratio`` of its ``max_tokens`` with the LLM (empty for 0)."""
    if ratio <= 0:
        return []
    llm_tokens = max(1, round(ratio * max_tokens))
    calls = min(max(llm_tokens // 4, 1), MAX_CALLS_PER_REQUEST)
    return [llm_tokens // calls + (i < llm_tokens % calls) for i in range(calls)]


def command_ids(tokenizer: PreTrainedTokenizerBase, n: int) -> list[int]:
    """The forced command, ``.<call>N</call>``: as many tokens as ``<call>N</call>`` (``.<`` is one), and the text
    before it, whatever the random SLM wrote, never touches the command's cut, so the LLM's view keeps that text's
    ids as they are (encoded again, a token ending in whitespace may become an id past the tiny preset's 16,384
    embedding rows, which fails its request)."""
    return tokenizer.encode(f".<call>{n}</call>", add_special_tokens=False)


def command_schedule(tokenizer: PreTrainedTokenizerBase, max_tokens: int, ratio: float, shift: float
                     ) -> dict[int, int]:
    """Response position → forced token. ``shift`` in [0, 1] places each call within the room its segment leaves."""
    lengths = call_lengths(max_tokens, ratio)
    forced: dict[int, int] = {}
    segment = max_tokens // max(len(lengths), 1)
    for index, n in enumerate(lengths):
        command = command_ids(tokenizer, n)
        room = segment - len(command) - n - 1  # one SLM token at least after the LLM's turn, before the next segment
        if room < 0:
            raise ValueError(f"max_tokens {max_tokens} is too short for {len(lengths)} calls at ratio {ratio}: "
                             "raise max_tokens or lower the ratio")
        start = index * segment + round(shift * room)
        forced.update({start + offset: token for offset, token in enumerate(command)})
    return forced


def make_workload(tokenizer: PreTrainedTokenizerBase, *, name: str, batch: int, prompt_length: int, max_tokens: int,
                  ratio: float, vocab_size: int, staggered: bool = False, varied: bool = False, seed: int = 0
                  ) -> Workload:
    """``batch`` requests of random ``prompt_length``-token prompts scripted to hit ``ratio`` (0: SLM only; the
    processor is still attached, so its per-row cost is the same as in the relayed runs)."""
    rng = random.Random(seed)
    top = min(vocab_size, 150000)
    prompts = [[rng.randrange(LOWEST_PROMPT_TOKEN, top) for _ in range(prompt_length)] for _ in range(batch)]
    samplings, schedules, lengths, shared = [], [], [], None
    for index in range(batch):
        if varied or staggered or shared is None:
            length = max_tokens - rng.randrange(max_tokens * 3 // 4 + 1) if varied else max_tokens
            shift = rng.random() if varied else index / max(batch - 1, 1) if staggered else 0.5
            forced = command_schedule(tokenizer, length, ratio, shift)
            shared = SamplingParams(temperature=0, max_tokens=length, ignore_eos=True,
                                    logits_processors=[force_tokens({p: [t] for p, t in forced.items()})])
        samplings.append(shared)
        schedules.append(forced)
        lengths.append(call_lengths(shared.max_tokens, ratio))
    return Workload(name, prompts, samplings, schedules, lengths)


def preset_workload(tokenizer: PreTrainedTokenizerBase, preset: Preset, vocab_size: int, name: str, ratio: float, *,
                    long_prompts: bool = False, staggered: bool = False, varied: bool = False) -> Workload:
    """A workload of the bench preset's batch and ``max_tokens``: its short prompts (throughput runs) or its long
    ones (baselines). The prompts are drawn from the name, so that one engine running several workloads gets no
    prefix-cache hits from one to the next, and the same name gives the same prompts to every system compared."""
    prompt_length = preset.long_prompt_length if long_prompts else preset.prompt_length
    return make_workload(tokenizer, name=name, batch=preset.relay_batch, prompt_length=prompt_length,
                         max_tokens=preset.max_tokens, ratio=ratio, vocab_size=vocab_size, staggered=staggered,
                         varied=varied,
                         seed=zlib.crc32(name.encode()))
