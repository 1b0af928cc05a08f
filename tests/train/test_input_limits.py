"""`ds-sft train` refuses, in one line before the engine is built, what cannot train: a base model
with NaN/Inf weights, a micro-batch that cannot fit in memory or that the splits cannot fill."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.cli import main
from ds_sft.errors import UserError
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from ds_sft.train.preflight import check_batch_fits_split
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


class Reached(Exception):
    """The run got past every check to the training loop."""


def _reach(*args, **kwargs):
    raise Reached


@settings(max_examples=200)
@given(
    micro=st.integers(1, 2**16),
    accum=st.integers(1, 64),
    world=st.integers(1, 64),
    rows=st.integers(1, 10**5),
)
def test_a_micro_step_needs_distinct_rows_and_a_step_beyond_the_split_is_noted(micro, accum, world, rows):
    s = SimpleNamespace(micro_batch_size=micro, grad_accum=accum, data_dir="DATA")
    if micro * world > rows:
        with pytest.raises(UserError) as err:
            check_batch_fits_split(s, world, rows)
        line = str(err.value)
        assert (
            "\n" not in line and f"holds {rows:,} packed rows" in line and f"{micro * world:,} rows" in line
        )
        if rows >= world:  # the size it names fits, one more would not
            most = int(re.search(r"--micro_batch_size (\d+) or less", line).group(1))
            assert most * world <= rows < (most + 1) * world
        else:
            assert f"train on {rows} rank(s) or fewer" in line
        return
    note = check_batch_fits_split(s, world, rows)
    assert (note is not None) == (micro * accum * world > rows)
    if note:
        assert "\n" not in note and f"{micro * accum * world:,} rows" in note and f"holds {rows:,}" in note


# (train rows, micro, accum): refused when the micro-batch exceeds the split, noted past one step
CLI_CASES = [
    (8, 9, 1, "refused"),
    (8, 16, 1, "refused"),
    (8, 65536, 1, "refused"),
    (3, 4, 2, "refused"),
    (8, 8, 1, "runs"),
    (8, 4, 2, "runs"),
    (8, 1, 1, "runs"),
    (8, 4, 3, "noted"),
    (8, 8, 2, "noted"),
    (5, 1, 6, "noted"),
]


@pytest.mark.parametrize(("rows", "micro", "accum", "outcome"), CLI_CASES)
def test_train_checks_the_batch_against_the_split_before_the_model(
    tmp_path, capsys, monkeypatch, dist_env, rows, micro, accum, outcome
):
    import ds_sft.train.cli
    import ds_sft.train.loop

    monkeypatch.setattr(ds_sft.train.loop, "train", _reach)
    if outcome == "refused":  # before the model is built: no memory estimate, no weights
        monkeypatch.setattr(ds_sft.train.cli, "build_model", lambda *a, **k: pytest.fail("model built"))
    data = write_data_dir(tmp_path / "data", train_rows=rows)
    argv = ["train", "--data_dir", str(data), "--model", "tiny", "--out_dir", str(tmp_path / "run"),
            "--fp8", "off", "--micro_batch_size", str(micro), "--grad_accum", str(accum)]  # fmt: skip
    if outcome == "refused":
        assert main(argv) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and f"holds {rows} packed rows" in err[0] and "--micro_batch_size" in err[0], err
        return
    with pytest.raises(Reached):
        main(argv)
    out = capsys.readouterr().out
    assert ("note: a step reads" in out) == (outcome == "noted"), out[-2000:]
