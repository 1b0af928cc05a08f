"""ds-sft on the DeepSpeed engine == a plain-PyTorch AdamW loop, at every ZeRO stage (fp32, 1 process).

The reference is written from the definitions, not from ds-sft's code: the same rows in the same
order (the sampler without shuffling), decay only on ``*_proj.weight``, the token-normalized loss
(sum of token losses over the global batch / its trained tokens), ``clip_grad_norm_``,
``torch.optim.AdamW``, and no update from a step without trained tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ds_sft.data.sampler import ResumableSampler
from ds_sft.train.final import consolidated_state_dict
from ds_sft.train.loop import train
from tests.train.helpers import TinyPacked, ds_config, reference_losses, settings, tiny_model


class InOrder(ResumableSampler):
    """The sampler without its shuffle: rows 0, 1, 2... in every epoch, as the reference reads them."""

    def permutation(self, epoch: int) -> np.ndarray:
        return np.arange(self.num_samples)


def trained_engine(s, dataset, run_dir) -> tuple[object, list[dict]]:
    """(the engine, the per-step train records) of a ds-sft run over ``dataset`` in order."""
    summary = train(
        s,
        ds_config(s),
        tiny_model(),
        dataset,
        TinyPacked(8, seed=99),
        run_dir,
        InOrder(len(dataset)),
        None,
    )
    return summary["engine"], [r for r in summary["records"] if r["type"] == "train"]


def ds_sft_run(s, dataset, run_dir) -> tuple[list[float], list[float], dict]:
    """(per-step losses, grad norms, final fp32 weights) of a ds-sft run over ``dataset`` in order."""
    engine, steps = trained_engine(s, dataset, run_dir)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's AdamW
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"]  # what the configs ship
    weights = consolidated_state_dict(engine)
    engine.destroy()
    return [r["loss"] for r in steps], [r["grad_norm"] for r in steps], weights


def nan_for_none(values: list) -> list[float]:
    """``values`` with NaN for "none" (a step without trained tokens), which ``approx(nan_ok=True)``
    matches only with NaN, so a None must meet a None."""
    return [math.nan if v is None else v for v in values]


def without_targets(dataset: TinyPacked, rows) -> None:
    for row in rows:
        dataset.items[row]["labels"][:] = -100


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_plain_pytorch(stage, dist_env, tmp_path):
    """Losses, grad norms and the final weights, over windows of every kind: full ones, one whose
    first micro-batch has no trained token, and one without any (after momentum has built up, where
    an AdamW step on zero gradients would still move every weight)."""
    s = settings(zero_stage=stage, max_iters=12, eval_interval=12)
    rows_per_step = s.micro_batch_size * s.grad_accum
    dataset = TinyPacked(s.max_iters * rows_per_step, seed=1)
    without_targets(
        dataset, range(3 * rows_per_step, 3 * rows_per_step + s.micro_batch_size)
    )  # step 4's first
    without_targets(dataset, range(5 * rows_per_step, 6 * rows_per_step))  # step 6's window
    expected_losses, expected_norms, expected_weights = reference_losses(s, dataset, range(len(dataset)))
    assert expected_losses[5] is None and expected_losses.count(None) == 1  # the windows are as meant
    losses, norms, weights = ds_sft_run(s, dataset, tmp_path)
    assert nan_for_none(losses) == pytest.approx(nan_for_none(expected_losses), abs=1e-5, nan_ok=True)
    assert nan_for_none(norms) == pytest.approx(nan_for_none(expected_norms), rel=1e-4, nan_ok=True)
    assert weights.keys() == expected_weights.keys()
    for name, value in weights.items():  # Adam's 1/sqrt(v): fp32 summation order moves ~1e-6 of lr
        torch.testing.assert_close(value, expected_weights[name], atol=1e-5, rtol=0, msg=name)
    assert expected_losses[-1] < expected_losses[0] - 0.05  # the comparison covers real learning


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_adamw_starts_fresh_and_counts_only_the_updates(stage, precision, dist_env, tmp_path):
    """A fresh AdamW: no state before the first update, fp32 masters equal to the model's weights,
    and after N updates a step count of N. DeepSpeed's bf16 stage-0 wrapper stepped AdamW on zero
    gradients while it was built: the count ran one ahead (the first update was 0.735 x lr) and weight
    decay shrank the masters once before training."""
    from ds_sft.train.engine import build_engine

    s = settings(zero_stage=stage, precision=precision, max_iters=2, eval_interval=2)
    engine, _ = build_engine(tiny_model(), ds_config(s), s.weight_decay)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    counts = [state.get("step") for state in inner.state.values()]
    masters = consolidated_state_dict(engine)
    engine.destroy()
    assert counts == []
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # what the engine made of them
    for name, value in tiny_model().named_parameters():
        torch.testing.assert_close(masters[name], value.detach().to(dtype).float(), atol=0, rtol=0, msg=name)

    engine, _ = trained_engine(s, TinyPacked(16, seed=1), tmp_path)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    counts = {float(state["step"]) for state in inner.state.values()}
    engine.destroy()
    assert counts == {2.0}
