"""Resume with another ZeRO stage or precision continues the run it came from.

A run trains ``N`` steps without interruption, saving at step ``K``; the same checkpoint is then
resumed with another ``--zero_stage`` and/or ``--precision`` (and, in the two-rank cells, another
world size) and runs to ``N``. The resumed steps' losses and the final weights are compared with the
uninterrupted run's:

- fp32 to fp32, any stage to any stage: the arithmetic is the same up to the order of a few sums
  (ZeRO 3's gathered forward, the grad norm), so within 1e-6 (measured over all 12 changes, one rank:
  losses <= 7.8e-7, one or two float32 steps of a loss near 5; final weights <= 1.2e-7; two ranks to
  one: 5.2e-7);
- a change of precision: the resumed steps compute in the other precision, so the trajectories part
  by that precision's rounding; within :data:`BF16_LOSS` / :data:`BF16_WEIGHTS` (see there).

What the tolerance cannot show, the in-process tests of tests/train/test_checkpointing.py do: the
new engine holds the saved fp32 masters, Adam moments and step bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import write_tiny_data_dir
from .runs import final_weights, train_flags, train_two_ranks, trajectory

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

K, N = 4, 14  # save at step K, compare the N - K = 10 steps after the resume
FP32_TOLERANCE = 1e-6
# A precision change: the uninterrupted run computes steps K+1..N in the old precision, the resumed
# one in the new; they part by bf16's rounding of weights, activations and gradients. Measured on the
# tiny preset over these 10 steps (lr 1e-3, the six PRECISION_CELLS): losses <= 1.93e-4 apart, final
# weights <= 5.51e-4; the bounds are three times that. What they catch (measured in-process, ZeRO 2
# fp32 -> bf16, the same 10 steps): Adam moments and step lost, losses 0.26 apart; fp32 masters
# rounded to bf16 on the way (as loading the bf16 module weights would), losses 1.6e-3, weights 3.9e-3.
BF16_LOSS = 6e-4
BF16_WEIGHTS = 1.5e-3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_data_dir(tmp_path_factory.mktemp("data"), train_rows=64)


@pytest.fixture(scope="module")
def process_group():
    from ds_sft.train.distributed import init_distributed

    return init_distributed()


def flags(data_dir: Path, out_dir: Path, stage: int, precision: str, *extra: str) -> list[str]:
    return train_flags(data_dir, out_dir, N, "--zero_stage", str(stage), "--precision", precision,
                       "--save_interval", str(K), "--keep_last", "10", *extra)  # fmt: skip


def train_here(argv: list[str]) -> None:
    """``ds-sft train`` in this process (one rank)."""
    from ds_sft.cli import main

    assert main(["train", *argv]) == 0


RUNS: dict[tuple, Path] = {}  # (stage, precision, ranks) -> the uninterrupted run, trained once


def uninterrupted(data_dir: Path, root: Path, stage: int, precision: str, ranks: int) -> Path:
    key = (stage, precision, ranks)
    if key not in RUNS:
        out = root / f"from-zero{stage}-{precision}-{ranks}ranks"
        accum = ["--grad_accum", str(2 // ranks)]  # 2 ranks x 2 rows, or 1 rank x 2 x 2
        argv = flags(data_dir, out, stage, precision, *accum)
        train_two_ranks(argv) if ranks == 2 else train_here(argv)
        RUNS[key] = out
    return RUNS[key]


def resume(source: Path, out: Path, data_dir: Path, stage: int, precision: str, ranks: int) -> None:
    """Continue ``source``'s step-K checkpoint in ``out`` with the given stage, precision and ranks."""
    tag = f"step_{K:06d}"
    shutil.copytree(source / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)
    argv = flags(data_dir, out, stage, precision, "--grad_accum", str(2 // ranks))
    train_two_ranks(argv) if ranks == 2 else train_here(argv)


def differences(expected: Path, resumed: Path) -> tuple[float, float]:
    """(max loss difference over steps K+1..N, max final weight difference)."""
    want, got = trajectory(expected), trajectory(resumed)
    assert sorted(got) == list(range(K + 1, N + 1)), sorted(got)
    loss = max(abs(got[step] - want[step]) for step in got)
    a, b = final_weights(expected), final_weights(resumed)
    assert a.keys() == b.keys()
    weights = max(float((a[name] - b[name]).abs().max()) for name in a)
    return loss, weights


def check(data_dir, tmp_path, before: tuple, after: tuple, capsys=None) -> tuple[float, float]:
    """Train ``before`` = (stage, precision, ranks), resume with ``after``, compare; returns the figures."""
    source = uninterrupted(data_dir, tmp_path.parent, *before)
    if capsys is not None:
        capsys.readouterr()
    resume(source, tmp_path / "resumed", data_dir, *after)
    loss, weights = differences(source, tmp_path / "resumed")
    print(f"ZeRO {before[0]} {before[1]} x{before[2]} -> ZeRO {after[0]} {after[1]} x{after[2]}: "
          f"loss {loss:.2e}, weights {weights:.2e}")  # fmt: skip
    same_precision = before[1] == after[1] == "fp32"
    assert loss <= (FP32_TOLERANCE if same_precision else BF16_LOSS)
    assert weights <= (FP32_TOLERANCE if same_precision else BF16_WEIGHTS)
    return loss, weights


FAST_STAGES = [(2, 3)]  # stage 0 as a target: the two-rank cell
ALL_STAGES = [(a, b) for a in range(4) for b in range(4) if a != b]


@pytest.mark.parametrize(
    "before,after",
    [pytest.param(a, b, marks=[] if (a, b) in FAST_STAGES else pytest.mark.matrix) for a, b in ALL_STAGES],
)
def test_fp32_resume_on_another_zero_stage_matches_the_uninterrupted_run(
    before, after, data_dir, tmp_path, process_group
):
    check(data_dir, tmp_path, (before, "fp32", 1), (after, "fp32", 1))


PRECISION_CELLS = [
    pytest.param((2, "bf16"), (2, "fp32"), id="zero2-bf16-to-fp32"),
    pytest.param((1, "fp32"), (3, "bf16"), id="zero1-fp32-to-zero3-bf16", marks=pytest.mark.matrix),
    pytest.param((2, "fp32"), (2, "bf16"), id="zero2-fp32-to-bf16", marks=pytest.mark.matrix),
    pytest.param((0, "bf16"), (3, "fp32"), id="zero0-bf16-to-zero3-fp32", marks=pytest.mark.matrix),
    pytest.param((3, "bf16"), (0, "fp32"), id="zero3-bf16-to-zero0-fp32", marks=pytest.mark.matrix),
    pytest.param((0, "fp32"), (1, "bf16"), id="zero0-fp32-to-zero1-bf16", marks=pytest.mark.matrix),
]


@pytest.mark.parametrize("before,after", PRECISION_CELLS)
def test_resume_in_another_precision_stays_within_bf16_rounding(
    before, after, data_dir, tmp_path, process_group
):
    check(data_dir, tmp_path, (*before, 1), (*after, 1))


def test_the_resume_says_what_changed(data_dir, tmp_path, process_group, capsys):
    check(data_dir, tmp_path, (2, "bf16", 1), (3, "fp32", 1), capsys)
    out = capsys.readouterr().out
    assert "resuming ZeRO 2 -> 3, bf16 -> fp32: " in out and "optimizer state converted" in out


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "before,after",
    [
        pytest.param((3, "fp32", 2), (0, "fp32", 1), id="zero3-2ranks-to-zero0-1rank"),
        pytest.param((1, "fp32", 2), (2, "fp32", 2), id="zero1-to-zero2-2ranks", marks=pytest.mark.matrix),
        pytest.param(
            (2, "fp32", 2), (3, "fp32", 1), id="zero2-2ranks-to-zero3-1rank", marks=pytest.mark.matrix
        ),
        pytest.param(
            (0, "bf16", 2), (3, "fp32", 2), id="zero0-bf16-to-zero3-fp32-2ranks", marks=pytest.mark.matrix
        ),
    ],
)
def test_two_ranks(before, after, data_dir, tmp_path, process_group):
    """Stage and world size change together: a ZeRO 1-3 checkpoint of 2 ranks goes through DeepSpeed's
    universal format into the checkpoint's kind of engine on the new world size, then converts."""
    check(data_dir, tmp_path, before, after)


def test_the_conversion_never_unpickles_code(data_dir, tmp_path, process_group):
    """A resume with another stage loads the checkpoint through the same weights-only unpickler as any
    resume: a payload planted in its optimizer file (the opcode scan in front of it left out) is
    refused in one line and never runs; no folder of the conversion is left behind."""
    import torch

    from ds_sft.errors import UserError
    from ds_sft.run_layout import TRAINER_STATE
    from ds_sft.train.state_transfer import load_saved_kind
    from tests.train.helpers import ds_config, settings, tiny_model

    from .conftest import Payload

    source = uninterrupted(data_dir, tmp_path.parent, 3, "fp32", 2)  # 2 ranks: the universal path too
    tag_dir = tmp_path / "checkpoints" / f"step_{K:06d}"
    shutil.copytree(source / "checkpoints" / tag_dir.name, tag_dir)
    marker = tmp_path / "payload_ran"
    victim = sorted(tag_dir.glob("*optim_states.pt"))[0]
    planted = torch.load(victim, weights_only=False)  # the test's own file
    planted["optimizer_state_dict"]["payload"] = Payload(marker)
    torch.save(planted, victim)
    s = settings(zero_stage=0, precision="fp32")
    with pytest.raises(UserError) as refused:
        load_saved_kind(tiny_model(), ds_config(s), s.weight_decay, tag_dir, {"zero_stage": 3,
                        "precision": "fp32"}, tag_dir.parent)  # fmt: skip
    assert not marker.exists(), "the planted payload ran"
    assert "\n" not in str(refused.value) and "weights_only" in str(refused.value)
    assert sorted(p.name for p in tag_dir.parent.iterdir()) == [tag_dir.name]
    assert (tag_dir / TRAINER_STATE).is_file()
