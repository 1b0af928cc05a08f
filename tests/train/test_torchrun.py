"""``python -m ds_sft.torchrun`` (the launchers' torchrun) ends a failed or signalled run in one line
and the code a shell and Slurm can tell apart, where torchrun ended each in a ChildFailedError
traceback and exit 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ds_sft.torchrun import SHUTDOWN_SECONDS, SHUTDOWN_VARIABLES, exit_code, torchrun_argv
from tests.train.helpers import REPO_ROOT, this_python_first

# each rank: say it started, then end as told (an exit code, a signal of its own, or wait for SIGTERM)
RANK = """
import os, signal, sys, time
from pathlib import Path
how = sys.argv[2]
def stop(signum, frame):  # as ds-sft train: checkpoint, exit 0
    Path(sys.argv[1], "stopped-" + os.environ["RANK"]).touch()
    sys.exit(0)
if how == "wait":  # the handlers before the "started" file: the test signals once it sees it
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
Path(sys.argv[1], os.environ["RANK"]).touch()
if how == "wait":
    time.sleep(600)
elif how.startswith("kill"):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), int(how[4:]))
    time.sleep(600)
else:
    sys.exit(int(how) if os.environ["RANK"] == "1" else 0)
"""


def _torchrun(tmp_path, how: str) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    command = [sys.executable, "-m", "ds_sft.torchrun", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path), how]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ended(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("torchrun did not end in 180 s")
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    return process.returncode, err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("how", "code", "ended"),
    [
        ("2", 2, "failed on rank 1 (exit 2); its own error is above"),  # ds-sft's one-line refusal
        ("1", 1, "failed on rank 1 (exit 1); its own error is above"),
        ("kill9", 137, "on rank 1 was killed by SIGKILL"),  # the kernel's out-of-memory killer
        ("kill11", 139, "on rank 1 was killed by SIGSEGV"),
        # the rank caught SIGTERM itself (srun --signal, scancel): a stop, not a failure
        ("143", 143, "stopped on rank 1 (exit 143, on SIGTERM); its own line is above"),
        ("130", 130, "stopped on rank 1 (exit 130, on SIGINT); its own line is above"),
    ],
)
def test_a_failed_or_stopped_rank_ends_torchrun_in_its_code_and_one_line(tmp_path, how, code, ended):
    returncode, last = _ended(_torchrun(tmp_path, how))
    assert (returncode, last) == (code, f"torchrun: {tmp_path / 'rank.py'} {ended}")


def test_a_run_whose_ranks_succeed_ends_in_zero(tmp_path):
    assert _ended(_torchrun(tmp_path, "0"))[0] == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_torchrun_reaches_the_ranks_and_ends_in_one_line(tmp_path, signum):
    """Slurm's preemption: the ranks get SIGTERM (they save a checkpoint and exit 0), then torchrun
    ends in 128 + the signal, not a traceback and 1."""
    process = _torchrun(tmp_path, "wait")
    deadline = time.monotonic() + 120
    while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()):
        assert time.monotonic() < deadline and process.poll() is None, "the ranks did not start"
        time.sleep(0.1)
    process.send_signal(signum)
    returncode, last = _ended(process)
    assert (returncode, last) == (
        128 + signum,
        f"torchrun: stopped by {signum.name}; the ranks were told to stop",
    )
    assert (tmp_path / "stopped-0").exists() and (tmp_path / "stopped-1").exists()  # each rank saw it


@pytest.mark.parametrize(
    ("argv", "added"),
    [
        (["--standalone", "-m", "ds_sft.train", "--data_dir", "d"], True),
        (["--shutdown_timeout", "5", "-m", "ds_sft.train"], False),
        (["--shutdown-timeout=5", "-m", "ds_sft.train"], False),
        (["--standalone", "-m", "my.module", "--shutdown_timeout", "9"], True),  # the module's own flag
    ],
)
def test_torchrun_waits_for_the_ranks_checkpoint_unless_told_otherwise(argv, added, monkeypatch):
    from torch.distributed.run import get_args_parser

    for name in SHUTDOWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    if not any("--shutdown_timeout" in action.option_strings for action in get_args_parser()._actions):
        pytest.skip(
            "this torch's torchrun has no --shutdown_timeout (it kills the ranks 30 s after a signal)"
        )
    expected = ["--shutdown_timeout", str(SHUTDOWN_SECONDS), *argv] if added else argv
    assert torchrun_argv(argv) == expected
    assert get_args_parser().parse_args([*expected[: expected.index("-m")], "x.py"]).shutdown_timeout in (
        SHUTDOWN_SECONDS,
        5,
    )


@pytest.mark.parametrize("name", SHUTDOWN_VARIABLES)
def test_a_shutdown_timeout_from_the_environment_is_kept(name, monkeypatch):
    """torchrun reads its timeout from these too: the injected flag overrode the user's 45 s."""
    monkeypatch.setenv(name, "45")
    argv = ["--standalone", "-m", "ds_sft.train"]
    assert torchrun_argv(argv) == argv


def test_exit_codes_read_as_a_shell_reads_them():
    assert [exit_code(code) for code in (2, 1, -9, -15, 300)] == [2, 1, 137, 143, 1]


def test_the_launcher_ends_a_refused_train_flag_in_exit_2_without_a_traceback(tmp_path):
    done = subprocess.run(
        [
            "bash",
            str(REPO_ROOT / "launch" / "torchrun.sh"),
            "--nproc",
            "2",
            "--",
            "--data_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=this_python_first(tmp_path / "bin", dict(os.environ)),  # as in an activated environment
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert any(line.startswith("ds-sft train: error: ") for line in lines)
    assert re.fullmatch(
        r"torchrun: ds_sft.train failed on rank [01] \(exit 2\); its own error is above", lines[-1]
    )


def test_a_python_without_torch_is_one_line():
    done = subprocess.run(
        [sys.executable, "-S", "-m", "ds_sft.torchrun", "--standalone"],  # -S: no site-packages
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (
        2,
        f"torchrun: {sys.executable} has no torch: activate the environment ds-sft is installed in\n",
    )
