"""Answer checking for math: the last ``\\boxed{...}`` of a response against the reference answer.

``math_verify`` (``pip install math-verify``, in the ``train`` and ``eval`` extras) compares the two symbolically
(``1/2`` = ``\\frac12`` = ``0.5``) when it is installed; otherwise, and as a fast first check, the two strings are
compared after light normalisation (``grader_in_use`` says which). The official RL reward grades the last box
with ``mathruler``; the official eval takes the first ``\\boxed`` by a regex that runs to the line's last ``}``
and verifies the raw strings with math-verify, which fails a thinking trace that boxes an early guess or a box
spanning lines, where this is lenient.
"""
from __future__ import annotations

import re

try:
    import math_verify
except ImportError:  # optional dependency: the exact-match fallback still grades integer answers correctly
    math_verify = None

BOXED = "\\boxed"
_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
_SPACES = re.compile(r"\s+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (``\\boxed {...}`` too; nested braces balanced), or None if there is
    no complete one."""
    for opening in reversed(list(_BOXED_OPEN.finditer(text))):  # an unbalanced (truncated) box: try an earlier one
        depth = 1
        for i in range(opening.end(), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[opening.end() : i]
    return None


def grader_in_use() -> str:
    return "math-verify" if math_verify is not None else "exact match (math-verify not installed)"


def normalize_answer(answer: str) -> str:
    """Cheap canonical form: no spaces, ``$``, ``\\left``/``\\right``, ``\\!``, text wrappers or trailing period."""
    answer = _TEXT_WRAPPER.sub(r"\1", answer)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "$"):
        answer = answer.replace(token, "")
    answer = _SPACES.sub("", answer).rstrip(".")
    return answer.replace("dfrac", "frac").replace("tfrac", "frac")


def is_correct(text: str, answer: str, symbolic: bool = True) -> bool:
    """Whether the response's last boxed answer equals ``answer``: symbolically when ``symbolic`` and math_verify
    is installed, else after ``normalize_answer`` only."""
    boxed = extract_boxed(text)
    if boxed is None:
        return False
    if normalize_answer(boxed) == normalize_answer(answer):
        return True
    if not symbolic or math_verify is None:
        return False
    gold = math_verify.parse(f"{BOXED}{{{answer}}}")
    pred = math_verify.parse(f"{BOXED}{{{boxed}}}")
    return bool(gold and pred and math_verify.verify(gold, pred))
