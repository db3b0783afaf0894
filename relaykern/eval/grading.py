"""Answer checking for math: the last ``\\boxed{...}`` of a response against the reference answer.

``math_verify`` (``pip install math-verify``) compares the two symbolically (``1/2`` = ``\\frac12`` = ``0.5``) when
it is installed; otherwise, and as a fast first check, the two strings are compared after light normalisation.
The official RL code uses ``mathruler``'s ``extract_boxed_content`` + ``grade_answer`` the same way.
"""
from __future__ import annotations

import re

try:
    import math_verify
except ImportError:  # optional dependency: the exact-match fallback still grades integer answers correctly
    math_verify = None

BOXED = "\\boxed"
_SPACES = re.compile(r"\s+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces balanced), or None if there is no complete one."""
    start = text.rfind(BOXED + "{")
    while start >= 0:
        depth = 0
        for i in range(start + len(BOXED), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len(BOXED) + 1 : i]
        start = text.rfind(BOXED + "{", 0, start)  # unbalanced (truncated) box: try an earlier one
    return None


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
