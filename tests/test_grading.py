"""Boxed-answer extraction and grading (math_verify when installed, normalised exact match otherwise)."""
import pytest

from relaykern.eval import grading
from relaykern.eval.grading import extract_boxed, is_correct, normalize_answer


def test_extract_boxed_takes_the_last_balanced_box():
    assert extract_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{x^{2}+{y}}") == "x^{2}+{y}"
    assert extract_boxed(r"\boxed{7} and a cut \boxed{8") == "7"
    assert extract_boxed("no box") is None
    assert extract_boxed(r"\boxed{}") == ""
    assert extract_boxed("\\boxed {7} then \\boxed\n{8") == "7"  # LaTeX allows space before the brace


def test_normalize_answer():
    assert normalize_answer(r"$ 85 .$") == "85"
    assert normalize_answer(r"\left( 1, 2 \right)") == "(1,2)"
    assert normalize_answer(r"\dfrac{1}{2}") == r"\frac{1}{2}"
    assert normalize_answer(r"\text{yes}") == "yes"


def test_is_correct_exact_and_wrong():
    assert is_correct(r"37 + 48 = 85. The answer is \boxed{85}.", "85")
    assert not is_correct(r"\boxed{86}", "85")
    assert not is_correct("85", "85")  # no box, no credit


@pytest.mark.skipif(grading.math_verify is None, reason="math_verify not installed")
def test_is_correct_symbolic_with_math_verify():
    assert is_correct(r"\boxed{0.5}", r"\frac{1}{2}")
    assert is_correct(r"\boxed{\frac{2}{4}}", "1/2")
    assert not is_correct(r"\boxed{\frac{1}{3}}", r"\frac{1}{2}")


def test_fallback_without_math_verify(monkeypatch):
    monkeypatch.setattr(grading, "math_verify", None)
    assert grading.grader_in_use() == "exact match (math-verify not installed)"
    assert is_correct(r"\boxed{ 85 }", "85")
    assert not is_correct(r"\boxed{0.5}", r"\frac{1}{2}")


def test_symbolic_off_is_normalised_exact_match():
    assert is_correct(r"\boxed{85.}", "85", symbolic=False)
    assert not is_correct(r"\boxed{0.5}", r"\frac{1}{2}", symbolic=False)
