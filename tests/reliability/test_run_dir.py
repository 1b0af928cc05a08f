"""Output folders under misuse: two runs in one folder, a finished run re-run, a file where a folder goes.

- One writer per ``--out_dir``: a second ``ds-sft train`` into a live run's folder stops in one line
  naming the holder; a lock file left by a dead process is taken over.
- A folder holding a run is continued only with ``--resume`` and replaced only with ``--overwrite``.
- ``--out_dir`` / ``--out`` / ``--hf`` that cannot become a writable folder: one line, before any work,
  nothing created. :func:`ds_sft.paths.writable_dir` is checked against an independent reference:
  actually creating the folder and a file in it, in a twin of the same layout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_sft.cli import main
from ds_sft.errors import UserError
from ds_sft.paths import writable_dir
from ds_sft.train.run_dir import LOCK_FILE, lock
from tests.rendezvous import without_launcher_variables

from .conftest import single_rank_env, write_tiny_data_dir
from .runs import launch, run, train_records

FLAGS = ["--model", "tiny", "--micro_batch_size", "2", "--grad_accum", "1", "--eval_iters", "1",
         "--wandb_mode", "disabled", "--warmup_iters", "1", "--log_interval", "100"]  # fmt: skip


def train_flags(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--data_dir", str(data), "--out_dir", str(out), "--max_iters", str(steps),
            "--save_interval", str(steps), "--eval_interval", str(steps), *FLAGS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_data_dir(tmp_path_factory.mktemp("data") / "data")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- the lock


def test_resume_and_overwrite_together_are_refused_before_any_work(data, tmp_path, capsys, monkeypatch):
    import ds_sft.train.distributed

    monkeypatch.setattr(ds_sft.train.distributed, "init_distributed", None)  # not reached
    flags = train_flags(data, tmp_path / "run", 2, "--resume", "--overwrite")
    assert main(["train", *flags]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--resume continues" in line and "--overwrite replaces" in line and "pass one" in line
    assert not (tmp_path / "run").exists()


def test_a_second_lock_on_a_live_run_is_refused_naming_the_holder(tmp_path):
    held = lock(tmp_path)
    with pytest.raises(UserError, match=rf"in use by another training run \(pid {os.getpid()} on "):
        lock(tmp_path)
    held.release()
    lock(tmp_path).release()  # free again once released


def test_a_filesystem_without_locks_runs_unguarded_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock(tmp_path).release()
    assert "warning: cannot lock" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_a_lock_file_that_is_not_a_plain_file_is_one_line_and_nothing_is_followed(tmp_path, kind):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    if kind == "symlink":
        (tmp_path / "run" / LOCK_FILE).symlink_to(victim)
    else:
        (tmp_path / "run" / LOCK_FILE).mkdir()
    with pytest.raises(UserError, match=r"cannot open .*\.lock .*remove it"):
        lock(tmp_path / "run")
    assert victim.read_text() == "precious"


@pytest.mark.multiproc
def test_two_concurrent_trainers_into_one_folder(data, ds_env, tmp_path):
    out = tmp_path / "run"
    first = launch(train_flags(data, out, 100_000), ds_env)
    try:
        deadline = time.monotonic() + 120
        while not train_records(out):  # training: the lock is held and SIGTERM means "save and stop"
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        second = run(train_flags(data, out, 4), ds_env)
    finally:
        first.send_signal(signal.SIGTERM)  # preemption: it saves and exits
        _, first_err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = error_lines(second.stderr)
    assert f"pid {first.pid} on " in line and str(out) in line and "another --out_dir" in line
    assert first.returncode == 0, first_err[-3000:]
    steps = [r["step"] for r in train_records(out)]
    assert steps == sorted(set(steps)), "two writers interleaved their metrics"


@pytest.mark.multiproc
def test_every_rank_of_a_second_run_stops_before_any_work(data, tmp_path):
    """Two ranks under torchrun: rank 0 finds the folder locked; rank 1 must stop too, not wait in a
    collective or start writing."""
    out = tmp_path / "run"
    held = lock(out)
    env = without_launcher_variables(single_rank_env())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ds_sft.train", *train_flags(data, out, 2)]  # fmt: skip
    try:
        done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    finally:
        held.release()
    (line,) = error_lines(done.stderr)  # rank 0 says it; rank 1 stops without a word
    assert done.returncode != 0 and f"pid {os.getpid()} on " in line, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


@pytest.mark.multiproc
def test_a_lock_left_by_a_dead_process_is_taken_over(data, ds_env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": "gone", "started": "yesterday"}))
    done = run(train_flags(data, out, 2), ds_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / LOCK_FILE).read_text())["pid"] != dead.pid
    assert (out / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- a finished run


@pytest.mark.multiproc
def test_a_finished_run_is_continued_or_replaced_only_when_asked(data, ds_env, tmp_path):
    out = tmp_path / "run"
    assert run(train_flags(data, out, 4), ds_env).returncode == 0
    (out / "notes.txt").write_text("the user's own file")
    (out / "checkpoints" / "step_000004_universal").mkdir()  # not written by ds-sft either
    (out / "checkpoints" / ".partial" / "step_000006").mkdir(parents=True)  # ds-sft's: a save cut short
    (out / "checkpoints" / ".replaced").mkdir()
    final = (out / "final" / "model.safetensors").read_bytes()
    before = tree(out)

    again = run(train_flags(data, out, 2), ds_env)
    assert again.returncode == 2, again.stderr[-3000:]
    (line,) = error_lines(again.stderr)
    assert "already holds a training run" in line and "--resume" in line and "--overwrite" in line
    assert tree(out) == before and (out / "final" / "model.safetensors").read_bytes() == final

    replaced = run(train_flags(data, out, 2, "--overwrite"), ds_env)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert [r["step"] for r in train_records(out)] == [1, 2]  # the old run's 4 records are gone
    # the old run's tags are gone, the folder ds-sft did not write is not
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == [
        "step_000002",
        "step_000004_universal",
    ]
    assert (out / "notes.txt").read_text() == "the user's own file"

    resumed = run(train_flags(data, out, 3, "--resume"), ds_env)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]


# ----------------------------------------------------------------------------- not a folder


def _layout(root: Path, kind: str) -> Path:
    """Build one kind of output path under ``root``; returns the path to pass as the folder."""
    if kind == "missing, deep":
        return root / "a" / "b" / "c"
    if kind == "existing folder":
        (root / "out").mkdir()
        return root / "out"
    if kind == "symlink to a folder":
        (root / "real").mkdir()
        (root / "out").symlink_to(root / "real")
        return root / "out"
    if kind == "file":
        (root / "out").write_text("x")
        return root / "out"
    if kind == "under a file":
        (root / "file").write_text("x")
        return root / "file" / "out"
    if kind == "deep under a file":
        (root / "file").write_text("x")
        return root / "file" / "a" / "b"
    if kind == "fifo":
        os.mkfifo(root / "out")
        return root / "out"
    if kind == "under a fifo":
        os.mkfifo(root / "pipe")
        return root / "pipe" / "out"
    if kind == "broken symlink":
        (root / "out").symlink_to(root / "nowhere")
        return root / "out"
    if kind == "symlink to a file":
        (root / "file").write_text("x")
        (root / "out").symlink_to(root / "file")
        return root / "out"
    if kind == "under a symlink to a file":
        (root / "file").write_text("x")
        (root / "link").symlink_to(root / "file")
        return root / "link" / "out"
    raise AssertionError(kind)


LAYOUTS = ["missing, deep", "existing folder", "symlink to a folder", "file", "under a file",
           "deep under a file", "fifo", "under a fifo", "broken symlink", "symlink to a file",
           "under a symlink to a file"]  # fmt: skip


def can_make_and_write(path: Path) -> bool:
    """The reference: really create the folder and a file in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "probe").write_text("x")
    except OSError:
        return False
    return True


@pytest.mark.parametrize("kind", LAYOUTS)
def test_writable_dir_agrees_with_really_writing_and_touches_nothing(tmp_path, kind):
    (tmp_path / "twin").mkdir()
    (tmp_path / "checked").mkdir()
    expected = can_make_and_write(_layout(tmp_path / "twin", kind))
    path = _layout(tmp_path / "checked", kind)
    before = tree(tmp_path / "checked")
    try:
        writable_dir(path, "--out")
        accepted, message = True, ""
    except UserError as err:
        accepted, message = False, str(err)
    assert accepted == expected, (kind, message)
    assert tree(tmp_path / "checked") == before
    if not accepted:
        assert "\n" not in message and message.startswith(f"--out {path}:")


@pytest.mark.parametrize("value", ["", "  ", 5, None, ["runs"]])
def test_writable_dir_refuses_what_is_not_a_path(value):
    with pytest.raises(UserError, match="pass the path of a folder"):
        writable_dir(value, "--out_dir")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root ignores permission bits, not a read-only filesystem)."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_read_only_parent_is_refused(read_only_dir):
    assert not can_make_and_write(read_only_dir / "probe_dir")
    with pytest.raises(UserError, match="cannot be written"):
        writable_dir(read_only_dir / "out" / "deeper", "--hf")


def _commands(data: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Each command with an output flag; eval's and export's model is a path that does not exist: were
    it loaded before the output check, the error would be about the model, not the folder."""
    missing = str(tmp_path / "no_model.pt")
    return {
        "--out_dir": ["train", "--data_dir", str(data), "--model", "tiny", "--max_iters", "2"],
        "--out": ["eval", "--model", missing, "--data_dir", str(data), "--no_gsm8k"],
        "--hf": ["export", "--base_model", missing, "--tokenizer", "gpt2"],
        # any regular file passes as the source: it is read only after the output folder is checked
        "--output_dir": ["prepare", "--alpaca", str(data / "manifest.json"), "--tokenizer", "gpt2"],
    }


@pytest.mark.parametrize("kind", ["file", "under a file", "fifo", "broken symlink", "deep under a file"])
@pytest.mark.parametrize("flag", ["--out_dir", "--out", "--hf", "--output_dir"])
def test_each_command_refuses_a_bad_output_folder_before_any_work(
    data, tmp_path, capsys, monkeypatch, flag, kind
):
    import ds_sft.train.distributed

    def no_work(*args, **kwargs):
        raise AssertionError("train started its work (the process group) before checking --out_dir")

    monkeypatch.setattr(ds_sft.train.distributed, "init_distributed", no_work)
    (tmp_path / "layout").mkdir()
    out = _layout(tmp_path / "layout", kind)
    before = tree(tmp_path)
    code = main([*_commands(data, tmp_path)[flag], flag, str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = error_lines(err)
    assert f"error: {flag} {out}:" in line and "pass a folder" in line, line
    assert tree(tmp_path) == before
