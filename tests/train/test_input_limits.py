"""`ds-sft train` refuses, in one line before the engine is built, what cannot train: a base model
with NaN/Inf weights, a micro-batch that cannot fit in memory or that the splits cannot fill."""

from __future__ import annotations

import math

import pytest
import torch

from ds_sft.cli import main
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from tests.train.helpers import write_data_dir


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_train_refuses_a_nan_base_model_in_one_line_before_the_engine(tmp_path, capfd, monkeypatch, dist_env):
    import ds_sft.train.loop

    torch.manual_seed(0)
    model = LlamaModel(ModelConfig.preset("tiny"))
    model.state_dict()["layers.1.mlp.down_proj.weight"][3, 5] = math.nan
    base = tmp_path / "base.pt"
    torch.save(model.state_dict(), base)
    monkeypatch.setattr(ds_sft.train.loop, "train", lambda *a, **k: pytest.fail("the engine was built"))
    data = write_data_dir(tmp_path / "data", train_rows=8)
    argv = ["train", "--data_dir", str(data), "--base_model", str(base), "--out_dir", str(tmp_path / "run"),
            "--fp8", "off", "--micro_batch_size", "1", "--max_iters", "1"]  # fmt: skip
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "layers.1.mlp.down_proj.weight" in lines[0], err[-2000:]
    assert "learning_rate" not in lines[0]
