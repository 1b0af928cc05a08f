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

import functools
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


def start_ranks(
    data: Path,
    out_dir: Path,
    env: dict,
    store: dict,
    *extra: str,
    steps: int = STEPS,
    rank0_file_limit: int = 0,
) -> list[subprocess.Popen]:
    """The two ranks, meeting at the held ``store`` (the variables :func:`rendezvous` yields). With
    ``rank0_file_limit``, rank 0's writes past that many bytes are refused (EFBIG), as by a full disk."""
    flags = train_flags(data, out_dir, steps, "--micro_batch_size", "1", *extra)
    procs = []
    for rank in range(2):
        rank_env = {**env, **store, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                    "OMP_NUM_THREADS": "1"}  # fmt: skip
        limit = (
            functools.partial(_limit_file_size, rank0_file_limit) if rank == 0 and rank0_file_limit else None
        )
        procs.append(subprocess.Popen([sys.executable, "-m", "ds_sft.train", *flags], env=rank_env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      preexec_fn=limit))  # fmt: skip
    return procs


def _limit_file_size(size: int) -> None:
    """In a rank's process before exec: its writes past ``size`` bytes are refused (EFBIG)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write rather than a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


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
            said = procs[0].stdout.read()
            # one line, not gloo's traceback: rank 1's own end is what to read
            why = (
                "ended in the middle of a collective"
                if how == signal.SIGKILL
                else "did not answer a collective"
            )
            assert (procs[0].returncode, "Traceback" in said) == (1, False), said[-3000:]
            assert (
                said.strip()
                .splitlines()[-1]
                .startswith(f"ds-sft train: error: rank 0 stops: another rank {why}")
            )
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


def _ended_limited(tmp_path, ds_env, steps: int, limit: int) -> tuple[list[int], list[str]]:
    data = write_tiny_data_dir(tmp_path / "data")
    with rendezvous() as store:
        procs = start_ranks(data, tmp_path / "run", without_launcher_variables(ds_env), store, steps=steps,
                            rank0_file_limit=limit)  # fmt: skip
        try:
            said = [proc.communicate(timeout=300)[0] for proc in procs]
        finally:
            kill_all(procs)
    assert "Traceback" not in said[0] + said[1], said
    return [proc.returncode for proc in procs], [(text.strip().splitlines() or [""])[-1] for text in said]


def test_a_write_refused_to_rank_0_ends_every_rank_in_its_one_line(tmp_path, ds_env):
    """Rank 0 alone claims the run folder; a write the system refused it there (a full disk, here a
    16-byte file-size limit: its lock file) was one line on rank 0, while rank 1, waiting for the
    verdict, ended in gloo's "Connection closed by peer" traceback. Rank 1 hears it now and exits 2
    without a word (and neither aborts in interpreter teardown: -6)."""
    codes, last = _ended_limited(tmp_path, ds_env, 8, 16)
    assert codes == [2, 2], last
    assert last[0].startswith("ds-sft train: error: ") and "File too large" in last[0], last
    assert not last[1].startswith("ds-sft train: error: "), last


def test_a_checkpoint_rank_0_cannot_write_ends_the_others_in_one_line(tmp_path, ds_env):
    """Rank 0's part of a checkpoint refused (past a 64 KiB file-size limit: as a full disk): rank 0 says
    what is intact; rank 1, inside DeepSpeed's barrier of the save, ended in a traceback of its own."""
    codes, last = _ended_limited(tmp_path, ds_env, 30, 1 << 16)
    assert codes == [2, 1], last
    saving = (
        f"ds-sft train: error: could not write checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_000020'}"
    )
    assert last[0].startswith(saving) and "no earlier checkpoint was saved;" in last[0], last
    assert "a full disk or quota, or a file-size limit" in last[0], last  # not torch's "unexpected pos" alone
    lost = "ds-sft train: error: rank 1 stops: another rank ended in the middle of a collective"
    assert last[1] == f"{lost}; its own error says why", last
