"""bench/fp8.py's side-by-side comparison, run on CPU at the tiny preset (on a GPU it runs the 112m
preset and a d_model-2048 model): every mode of a width takes turns in one process, from the same
weights, and each row says how many projections it ran in fp8."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ds_sft.model.config import ModelConfig
from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("bench_fp8", REPO_ROOT / "bench" / "fp8.py")
bench_fp8 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_fp8)


@pytest.fixture(scope="module")
def rows():
    config = ModelConfig.preset("tiny")
    return {
        row["mode"]: row
        for row in bench_fp8.width_comparison("tiny", config, 2, torch.device("cpu"), 32, warmup=1, steps=2)
    }


def test_every_mode_has_a_row_and_te_says_why_it_did_not_run(rows):
    assert list(rows) == [label for label, *_ in bench_fp8.GPU_MODES]
    for label in ("te", "te auto"):  # Transformer Engine needs a GPU with fp8 tensor cores
        assert set(rows[label]) == {"model", "mode", "skipped"} and "--fp8 te needs" in rows[label]["skipped"]


def test_each_row_is_measured_and_counts_its_fp8_projections(rows):
    """select all swaps the tiny preset's 14 projections (with casts compiled on fp8 tensor cores, or
    eager: what compiling them is worth); select auto, none (too small to pay); the bf16 row is the
    1.00x every ratio is against."""
    measured = {label: row for label, row in rows.items() if "skipped" not in row}
    assert {label: (row["fp8_projections"], row["casts"]) for label, row in measured.items()} == {
        "bf16": (0, "-"),
        "torch": (14, "compiled on fp8 tensor cores"),
        "torch auto": (0, "-"),
        "torch eager casts": (14, "eager"),
    }
    assert rows["bf16"]["vs_bf16"] == 1.0
    for row in measured.values():
        assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(64 / row["step_s"])
        assert row["vs_bf16"] == pytest.approx(row["tokens_per_s"] / rows["bf16"]["tokens_per_s"])


def test_the_modes_take_turns_step_by_step(monkeypatch):
    """A B C A B C ...: the order the models' forwards run in."""
    order = []
    config = ModelConfig.preset("tiny")
    forward = bench_fp8.LlamaModel.forward

    def recording(self, *args, **kwargs):
        order.append(id(self))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(bench_fp8.LlamaModel, "forward", recording)
    models = {}
    for label in ("a", "b", "c"):
        models[label] = (bench_fp8.LlamaModel(config).train(), "off", None)
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    bench_fp8.alternating_step_times(models, ids[:, :-1], ids[:, 1:], warmup=1, steps=2)
    assert order == [id(m) for m, _, _ in models.values()] * 3
