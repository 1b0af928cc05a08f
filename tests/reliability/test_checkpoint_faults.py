"""Checkpoints under damage: a crash mid-save, torn and corrupted files, a full or read-only disk.

Each case runs the real trainer as a subprocess (:mod:`runs`) on the tiny model for 60 steps with a
checkpoint every 20, breaks something, and checks three things: the failure is named in one line,
``latest`` (or the fallback) names a checkpoint that is intact, and continuing from it ends with the
very weights of the clean 60-step run, bit for bit. What counts as intact is decided by
``ds_sft.train.checkpoint_check.damage`` (sizes and sha256 recorded at save time).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ds_sft.run_layout import TRAINER_STATE
from ds_sft.train import checkpoint_check, checkpointing, trainer_state

from .conftest import Payload, write_tiny_data_dir
from .runs import (
    SAVE_EVERY,
    assert_same_weights,
    final_weights,
    run,
    train_flags,
    train_two_ranks,
    trajectory,
)

pytestmark = pytest.mark.multiproc

STEPS = 60


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, ds_env_module):
    """The uninterrupted 60-step run every case is compared with (and copied from)."""
    root = tmp_path_factory.mktemp("clean")
    data = write_tiny_data_dir(root / "data")
    result = run(train_flags(data, root / "run", STEPS, "--keep_last", "3"), ds_env_module)
    assert result.returncode == 0, result.stderr[-3000:]
    return data, root / "run"


def copy_of(clean_run, tmp_path: Path) -> Path:
    """A copy of the clean run's directory with its final weights removed (resuming rewrites them)."""
    run_dir = tmp_path / "run"
    shutil.copytree(clean_run[1], run_dir)
    shutil.rmtree(run_dir / "final")
    return run_dir


def error_line(stderr: str) -> str:
    """The one error line, on a line of its own (not glued to the end of a progress bar)."""
    lines = [line for line in stderr.splitlines() if "ds-sft train: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("ds-sft train: error:"), stderr[-3000:]
    return lines[0]


def test_crash_mid_save_leaves_latest_on_the_previous_complete_checkpoint(clean_run, ds_env, tmp_path):
    data, clean = clean_run
    run_dir = tmp_path / "run"
    killed = run(train_flags(data, run_dir, STEPS), ds_env, fault="save@40")
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step_000020"
    assert checkpoint_check.damage(ckpt_dir / "step_000020") is None
    assert checkpoint_check.damage(ckpt_dir / "step_000040") is not None  # the torn one is recognisably so

    resumed = run(train_flags(data, run_dir, STEPS), ds_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_000020" in resumed.stdout
    assert trajectory(run_dir) == trajectory(clean)
    assert_same_weights(final_weights(clean), final_weights(run_dir))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "word"), [(truncate, "truncated"), (flip_a_byte, "corrupted")])
def test_damaged_latest_falls_back_to_the_previous_checkpoint(clean_run, ds_env, tmp_path, damage, word):
    data, clean = clean_run
    run_dir = copy_of(clean_run, tmp_path)
    victim = next((run_dir / "checkpoints" / "step_000060").glob("*optim_states.pt"))
    damage(victim)

    resumed = run(train_flags(data, run_dir, STEPS), ds_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warning = next(line for line in resumed.stderr.splitlines() if line.startswith("warning: skipping"))
    assert "step_000060" in warning and victim.name in warning and word in warning
    assert "resumed from" in resumed.stdout and "step_000040" in resumed.stdout
    assert_same_weights(final_weights(clean), final_weights(run_dir))


def test_checkpoint_carrying_pickled_code_is_never_unpickled(clean_run, ds_env, tmp_path):
    """DeepSpeed loads with weights_only=False: the trainer must refuse a tampered file before it does."""
    import torch

    data, clean = clean_run
    run_dir = copy_of(clean_run, tmp_path)
    tag_dir = run_dir / "checkpoints" / "step_000060"
    victim = next(tag_dir.glob("*model_states.pt"))
    sentinel = tmp_path / "payload_ran"
    torch.save({**torch.load(victim, weights_only=False), "hook": Payload(sentinel)}, victim)
    # the attacker rewrites the recorded digests too, so only the pickle scan stands in the way
    state_file = tag_dir / TRAINER_STATE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "files": checkpoint_check.file_digests(tag_dir)}))

    resumed = run(train_flags(data, run_dir, STEPS), ds_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not sentinel.exists(), "resuming ran code from the checkpoint"
    warning = next(line for line in resumed.stderr.splitlines() if line.startswith("warning: skipping"))
    assert "step_000060" in warning and victim.name in warning and "io.open" in warning
    assert "resumed from" in resumed.stdout and "step_000040" in resumed.stdout
    assert_same_weights(final_weights(clean), final_weights(run_dir))


def test_asking_for_a_damaged_checkpoint_stops_with_one_line(clean_run, ds_env, tmp_path):
    data, _ = clean_run
    run_dir = copy_of(clean_run, tmp_path)
    tag_dir = run_dir / "checkpoints" / "step_000060"
    victim = next(tag_dir.glob("*model_states.pt"))
    truncate(victim)
    flags = train_flags(data, run_dir, STEPS)
    flags[flags.index("--resume")] = f"--resume={tag_dir}"
    result = run(flags, ds_env)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert victim.name in line and "truncated" in line
    assert not (run_dir / "final").exists()


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(clean_run, ds_env, tmp_path):
    data, _ = clean_run
    run_dir = copy_of(clean_run, tmp_path)
    for tag_dir in (run_dir / "checkpoints").glob("step_*"):
        truncate(next(tag_dir.glob("*model_states.pt")))
    result = run(train_flags(data, run_dir, STEPS), ds_env)
    assert result.returncode == 2
    assert "no intact checkpoint" in error_line(result.stderr)
    assert len(trajectory(run_dir)) == STEPS and "resumed" not in result.stdout


@pytest.mark.parametrize("poisoned", ["single_partition_of_fp32_groups", "exp_avg_sq"])
def test_a_checkpoint_saved_with_nan_in_it_is_refused_naming_an_earlier_one(
    clean_run, ds_env, tmp_path, poisoned
):
    """Digests cannot catch a state written with NaN in it (or rewritten whole); the load must."""
    import torch

    data, _ = clean_run
    run_dir = copy_of(clean_run, tmp_path)
    tag_dir = run_dir / "checkpoints" / "step_000060"
    victim = next(tag_dir.glob("*optim_states.pt"))
    saved = torch.load(victim, weights_only=False)
    optimizer = saved["optimizer_state_dict"]
    with torch.no_grad():
        if poisoned == "exp_avg_sq":
            optimizer["base_optimizer_state"]["state"][0]["exp_avg_sq"][:3] = float("inf")
        else:
            optimizer[poisoned][0][:3] = float("nan")
    torch.save(saved, victim)
    state_file = tag_dir / TRAINER_STATE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "files": checkpoint_check.file_digests(tag_dir)}))

    result = run(train_flags(data, run_dir, STEPS + 10), ds_env)
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result.stderr)
    part = "3 in its optimizer state" if poisoned == "exp_avg_sq" else "3 in its weights"
    assert str(tag_dir) in line and "NaN/Inf" in line and part in line, line
    assert line.endswith(f"--resume {run_dir / 'checkpoints' / 'step_000040'}"), line
    assert max(trajectory(run_dir)) == STEPS and not (run_dir / "final").exists()


def test_read_only_disk_at_save_is_one_line_and_the_run_continues_later(clean_run, ds_env, tmp_path):
    data, clean = clean_run
    run_dir = tmp_path / "run"
    failed = run(train_flags(data, run_dir, STEPS), ds_env, fault="read_only@40")
    assert failed.returncode == 2, failed.stderr[-3000:]
    line = error_line(failed.stderr)
    assert "step_000040" in line and "Read-only file system" in line
    assert "step_000020" in line and "intact" in line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000020"

    resumed = run(train_flags(data, run_dir, STEPS), ds_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(clean), final_weights(run_dir))


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MiB tmpfs: room for the run's first checkpoint (1.6 MiB) but not its second."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_at_save_is_one_line_and_the_run_goes_on_once_there_is_room(clean_run, ds_env, small_disk):
    data, clean = clean_run
    run_dir = small_disk / "run"
    failed = run(train_flags(data, run_dir, STEPS), ds_env)
    assert failed.returncode == 2, failed.stderr[-3000:]
    line = error_line(failed.stderr)
    assert f"step_{2 * SAVE_EVERY:06d}" in line and "MiB free" in line and "step_000020" in line, line
    assert "No space left on device" in line or "a full disk" in line, line
    assert checkpoint_check.find_checkpoint("auto", run_dir).name == "step_000020"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run(train_flags(data, run_dir, STEPS), ds_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(clean), final_weights(run_dir))


def test_a_planted_universal_folder_never_runs_on_resume(clean_run, ds_env, tmp_path):
    """The reported attack: a ``<tag>_universal/`` folder beside the latest tag, and a trainer state
    whose world size sends the resume through the universal conversion. ds-sft converts afresh into
    a folder of its own, so the planted one is neither loaded nor deleted."""
    import torch

    data, _ = clean_run
    run_dir = copy_of(clean_run, tmp_path)
    tag_dir = run_dir / "checkpoints" / "step_000060"
    sentinel = tmp_path / "payload_ran"
    planted = tag_dir.with_name("step_000060_universal")
    (planted / "zero" / "wte.weight").mkdir(parents=True)
    for path in [planted / "zero" / "optimizer_state.pt", planted / "zero" / "wte.weight" / "fp32.pt",
                 *(planted / p.name for p in tag_dir.glob("*model_states.pt"))]:  # fmt: skip
        torch.save({"hook": Payload(sentinel)}, path)
    state_file = tag_dir / TRAINER_STATE
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "world_size": 2}))
    planted_files = sorted(planted.rglob("*"))

    resumed = run(train_flags(data, run_dir, STEPS), ds_env)
    assert not sentinel.exists(), "resuming ran code from the planted universal folder"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "loaded via a universal checkpoint" in resumed.stdout
    assert sorted(planted.rglob("*")) == planted_files  # not ds-sft's: left as it was
    assert not list((run_dir / "checkpoints").glob(".universal-*"))  # ds-sft's own: removed
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_resuming_an_older_tag_rewrites_the_newer_tags_whole(ds_env, tmp_path):
    """Two ranks save steps 2-8; one rank resumes step 2 in the same folder and is killed in step 7,
    having re-written steps 4 and 6 over the first run's; ``--resume`` then continues from step 6.

    On the old code a re-written tag kept the first run's files beside the new ones (rank 1's ZeRO
    partition, listed in the new manifest as if it were part of the save), and ``prune`` ranked the
    first run's steps 6 and 8 above the step 4 just saved and deleted it under ``latest``. Now each
    save replaces its tag whole, the first run's later tags go at the first save of the new one, and
    the continuation equals the uninterrupted two-rank run, on one rank and on two.
    """
    data = write_tiny_data_dir(tmp_path / "data", train_rows=64)
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"

    def flags(keep_last: int, accum: int, *resume: str) -> list[str]:
        return train_flags(data, run_dir, 8, *resume, "--zero_stage", "2", "--save_interval", "2",
                           "--keep_last", str(keep_last), "--grad_accum", str(accum))  # fmt: skip

    train_two_ranks(flags(4, 1))  # 2 ranks x 2 rows, or 1 rank x 2 x 2: the same rows per step
    two = trajectory(run_dir)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if checkpointing.is_tag(p.name))
    assert tags == [checkpointing.tag_for(step) for step in (2, 4, 6, 8)]

    killed = run(flags(2, 2, str(ckpt_dir / "step_000002")), ds_env, fault="step@7")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (ckpt_dir / "latest").read_text().strip() == "step_000006"
    assert sorted(p.name for p in ckpt_dir.iterdir() if checkpointing.is_tag(p.name)) == [
        "step_000004",
        "step_000006",
    ]

    resumed = run(flags(2, 2), ds_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint" not in resumed.stderr
    one = trajectory(run_dir)
    assert [one[step] for step in (7, 8)] == pytest.approx([two[step] for step in (7, 8)], abs=1e-5)
    for tag in ("step_000006", "step_000008"):
        assert checkpoint_check.damage(ckpt_dir / tag) is None
        state = trainer_state.read_trainer_state(ckpt_dir / tag)
        assert state["world_size"] == 1
        assert not [name for name in state["files"] if "rank_1" in name], f"{tag} holds rank 1's files"
    assert (ckpt_dir / "latest").read_text().strip() == "step_000008"
    best = (ckpt_dir / "best").read_text().strip() if (ckpt_dir / "best").is_file() else None
    kept = {"step_000006", "step_000008"} | ({best} if best else set())
    assert {p.name for p in ckpt_dir.iterdir() if checkpointing.is_tag(p.name)} == kept

    # The re-written step 6 on two ranks again (a universal conversion, which reads every partition
    # file of the tag): on the old code rank 1's stale partition made it fail ("shape '[64]' is invalid
    # for input of size 128").
    again = tmp_path / "again"
    shutil.copytree(ckpt_dir / "step_000006", again / "checkpoints" / "step_000006")
    (again / "checkpoints" / "latest").write_text("step_000006")
    train_two_ranks(
        train_flags(data, again, 8, "--zero_stage", "2", "--save_interval", "2", "--grad_accum", "1")
    )
    assert [trajectory(again)[step] for step in (7, 8)] == pytest.approx([two[7], two[8]], abs=1e-5)


def test_resuming_a_checkpoint_at_max_iters_says_that_nothing_trains(clean_run, ds_env, tmp_path):
    """A checkpoint at or past --max_iters trained nothing and rewrote final/ and the report without a
    word, as if the run had trained again."""
    data, clean = clean_run
    run_dir = copy_of(clean_run, tmp_path)
    resumed = run(train_flags(data, run_dir, STEPS - 5), ds_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    note = f"step_{STEPS:06d} is at step {STEPS} and --max_iters is {STEPS - 5}: nothing to train"
    assert note in resumed.stdout + resumed.stderr
    assert_same_weights(final_weights(clean), final_weights(run_dir))
