"""Chaos resume: a run SIGKILLed again and again, resumed each time, ends bit-identical to a clean run.

The tiny model trains for 300 steps (fp32, ZeRO-2, one process, a checkpoint every 20 steps), once
without interruption and once under a seeded schedule of seven SIGKILLs, one per 40-step slot:

- in the middle of an optimizer step (after backward, before the update), twice;
- inside a checkpoint save, with DeepSpeed's first file half-written (a torn file on disk);
- after all of a checkpoint's files are written but before ``latest`` moves;
- after the new ``latest`` was written to its temporary name but before the rename;
- half-way through deleting an old checkpoint;
- from outside, at whatever point the process has reached when a seeded step shows in the log.

(:mod:`faulty_train` places the in-process kills.) After every kill, ``latest`` must name a complete
checkpoint, and the next ``--resume`` continues from it. The final per-step loss trajectory and the
final weights must equal the clean run's exactly: resume restores weights, optimizer moments, the
sampler's position, the RNG and the lr step, or some step would differ in the last bits.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import write_tiny_data_dir
from .runs import (
    SAVE_EVERY,
    assert_same_weights,
    final_weights,
    launch,
    run,
    train_flags,
    train_records,
    trajectory,
)

MAX_STEPS = 300
SEED = 20261125


def latest_step(out_dir: Path) -> int:
    """The step of the checkpoint ``latest`` names, checking that it is complete (0 when none)."""
    from ds_sft.train import checkpoint_check, trainer_state

    tag_dir = checkpoint_check.find_checkpoint("auto", out_dir)
    if tag_dir is None:
        return 0
    assert any(tag_dir.glob("*model_states.pt")) and any(tag_dir.glob("*optim_states.pt")), tag_dir
    return trainer_state.read_trainer_state(tag_dir)["step"]


def kill_schedule(rng: random.Random) -> list[tuple[str, int]]:
    """(point, step) per 40-step slot; save-side faults land on a save step, the rest between saves."""
    points = ["step", "step", "save", "before_latest", "latest_tmp", "prune", "external"]
    rng.shuffle(points)
    if points[0] == "prune":  # slot 1 (step 40) has no older checkpoint to delete yet
        points[0], points[1] = points[1], points[0]
    schedule = []
    for slot, point in enumerate(points, start=1):
        save_step = 40 * slot
        between = save_step - rng.randrange(1, SAVE_EVERY)
        on_save = point in ("save", "before_latest", "latest_tmp", "prune")
        schedule.append((point, save_step if on_save else between))
    return schedule


def kill_when_logged(proc: subprocess.Popen, out_dir: Path, step: int, timeout: float) -> None:
    """SIGKILL ``proc`` from outside as soon as the log shows ``step`` (wherever it is by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        records = train_records(out_dir)
        if records and records[-1]["step"] >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigkilled_and_resumed_run_equals_the_uninterrupted_run(tmp_path, ds_env):
    started = time.monotonic()
    data = write_tiny_data_dir(tmp_path / "data")
    clean = run(train_flags(data, tmp_path / "clean", MAX_STEPS), ds_env)
    assert clean.returncode == 0, clean.stderr[-3000:]

    chaos, log = tmp_path / "chaos", []
    for point, step in kill_schedule(random.Random(SEED)):
        resumed_from = latest_step(chaos)
        # the external kill lands wherever the run is once the log shows its step; held before the last
        # update, the run cannot end first when a busy machine delays the kill (it was "did not fire")
        fault = f"hold@{MAX_STEPS}" if point == "external" else f"{point}@{step}"
        proc = launch(train_flags(data, chaos, MAX_STEPS), ds_env, fault)
        if point == "external":
            kill_when_logged(proc, chaos, step, timeout=900)
        _, err = proc.communicate(timeout=900)
        fired = proc.returncode == -signal.SIGKILL
        assert fired, f"{point}@{step} did not fire (exit {proc.returncode}):\n{err[-3000:]}"
        reached = max((r["step"] for r in train_records(chaos)), default=0)
        checkpoint = latest_step(chaos)
        assert checkpoint <= reached, (point, step, checkpoint, reached)
        if point in ("save", "before_latest", "latest_tmp"):
            assert checkpoint == step - SAVE_EVERY, f"{point}@{step}: latest moved to {checkpoint}"
        log.append(f"{point}@{step}: resumed from {resumed_from}, reached {reached}, latest now {checkpoint}")

    final = run(train_flags(data, chaos, MAX_STEPS), ds_env)
    assert final.returncode == 0, final.stderr[-3000:]
    # every step a killed process logged after its last completed checkpoint was trained again
    redone = len(train_records(chaos)) - MAX_STEPS

    expected, actual = trajectory(tmp_path / "clean"), trajectory(chaos)
    assert sorted(actual) == list(range(1, MAX_STEPS + 1))
    assert actual == expected, "the loss trajectory after chaos differs from the clean run"
    assert_same_weights(final_weights(tmp_path / "clean"), final_weights(chaos))
    print("\n".join(log))
    seconds = time.monotonic() - started
    print(f"chaos resume: 7 SIGKILLs, {redone} logged steps recomputed, wall time {seconds:.0f} s")
