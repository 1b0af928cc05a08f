"""The learning-rate schedule, against values worked out by hand from its definition."""

from __future__ import annotations

import math

import pytest

from ds_sft.train.schedule import lr_at


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 7e-5 / 10),  # warmup starts at peak / warmup_iters
        (4, 7e-5 * 5 / 10),
        (9, 7e-5),  # the last warmup step reaches the peak
        (10, 7e-5),  # cosine starts at the peak
        (10 + 89 // 2, 1e-5 + 0.5 * (1 + math.cos(math.pi * (89 // 2) / 89)) * 6e-5),
        (99, 1e-5),  # the last step lands on min_lr
    ],
)
def test_lr_schedule_seed_recipe(step, expected):
    assert lr_at(step, peak=7e-5, min_lr=1e-5, warmup_iters=10, max_iters=100) == pytest.approx(
        expected, rel=1e-12
    )


def test_lr_schedule_is_monotone_after_warmup_and_handles_no_warmup():
    lrs = [lr_at(s, 1e-3, 1e-4, 0, 20) for s in range(20)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
