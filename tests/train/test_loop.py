"""The run loop in one process: accumulation equivalence, NaN skipping, SIGTERM + exact resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from ds_sft.data.sampler import ResumableSampler
from ds_sft.errors import UserError
from ds_sft.train.checkpoint_check import find_checkpoint
from ds_sft.train.final import consolidated_state_dict
from ds_sft.train.loop import train
from ds_sft.train.report import write_report
from tests.train.helpers import TinyPacked, ds_config, settings, tiny_model

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning"
)  # torch.distributed deprecations in DeepSpeed
VAL = TinyPacked(8, seed=99)


def run(s, dataset, run_dir, model=None, **ds_extra):
    """Train; returns (per-step train records, final fp32 weights). ``ds_extra``: DeepSpeed JSON
    sections over the usual ones."""
    summary = train(
        s,
        ds_config(s, **ds_extra),
        model or tiny_model(),
        dataset,
        VAL,
        run_dir,
        ResumableSampler(len(dataset), seed=s.seed),
        find_checkpoint(s.resume, run_dir),
    )
    weights = consolidated_state_dict(summary["engine"])
    summary["engine"].destroy()
    return [r for r in summary["records"] if r["type"] == "train"], weights, summary


@pytest.mark.parametrize("stage", [0, 2])
def test_micro2_accum4_equals_micro8_accum1(stage, dist_env, tmp_path):
    dataset = TinyPacked(48, seed=3)
    counts = {int((dataset[i]["labels"] != -100).sum()) for i in range(len(dataset))}
    assert len(counts) > 5  # rows really differ in trained tokens
    accumulated, w_acc, _ = run(
        settings(zero_stage=stage, micro_batch_size=2, grad_accum=4, max_iters=6), dataset, tmp_path / "acc"
    )
    single, w_single, _ = run(
        settings(zero_stage=stage, micro_batch_size=8, grad_accum=1, max_iters=6),
        dataset,
        tmp_path / "single",
    )
    assert [r["loss"] for r in accumulated] == pytest.approx([r["loss"] for r in single], abs=1e-6)
    assert [r["trained_tokens"] for r in accumulated] == [r["trained_tokens"] for r in single]
    # Weights: looser, because Adam divides by sqrt(v): on an element whose gradients are ~0, fp32
    # summation-order noise (2 rows at a time vs 8) moves the update by ~1e-6 of lr-sized steps.
    for name in w_acc:
        torch.testing.assert_close(w_acc[name], w_single[name], atol=1e-5, rtol=0)


def on_training_forwards(model, calls, poisoned_forward):
    """Run ``poisoned_forward(forward, *args, **kwargs)`` in place of the model's forward on the given
    (1-based) training forward calls; eval forwards (``scores=True``: step 0 and every eval_interval)
    are not counted."""
    original, count = model.forward, {"n": 0}

    def forward(*args, **kwargs):
        if not kwargs.get("scores"):
            count["n"] += 1
            if count["n"] in calls:
                return poisoned_forward(original, *args, **kwargs)
        return original(*args, **kwargs)

    model.forward = forward
    return model


def poisoned(model, calls_to_poison):
    """Make the model's summed loss NaN on the given (1-based) training forward calls."""
    return on_training_forwards(model, calls_to_poison, lambda forward, *a, **k: forward(*a, **k) * math.nan)


@pytest.mark.parametrize("stage", [0, 2])
def test_nan_step_is_skipped_without_touching_weights(stage, dist_env, tmp_path):
    # Warmup longer than the run: the lr of step k does not depend on max_iters, so "3 steps with
    # step 3 poisoned" must end with exactly the weights of "2 clean steps".
    dataset = TinyPacked(32, seed=4)
    s3 = settings(zero_stage=stage, max_iters=3, warmup_iters=10)
    records, w_skipped, summary = run(s3, dataset, tmp_path / "nan", poisoned(tiny_model(), {5}))
    _, w_clean, _ = run(settings(zero_stage=stage, max_iters=2, warmup_iters=10), dataset, tmp_path / "clean")
    assert records[2].get("skipped") and not math.isfinite(records[2]["loss"])
    assert all(math.isfinite(r["loss"]) for r in records[:2])
    assert "non-finite loss" in summary["alarms"][0]["message"]
    for name in w_clean:
        assert torch.equal(w_skipped[name], w_clean[name]), name


@pytest.mark.parametrize("stage", [1, 2])
def test_a_nan_step_is_skipped_with_deepspeeds_bf16_overflow_check_off(stage, dist_env, tmp_path):
    """``"bf16": {"check_grad_overflow": false}`` (a documented DeepSpeed setting: its per-gradient scan
    is a third of a 112m step on an H200 at one micro-batch per update) also turns off ZeRO-1/2's skip
    of a non-finite update in bf16. The loop knows the loss is not finite before the update, so that
    update is still skipped: the weights are those of the clean steps before it, and the alarm's
    "update skipped" is true."""
    dataset = TinyPacked(32, seed=4)
    unchecked = {"bf16": {"enabled": True, "check_grad_overflow": False}}
    s3 = settings(zero_stage=stage, precision="bf16", max_iters=3, warmup_iters=10)
    records, w_skipped, summary = run(s3, dataset, tmp_path / "nan", poisoned(tiny_model(), {5}), **unchecked)
    s2 = settings(zero_stage=stage, precision="bf16", max_iters=2, warmup_iters=10)
    _, w_clean, _ = run(s2, dataset, tmp_path / "clean", **unchecked)
    assert records[2].get("skipped") and "update skipped" in summary["alarms"][0]["message"]
    for name in w_clean:
        assert torch.equal(w_skipped[name], w_clean[name]), name


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward whose backward makes every gradient through it non-finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf  # inf, and NaN where the gradient was 0


def poisoned_gradients(model, calls_to_poison):
    """Make the gradients of every block non-finite on the given (1-based) training forward calls,
    while their losses stay finite (the LM head reads the hidden states before the poison's backward)."""
    original_hidden = model.hidden_states

    def forward_with_poison(forward, *args, **kwargs):
        model.hidden_states = lambda *a, **k: _InfiniteGradient.apply(original_hidden(*a, **k))
        try:
            return forward(*args, **kwargs)
        finally:
            del model.hidden_states  # the class's method again

    return on_training_forwards(model, calls_to_poison, forward_with_poison)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_an_update_with_non_finite_gradients_under_a_finite_loss_is_skipped_and_said(
    stage, precision, dist_env, tmp_path
):
    """A backward can overflow where the forward did not: the loss is finite, some gradients are not.
    At every stage and precision that update must not land (the weights are those of the clean steps
    before it) and must not pass unsaid (the step is marked skipped, with an alarm naming the cause)."""
    dataset = TinyPacked(32, seed=4)
    s3 = settings(zero_stage=stage, precision=precision, max_iters=3, warmup_iters=10)
    records, w_skipped, summary = run(s3, dataset, tmp_path / "inf", poisoned_gradients(tiny_model(), {5}))
    s2 = settings(zero_stage=stage, precision=precision, max_iters=2, warmup_iters=10)
    _, w_clean, _ = run(s2, dataset, tmp_path / "clean")
    for name in w_clean:
        assert torch.equal(w_skipped[name], w_clean[name]), name
    assert math.isfinite(records[2]["loss"]) and records[2].get("skipped")
    assert "gradients" in summary["alarms"][0]["message"]


def test_non_finite_gradients_that_land_with_the_overflow_check_off_are_said_to_have_landed(
    dist_env, tmp_path
):
    """The one case ds-sft cannot stop: bf16.check_grad_overflow off, a finite loss, non-finite
    gradients (nothing scans them; ZeRO-2 masks their norm to -1 and applies them). The alarm says the
    update was applied and why, the record is not marked skipped, and the streak counts it (the next
    steps are NaN: the run stops after --max_nan_steps, pointing at the last checkpoint)."""
    unchecked = {"bf16": {"enabled": True, "check_grad_overflow": False}}
    s = settings(zero_stage=2, precision="bf16", max_iters=3, warmup_iters=10, max_nan_steps=5)
    records, _, summary = run(
        s, TinyPacked(32, seed=4), tmp_path, poisoned_gradients(tiny_model(), {5}), **unchecked
    )
    assert math.isfinite(records[2]["loss"]) and not records[2]["skipped"]
    message = summary["alarms"][0]["message"]
    assert "non-finite gradients under a finite loss" in message and "check_grad_overflow" in message
    assert "update applied" in message and "(1/5 in a row)" in message


def test_nan_streak_aborts_with_a_clear_message(dist_env, tmp_path):
    s = settings(zero_stage=0, max_iters=8, max_nan_steps=3)
    with pytest.raises(UserError, match="NaN/inf for 3 steps in a row"):
        run(s, TinyPacked(32, seed=5), tmp_path, poisoned(tiny_model(), set(range(3, 100))))


def test_a_step_without_trained_tokens_does_not_break_a_nan_streak(dist_env, tmp_path):
    """It runs nothing, so it is no sign that the losses are finite again: NaN steps with empty ones
    between them still stop the run (they reset the streak, and it trained on NaN after NaN)."""
    dataset = TinyPacked(32, seed=5)
    s = settings(zero_stage=0, max_iters=6, max_nan_steps=2)
    sampler = ResumableSampler(len(dataset), seed=s.seed)
    for step in (2, 4):  # steps 3 and 5 (1-based) hold no trained token
        for row in sampler.step_indices(2, 2, step=step).flatten():
            dataset.items[row]["labels"][:] = -100
    with pytest.raises(UserError, match=r"NaN/inf for 2 steps in a row \(last at step 4\)"):
        run(s, dataset, tmp_path, poisoned(tiny_model(), set(range(3, 100))))  # every step from 2 on


class SigtermAfter:
    """The dataset, sending this process SIGTERM when its ``rows``-th row is read (mid-step)."""

    def __init__(self, dataset, rows: int):
        self.dataset, self.rows, self.reads = dataset, rows, 0
        self.sources, self.seq_len, self.tokenizer_dir = dataset.sources, dataset.seq_len, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.rows:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.dataset[i]


@pytest.mark.parametrize(
    ("stage", "precision"),
    [
        (0, "fp32"),
        pytest.param(1, "fp32", marks=pytest.mark.slow),
        (2, "fp32"),
        pytest.param(3, "fp32", marks=pytest.mark.slow),
        pytest.param(2, "bf16", marks=pytest.mark.slow),
    ],
)
def test_sigterm_then_resume_is_bitwise_identical(stage, precision, dist_env, tmp_path):
    dataset = TinyPacked(20, seed=6)  # 5 steps x 4 rows: the second epoch starts mid-run
    s = settings(zero_stage=stage, max_iters=8, eval_interval=4, precision=precision)
    uninterrupted, w_full, _ = run(s, dataset, tmp_path / "full")

    # SIGTERM arrives while step 3 reads its rows: step 3 finishes, is saved, and the run stops.
    first, _, summary = run(s, SigtermAfter(dataset, rows=2 * 4 + 2), tmp_path / "cut")
    assert summary["status"] == "preempted" and summary["stop_signal"] == signal.SIGTERM and len(first) == 3
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_000003"
    resumed, w_resumed, _ = run(
        settings(zero_stage=stage, max_iters=8, eval_interval=4, precision=precision, resume="auto"),
        dataset,
        tmp_path / "cut",
        model=tiny_model(seed=123),
    )
    assert [r["step"] for r in resumed] == list(range(4, 9))
    assert [r["loss"] for r in first + resumed] == [r["loss"] for r in uninterrupted]
    for name in w_full:
        assert torch.equal(w_full[name], w_resumed[name]), name


def test_torch_fp8_trains_through_the_engine(dist_env, tmp_path):
    from ds_sft.model.fp8 import Float8Linear, Fp8Recipe, apply_fp8

    model = apply_fp8(tiny_model(), "torch", Fp8Recipe())
    assert isinstance(model.layers[0].attn.q_proj, Float8Linear)
    s = settings(zero_stage=2, max_iters=4, fp8="torch")
    records, weights, summary = run(s, TinyPacked(16, seed=8), tmp_path, model)
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
    assert "layers.0.attn.q_proj.weight" in weights  # the final weights keep plain-linear names
    # the report says what the steps computed in, which --fp8 auto would have decided by machine
    report = write_report(tmp_path, {}, summary).read_text()
    assert f"Computed in {s.precision}, 14 projections in fp8 (torch, select all) (--fp8 torch)." in report
    _, _, plain = run(settings(zero_stage=2, max_iters=1, fp8="auto"), TinyPacked(16, seed=8), tmp_path / "p")
    assert "no projection in fp8 (--fp8 auto)." in write_report(tmp_path / "p", {}, plain).read_text()


def test_activation_checkpointing_flag_recomputes_with_identical_losses(dist_env, tmp_path):
    from ds_sft.train.cli import build_model

    dataset = TinyPacked(16, seed=9)
    s = settings(zero_stage=0, max_iters=3, seed=0)
    recomputed = build_model(settings(seed=0, activation_checkpointing=True))
    assert recomputed.config.activation_checkpointing
    plain, _, _ = run(s, dataset, tmp_path / "plain")
    checkpointed, _, _ = run(s, dataset, tmp_path / "recompute", recomputed)
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], abs=1e-6)


def test_fp8_auto_is_resolved_once_not_per_forward(monkeypatch):
    from ds_sft.model import fp8
    from ds_sft.train.loop import fp8_forward_context

    resolved, resolve = [], fp8.resolve_fp8_mode
    monkeypatch.setattr(
        fp8, "resolve_fp8_mode", lambda mode, device: resolved.append(mode) or resolve(mode, device)
    )
    context = fp8_forward_context(settings(fp8="auto"), torch.device("cpu"))
    for _ in range(3):
        with context():
            pass
    assert resolved == ["auto"]


@pytest.mark.parametrize("nohup", [False, True], ids=["terminal", "nohup"])
def test_a_closed_terminal_stops_training_after_a_checkpoint_like_sigterm(nohup):
    """SIGHUP (the terminal closed) stopped the run mid-step, or mid-collective on one rank of many,
    with no checkpoint; started under nohup, the run keeps ignoring it."""
    from ds_sft.train.distributed import preemption_flag

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)
    try:
        with preemption_flag() as flag:
            handler = signal.getsignal(signal.SIGHUP)
            if nohup:
                assert handler == signal.SIG_IGN
            else:
                assert handler == signal.getsignal(signal.SIGTERM)  # the same: save, then stop
                handler(signal.SIGHUP, None)
                assert flag["stop"]
        assert signal.getsignal(signal.SIGHUP) == (signal.SIG_IGN if nohup else signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_step_without_trained_tokens_reports_no_loss_rather_than_zero(dist_env, tmp_path):
    """Its loss is 0 / 0: recorded as None (console "n/a"), kept out of the eval's train loss, not as a
    perfect 0.0 in metrics.jsonl, the plots and the report. It runs nothing (no update), so it has no
    throughput either: not millions of tokens/s from a step that took no time, nor the report's MFU."""
    dataset = TinyPacked(12, seed=3)
    s = settings(zero_stage=0, max_iters=3, micro_batch_size=2, grad_accum=2, eval_interval=3)
    sampler = ResumableSampler(len(dataset), seed=s.seed)
    for step in (0, 2):  # the first and the last step
        for row in sampler.step_indices(2, 2, step=step).flatten():
            dataset.items[row]["labels"][:] = -100
    records, _, summary = run(s, dataset, tmp_path)
    assert [r["trained_tokens"] == 0 for r in records] == [True, False, True]
    assert records[1]["loss"] > 0 and records[1]["tokens_per_s"] > 0 and records[1]["mfu"] > 0
    for empty in (records[0], records[2]):
        assert empty["loss"] is None and empty["grad_norm"] is None
        assert empty["tokens_per_s"] is None and empty["mfu"] is None
    evals = [r for r in summary["records"] if r["type"] == "eval"]
    assert evals[-1]["train_loss"] == records[1]["loss"]
    report = write_report(tmp_path, {}, summary).read_text()
    assert f"| MFU (step 2; peak: {summary['peak_flops_source']}) | {records[1]['mfu']:.1%} |" in report


def test_the_eta_is_measured_after_the_first_micro_step_which_warms_up(monkeypatch):
    """On an H200 the first micro-step compiled for 40 s and the next took 0.1 s: 16 micro-steps x
    100 steps of 0.1 s is under 3 minutes, not the 18 hours the first one would announce."""
    import contextlib

    from ds_sft.train import run_log

    clock = iter([0.0, 40.0, 40.1, 40.2])
    monkeypatch.setattr(run_log.time, "perf_counter", lambda: next(clock))
    lines = []
    context = run_log.announce_eta(contextlib.nullcontext, steps=100, micro_steps=16, say=lines.append)
    for _ in range(4):
        with context():
            pass
    [line] = lines
    duration = run_log.format_duration(0.1 * 16 * 100)
    assert line.startswith(f"ETA {duration}: the second micro-step took 0.10 s")
    assert "(the first, 40.00 s, warmed up)" in line
