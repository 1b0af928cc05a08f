"""bench/train_throughput.py --profile_steps: where a step's time goes, from torch.profiler (on CPU
here: ops by their own CPU time; on a GPU the same code ranks kernels by their own device time)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("train_throughput", REPO_ROOT / "bench" / "train_throughput.py")
train_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_throughput)


def test_the_profile_ranks_ops_by_their_own_time_and_counts_calls_per_step():
    """A step of one large matrix product and many small additions: the product leads, each op's
    calls are counted per step, and the shares of the listed ops and the rest add up to the whole."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    small = torch.zeros(8)

    def step(batch: dict) -> None:
        a @ b
        for _ in range(20):
            small.add_(1.0)

    profile = train_throughput.profile_steps(step, [{}], torch.device("cpu"), steps=3)
    assert profile["steps"] == 3 and profile["clock"] == "cpu"
    top = {row["op"]: row for row in profile["top"]}
    assert profile["top"][0]["op"] == "aten::mm"
    assert top["aten::mm"]["calls_per_step"] == 1 and top["aten::add_"]["calls_per_step"] == 20
    listed = sum(row["ms_per_step"] for row in profile["top"])
    assert listed + profile["other_ms_per_step"] == pytest.approx(profile["busy_ms_per_step"])
    assert sum(row["share"] for row in profile["top"]) == pytest.approx(listed / profile["busy_ms_per_step"])
    assert 0 < profile["busy_ms_per_step"] <= profile["wall_ms_per_step"]
    assert len(profile["top"]) <= train_throughput.PROFILE_ROWS
