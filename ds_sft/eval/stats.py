"""How sure an accuracy is: a 95% Wilson interval for one model, an exact paired test for two.

An accuracy of k correct out of n problems estimates a rate p. Its **Wilson score interval** is the
set of rates p that a two-sided score test at level 5% would not reject,
``|k/n - p| <= z * sqrt(p (1 - p) / n)`` with z = 1.96; solving the quadratic gives::

    centre = (k/n + z^2 / 2n) / (1 + z^2/n)
    half   = z / (1 + z^2/n) * sqrt(k/n (1 - k/n) / n + z^2 / 4n^2)

Unlike the textbook ``p ± 1.96 sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not zero-width at
0/n or n/n: 0/10 is "0% to 27.8%", which is why 1/10 against 0/10 says nothing.

Two models on the **same** problems are compared on the problems where they disagree: b = only A
right, c = only B right. If neither model is better, each disagreement goes either way with
probability 1/2, so the exact McNemar test's two-sided p-value is the probability, under
Binomial(b + c, 1/2), of a split at least as uneven as the one seen: ``min(1, 2 P(X <= min(b, c)))``.
Problems both models get right (or wrong) carry no information about which is better.
"""

from __future__ import annotations

import math

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
SIGNIFICANCE = 0.05


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of ``correct / total`` (``(0, 1)`` when ``total`` is 0)."""
    if not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total, got {correct}/{total}")
    if total == 0:
        return 0.0, 1.0
    rate, zz = correct / total, z * z / total
    centre = (rate + zz / 2) / (1 + zz)
    half = z / (1 + zz) * math.sqrt(rate * (1 - rate) / total + zz / (4 * total))
    # exact at the ends: rounding must not put 0/n above 0 or n/n below 1
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == total else centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for ``only_a`` / ``only_b`` discordant pairs (1.0 when none)."""
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def accuracy_summary(correct: int, total: int) -> dict:
    """What every saved accuracy carries: the rate, its sample size and its 95% interval."""
    low, high = wilson_interval(correct, total)
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "ci95": [low, high],
    }


def format_accuracy(summary: dict) -> str:
    """``"10.0% (1/10, 95% CI 1.8-40.4%)"``."""
    low, high = summary["ci95"]
    return f"{summary['accuracy']:.1%} ({summary['correct']}/{summary['total']}, 95% CI {low:.1%}-{high:.1%})"


def paired_comparison(a: list[bool], b: list[bool], labels: tuple[str, str] = ("A", "B")) -> dict:
    """Exact McNemar test of two models' right/wrong answers to the same problems, in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired answers need the same problems, got {len(a)} and {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    p_value = mcnemar_exact(only_a, only_b)
    significant = p_value < SIGNIFICANCE
    verdict = "significant" if significant else "not significant"
    return {
        "labels": list(labels),
        "problems": len(a),
        "both_right": sum(x and y for x, y in zip(a, b, strict=True)),
        "only_a": only_a,
        "only_b": only_b,
        "p_value": p_value,
        "significant": significant,
        "summary": (
            f"{labels[0]} right only: {only_a}, {labels[1]} right only: {only_b} of {len(a)} problems; "
            f"exact McNemar p = {p_value:.3g}: {verdict} at {SIGNIFICANCE:.0%}"
        ),
    }
