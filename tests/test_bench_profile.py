"""bench/train_throughput.py --profile_steps: where a step's time goes, from torch.profiler (on CPU
here: ops by their own CPU time; on a GPU the same code ranks kernels by their own device time)."""

from __future__ import annotations

import importlib.util
import json

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


@pytest.fixture
def reductions(monkeypatch) -> list:
    """The parameters ZeRO 1/2 hands to its gradient reducer, one entry per hand-over."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    handed, reduce = [], DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads

    def counted(self, param, i):
        handed.append(param)
        return reduce(self, param, i)

    monkeypatch.setattr(DeepSpeedZeroOptimizer, "reduce_independent_p_g_buckets_and_remove_grads", counted)
    return handed


def test_each_phase_is_timed_per_micro_batch_and_the_update_once_per_update(tiny_batch, reductions):
    """step_phases on an engine that accumulates 3 micro-batches: the four micro-batch phases run 3
    times per update and the update once (the engine counts 3 updates: the unmeasured one and 2),
    and no phase is queued later than it is done. It steps as train_step does: ZeRO 2 reduces each
    gradient once per update."""
    config, batch = tiny_batch
    step = train_throughput.deepspeed_step(config, 2, accumulation=3)
    try:
        phases = train_throughput.step_phases(step, batch, torch.device("cpu"), steps=2)
        assert (step.engine.global_steps, step.engine.micro_steps) == (3, 9)
        assert len(reductions) == 3 * len(list(step.engine.module.parameters()))
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


def test_the_reference_step_reduces_in_every_micro_batch_and_trains_the_same(tiny_batch, reductions):
    """deepspeed_step(reduce_every_micro_batch=True) is DeepSpeed's own ZeRO-2 accumulation, the
    side-by-side reference of part (c): each gradient reduced in every micro-batch instead of once
    per update, to the same loss, and ds-sft's rule in force again after each of its steps."""
    from ds_sft.train import step as ds_sft_step

    config, batch = tiny_batch
    rule = ds_sft_step.reduces_gradients_once_per_update
    losses, calls = {}, {}
    for reference in (False, True):
        torch.manual_seed(0)
        step = train_throughput.deepspeed_step(config, 2, accumulation=3, reduce_every_micro_batch=reference)
        try:
            reductions.clear()
            losses[reference] = [step(batch) for _ in range(2)]
            calls[reference] = len(reductions) / 2 / len(list(step.engine.module.parameters()))
        finally:
            step.engine.destroy()
        assert ds_sft_step.reduces_gradients_once_per_update is rule
    assert calls == {False: 1, True: 3}
    assert losses[False] == losses[True]


def test_part_c_reports_the_step_against_the_reduction_in_every_micro_batch(tmp_path):
    out = tmp_path / "c.json"
    args = train_throughput.build_parser().parse_args(
        ["--quick", "--parts", "c", "--grad_accum", "2", "--out", str(out)]
    )
    assert train_throughput.run(args) == 0
    c = json.loads(out.read_text())["c"]
    assert c["grad_accum"] == 2 and c["speedup_vs_reduction_per_micro_batch"] > 0
    assert c["loss_gap_vs_reduction_per_micro_batch"] == 0.0  # same weights and batches, one CPU rank


def test_own_time_is_ranked_per_device_type_and_clock():
    """ranked_own_time: on a GPU the kernels by their device time, and the host's ops by their CPU
    time (what the device waited for), each from its own events only, equal keys summed."""
    from types import SimpleNamespace

    def event(key, kind, cpu_us, device_us, count):
        return SimpleNamespace(
            key=key,
            device_type=SimpleNamespace(name=kind),
            self_cpu_time_total=cpu_us,
            self_device_time_total=device_us,
            count=count,
        )

    events = [
        event("nvjet_gemm", "CUDA", 0.0, 6000.0, 40),
        event("triton_rmsnorm", "CUDA", 0.0, 1000.0, 20),
        event("triton_rmsnorm", "CUDA", 0.0, 1000.0, 20),
        event("cudaLaunchKernel", "CPU", 8000.0, 0.0, 400),
        event("AccumulateGrad", "CPU", 4000.0, 0.0, 100),
    ]
    kernels, other, busy = train_throughput.ranked_own_time(events, "CUDA", "self_device_time_total", steps=2)
    assert [(r["op"], r["calls_per_step"], r["ms_per_step"]) for r in kernels] == [
        ("nvjet_gemm", 20.0, 3.0),
        ("triton_rmsnorm", 20.0, 1.0),
    ]
    assert (other, busy) == (0.0, 4.0) and kernels[0]["share"] == pytest.approx(0.75)
    host, _, host_busy = train_throughput.ranked_own_time(events, "CPU", "self_cpu_time_total", steps=2)
    assert [r["op"] for r in host] == ["cudaLaunchKernel", "AccumulateGrad"] and host_busy == 6.0
