"""RelayLLM's difficulty-aware reward: pure functions over (correct, called, call ratio) per sample.

The reward depends on which of three cases a prompt is in (ρ = the sample's call ratio):

- student-solvable (some sample correct without a call): correct & no call 1.5, correct & call 1 − ρ, wrong 0
- teacher-dependent (only calling samples correct): correct & call 1 − ρ, wrong & no call −1, wrong & call 0
- teacher-unsolvable (no sample correct): call → ρ (exploration bonus), no call 0

The paper decides the case per prompt group (``mode="group"``). The official code
(RL_stage/examples/reward_function/math_help_group.py) decides it once for the whole rollout batch
(``mode="batch"``): a single prompt solved without a call puts every prompt of the batch in the student-solvable
case, so a hard prompt's calling samples get 1 − ρ or 0 instead of the teacher-dependent −1 for not calling, and
an unsolved prompt loses its exploration bonus. With the official 128 prompts a batch that almost always happens,
so "batch" mostly reduces to the student-solvable rule; "group" is what the paper describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from relaykern.protocol import OPEN, find_commands

STUDENT_SOLVABLE, TEACHER_DEPENDENT, TEACHER_UNSOLVABLE = "student_solvable", "teacher_dependent", "teacher_unsolvable"
CALLED_IF = ("call", "tag")
"""What counts as calling the teacher (``command_summary``): a command with N >= 1, or any ``<call>`` text."""
OFFICIAL_MAX_N = 4096
"""The official reward caps each command's N at 4096 before summing."""


@dataclass(frozen=True)
class Sample:
    correct: bool
    called: bool
    call_ratio: float


def call_ratio(sum_n: int, response_len: int) -> float:
    """ρ = min(Σ N / response length, 1): the N the SLM asked for (not what was served), as in the official reward."""
    if response_len <= 0:
        return 0.0
    return min(sum_n / response_len, 1.0)


def command_summary(response: str, max_n: int = OFFICIAL_MAX_N,
                    called_if: Literal["call", "tag"] = "call") -> tuple[bool, int]:
    """``(called, Σ min(N, max_n))`` for a response's text; Σ N sums the complete commands.

    ``called_if="call"``: the response holds a complete command with N >= 1, a call in the protocol's sense (N = 0 is
    no call; a malformed tag ends the request without one). ``"tag"``: ``<call>`` appears at all, as in the official
    reward function; there an empty, N = 0 or malformed tag counts as a call, so a wrong sample escapes the
    teacher-dependent -1 (it gets 0) without asking the teacher for anything. Unlike the official code we do not
    first squeeze whitespace around ``< > /``: the relay only serves the strict grammar (relaykern/protocol.py), so
    ``< call >`` is plain text.
    """
    if called_if not in CALLED_IF:
        raise ValueError(f"called_if must be one of {CALLED_IF}, got {called_if!r}")
    data = response.encode("utf-8")
    commands = find_commands(data).commands
    called = any(c.n > 0 for c in commands) if called_if == "call" else OPEN in data
    return called, sum(min(c.n, max_n) for c in commands)


def case_of(solved_without_call: bool, solved: bool) -> str:
    """The case from two facts about a set of samples: one is correct without a call; one is correct."""
    if solved_without_call:
        return STUDENT_SOLVABLE
    return TEACHER_DEPENDENT if solved else TEACHER_UNSOLVABLE


def group_case(group: Sequence[Sample]) -> str:
    """Which of the three cases a set of samples is in (see the module docstring)."""
    return case_of(any(s.correct and not s.called for s in group), any(s.correct for s in group))


def sample_reward(sample: Sample, case: str) -> float:
    """The reward of one sample given its prompt's (or batch's) case."""
    rho = sample.call_ratio
    if case == STUDENT_SOLVABLE:
        if sample.correct:
            return 1.5 if not sample.called else 1.0 - rho
        return 0.0
    if case == TEACHER_DEPENDENT:
        if sample.correct:
            return 1.0 - rho  # only calling samples can be correct here
        return 0.0 if sample.called else -1.0
    if case == TEACHER_UNSOLVABLE:
        return rho if sample.called else 0.0
    raise ValueError(f"unknown reward case {case!r}; expected one of {STUDENT_SOLVABLE}, {TEACHER_DEPENDENT}, "
                     f"{TEACHER_UNSOLVABLE}")


def difficulty_aware_rewards(group: Sequence[Sample]) -> list[float]:
    """Rewards for the samples of one prompt, the case decided from this group alone (the paper's rule)."""
    case = group_case(group)
    return [sample_reward(s, case) for s in group]


def difficulty_aware_rewards_batch(
    groups: Sequence[Sequence[Sample]], mode: Literal["group", "batch"] = "group"
) -> list[list[float]]:
    """Rewards for every group of a batch. ``"group"``: case per group; ``"batch"``: one case for all (official)."""
    if mode == "group":
        return [difficulty_aware_rewards(g) for g in groups]
    if mode == "batch":
        case = group_case([s for g in groups for s in g])
        return [[sample_reward(s, case) for s in g] for g in groups]
    raise ValueError(f"reward mode must be 'group' or 'batch', got {mode!r}")
