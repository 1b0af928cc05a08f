"""ds-sft on the DeepSpeed engine == a plain-PyTorch AdamW loop, at every ZeRO stage (fp32, 1 process).

The reference is written from the definitions, not from ds-sft's code: the same rows in the same
order (the sampler without shuffling), decay only on ``*_proj.weight``, the token-normalized loss
(sum of token losses over the global batch / its trained tokens), ``clip_grad_norm_`` and
``torch.optim.AdamW``.
"""

from __future__ import annotations

import pytest
import torch

from ds_sft.data.sampler import ResumableSampler
from ds_sft.train.loop import train
from tests.train.helpers import TinyPacked, ds_config, reference_losses, settings, tiny_model


def ds_sft_losses(s, dataset, run_dir) -> tuple[list[float], list[float]]:
    summary = train(
        s,
        ds_config(s),
        tiny_model(),
        dataset,
        TinyPacked(8, seed=99),
        run_dir,
        ResumableSampler(len(dataset), shuffle=False),
    )
    engine = summary["engine"]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's AdamW
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"]  # what the configs ship
    engine.destroy()
    steps = [r for r in summary["records"] if r["type"] == "train"]
    return [r["loss"] for r in steps], [r["grad_norm"] for r in steps]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_plain_pytorch(stage, dist_env, tmp_path):
    s = settings(zero_stage=stage, max_iters=12, eval_interval=12)
    dataset = TinyPacked(s.max_iters * s.micro_batch_size * s.grad_accum, seed=1)
    expected_losses, expected_norms = reference_losses(s, dataset, range(len(dataset)))
    losses, norms = ds_sft_losses(s, dataset, tmp_path)
    assert losses == pytest.approx(expected_losses, abs=1e-5)
    assert norms == pytest.approx(expected_norms, rel=1e-4)
    assert expected_losses[-1] < expected_losses[0] - 0.05  # the comparison covers real learning
