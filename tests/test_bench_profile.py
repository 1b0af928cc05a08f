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


@pytest.fixture(scope="module")
def tiny_batch():
    import random

    from ds_sft.model.config import ModelConfig

    config = ModelConfig.preset("tiny", max_seq_len=128)
    docs = train_throughput.synthetic_documents(16, config.vocab_size, 64, random.Random(0))
    return config, train_throughput.batches_of(train_throughput.pack_rows(docs, 64), 2)[0]


def test_each_phase_is_timed_per_micro_batch_and_the_update_once_per_update(tiny_batch):
    """step_phases on an engine that accumulates 3 micro-batches: the four micro-batch phases run 3
    times per update and the update once (the engine counts 3 updates: the unmeasured one and 2),
    and no phase is queued later than it is done."""
    config, batch = tiny_batch
    step = train_throughput.deepspeed_step(config, 2, accumulation=3)
    try:
        phases = train_throughput.step_phases(step, batch, torch.device("cpu"), steps=2)
        assert (step.engine.global_steps, step.engine.micro_steps) == (3, 9)
    finally:
        step.engine.destroy()
    assert list(phases) == ["inputs", "attention mask", "forward", "backward", "update"]
    assert [row["per_update"] for row in phases.values()] == [3, 3, 3, 3, 1]
    for row in phases.values():
        assert 0 <= row["host_ms"] <= row["done_ms"]


@pytest.mark.parametrize("overflow_check", [True, False])
def test_the_step_updates_once_per_accumulation_and_passes_the_overflow_check_on(tiny_batch, overflow_check):
    """deepspeed_step's accumulation is DeepSpeed's (one update per that many micro-batches of the given
    batch) and overflow_check is the bf16 check_grad_overflow the engine's ZeRO optimizer runs."""
    config, batch = tiny_batch
    step = train_throughput.deepspeed_step(config, 2, accumulation=2, overflow_check=overflow_check)
    try:
        assert step.engine.optimizer.check_grad_overflow is overflow_check
        step(batch)
        assert (step.engine.global_steps, step.engine.micro_steps) == (1, 2)
    finally:
        step.engine.destroy()
