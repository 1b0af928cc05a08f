"""Intervals and the paired test against independent formulations: the Wilson interval against a
bisection of the score test it inverts, the exact McNemar p-value against a direct sum over every
outcome of Binomial(n, 1/2) at most as likely as the one seen."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.eval.stats import (
    Z_95,
    accuracy_summary,
    format_accuracy,
    mcnemar_exact,
    paired_comparison,
    wilson_interval,
)


def _score_test_accepts(correct: int, total: int, p: float) -> bool:
    """The two-sided score test of rate ``p`` at 5%: |k/n - p| <= z sqrt(p(1-p)/n)."""
    return abs(correct / total - p) <= Z_95 * math.sqrt(p * (1 - p) / total)


def _boundary(correct, total, inside, outside):
    """Bisect between an accepted rate and a rejected one."""
    for _ in range(80):
        middle = (inside + outside) / 2
        inside, outside = (
            (middle, outside) if _score_test_accepts(correct, total, middle) else (inside, middle)
        )
    return (inside + outside) / 2


@given(total=st.integers(1, 400), data=st.data())
def test_wilson_is_the_inverted_score_test(total, data):
    correct = data.draw(st.integers(0, total))
    low, high = wilson_interval(correct, total)
    rate = correct / total
    assert 0.0 <= low <= rate <= high <= 1.0
    # the rate itself is always accepted (or sits at 0 / 1, where the interval starts / ends)
    inside = min(max(rate, 1e-12), 1 - 1e-12)
    expected_low = 0.0 if correct == 0 else _boundary(correct, total, inside, 0.0)
    expected_high = 1.0 if correct == total else _boundary(correct, total, inside, 1.0)
    assert low == pytest.approx(expected_low, abs=1e-9)
    assert high == pytest.approx(expected_high, abs=1e-9)


def _mcnemar_by_definition(only_a: int, only_b: int) -> float:
    """P(outcomes no more likely than the one seen) under Binomial(b + c, 1/2), summed outright."""
    n = only_a + only_b
    probability = [math.comb(n, i) * 0.5**n for i in range(n + 1)]
    seen = probability[only_a]
    return min(1.0, sum(p for p in probability if p <= seen * (1 + 1e-12)))


@given(only_a=st.integers(0, 120), only_b=st.integers(0, 120))
def test_mcnemar_exact_is_the_binomial_sum(only_a, only_b):
    p_value = mcnemar_exact(only_a, only_b)
    assert p_value == pytest.approx(_mcnemar_by_definition(only_a, only_b), rel=1e-9, abs=1e-15)
    assert p_value == mcnemar_exact(only_b, only_a)


def test_one_of_ten_against_none_of_ten_is_not_significant():
    """The demo's case: 1/10 for the base model, 0/10 after fine-tuning."""
    base = [True] + [False] * 9
    tuned = [False] * 10
    result = paired_comparison(base, tuned, ("base", "sft"))
    assert (result["only_a"], result["only_b"], result["p_value"]) == (1, 0, 1.0)
    assert not result["significant"] and "not significant" in result["summary"]
    assert format_accuracy(accuracy_summary(1, 10)) == "10.0% (1/10, 95% CI 1.8%-40.4%)"
    assert format_accuracy(accuracy_summary(0, 10)) == "0.0% (0/10, 95% CI 0.0%-27.8%)"


def test_a_clear_difference_is_significant():
    """Ten disagreements all one way: p = 2 / 2^10 ~ 0.002."""
    result = paired_comparison([True] * 10 + [False] * 5, [False] * 15)
    assert result["p_value"] == pytest.approx(2 / 1024) and result["significant"]
    assert ": significant" in result["summary"]


def test_unpaired_answers_are_refused():
    with pytest.raises(ValueError, match="same problems"):
        paired_comparison([True], [True, False])
