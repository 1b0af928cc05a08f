"""One rank of a two-process job dies or freezes mid-run: the other must fail fast, and the job resume.

The two ranks are started as plain processes (RANK / WORLD_SIZE / MASTER_* set by hand), without
a launcher, because a launcher kills the survivors itself when one child dies and would hide what
this checks: that the surviving rank does not wait forever in its next collective. They meet at a
store this test holds (:func:`tests.rendezvous.rendezvous`), one per launch.

- SIGKILL: the dead rank's sockets close; the survivor's collective fails at once.
- SIGSTOP: the frozen rank's sockets stay open, so only the collective timeout (``--dist_timeout``)
  can end the survivor's wait.

Either way the survivor must exit non-zero within 60 s, and a fresh two-process ``--resume``
continues from the last checkpoint to the end.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.rendezvous import rendezvous, without_launcher_variables

from .conftest import write_tiny_data_dir
from .runs import train_flags, train_records

pytestmark = pytest.mark.multiproc

STEPS = 100
TIMEOUT_S = 15  # --dist_timeout of the run a rank fails in: well under the 60 s the survivor is allowed


def start_ranks(data: Path, out_dir: Path, env: dict, store: dict, *extra: str) -> list[subprocess.Popen]:
    """The two ranks, meeting at the held ``store`` (the variables :func:`rendezvous` yields)."""
    flags = train_flags(data, out_dir, STEPS, "--micro_batch_size", "1", *extra)
    procs = []
    for rank in range(2):
        rank_env = {**env, **store, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                    "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "ds_sft.train", *flags], env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    return procs


def wait_for_step(out_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = train_records(out_dir)
        if records and records[-1]["step"] >= step:
            return
        if any(proc.poll() is not None for proc in procs):
            logs = "\n".join(p.communicate()[0][-2000:] for p in procs)
            raise AssertionError(f"a rank exited early:\n{logs}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_survivor_fails_within_60s_and_the_job_resumes(tmp_path, ds_env, how):
    data = write_tiny_data_dir(tmp_path / "data")
    out_dir = tmp_path / "run"
    env = without_launcher_variables(ds_env)
    with rendezvous() as store:
        procs = start_ranks(data, out_dir, env, store, "--dist_timeout", str(TIMEOUT_S))
        try:
            wait_for_step(out_dir, 25, procs)  # past the first checkpoint (step 20)
            procs[1].send_signal(how)
            try:
                procs[0].wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank 0 runs 60 s after rank 1 got {how.name}: it hangs in a collective")
            assert procs[0].returncode != 0
        finally:
            kill_all(procs)
    last = (out_dir / "checkpoints" / "latest").read_text().strip()

    # the default collective timeout: a busy machine holding one rank up 15 s (loading its checkpoint)
    # must not fail the run that checks the resume
    with rendezvous() as store:
        resumed = start_ranks(data, out_dir, env, store)
        try:
            outputs = [proc.communicate(timeout=600)[0] for proc in resumed]
        finally:
            kill_all(resumed)
    assert [proc.returncode for proc in resumed] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert f"resumed from {out_dir / 'checkpoints' / last}" in outputs[0]
    assert max(r["step"] for r in train_records(out_dir)) == STEPS


def test_a_sigterm_to_one_rank_stops_every_rank_after_a_checkpoint_with_its_code(tmp_path, ds_env):
    """Preemption that reached one rank: every rank saves the same step and stops, and each exits 143
    (128 + SIGTERM), after the last barrier. They exited 0, so `ds-sft train ... && ds-sft eval ...`
    went on to evaluate a run stopped half-way."""
    from ds_sft.train import checkpointing

    data = write_tiny_data_dir(tmp_path / "data")
    out_dir = tmp_path / "run"
    env = without_launcher_variables(ds_env)
    with rendezvous() as store:
        procs = start_ranks(data, out_dir, env, store)
        try:
            wait_for_step(out_dir, 3, procs)
            procs[1].send_signal(signal.SIGTERM)
            outputs = [proc.communicate(timeout=300)[0] for proc in procs]
        finally:
            kill_all(procs)
    assert [proc.returncode for proc in procs] == [143, 143], outputs[0][-3000:] + outputs[1][-3000:]
    step = max(r["step"] for r in train_records(out_dir))
    assert step < STEPS
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == checkpointing.tag_for(step)
    assert f"stopped by SIGTERM at step {step}: continue with --resume" in outputs[0]
