"""Output folders under misuse: two runs in one folder, a finished run re-run, a file where a folder goes.

- One writer per ``--out_dir``: a second ``ds-sft train`` into a live run's folder stops in one line
  naming the holder; a lock file left by a dead process is taken over.
- A folder holding a run is continued only with ``--resume`` and replaced only with ``--overwrite``.
- The run folder never overlaps an input (data, base model, DeepSpeed config, a checkpoint of another
  folder); a folder that is not a ds-sft run's is never claimed; ``--overwrite`` removes only what a
  run wrote, never through a symlink; ``--resume`` never restarts over a run it cannot continue. Each
  refusal leaves every byte of every folder as it was (compared against a snapshot taken before).
- ``--out_dir`` / ``--out`` / ``--hf`` that cannot become a writable folder: one line, before any work,
  nothing created. :func:`ds_sft.safe_write.writable_dir` is checked against an independent reference:
  actually creating the folder and a file in it, in a twin of the same layout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from ds_sft.cli import main
from ds_sft.errors import UserError
from ds_sft.safe_write import writable_dir
from ds_sft.train.run_dir import LOCK_FILE, claim_run_dir, lock
from tests.rendezvous import without_launcher_variables

from .conftest import REPO_ROOT, single_rank_env, write_tiny_data_dir
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


def test_a_hard_linked_lock_is_taken_on_a_copy_of_its_own_and_still_guards_the_folder(tmp_path):
    """The holder line went through a hard-linked lock (a cp -al copy of a run) into the other file."""
    other = tmp_path / "notes.txt"
    other.write_text("the other copy's bytes")
    (tmp_path / "run").mkdir()
    os.link(other, tmp_path / "run" / LOCK_FILE)
    held = lock(tmp_path / "run")
    assert other.read_text() == "the other copy's bytes"
    assert os.stat(tmp_path / "run" / LOCK_FILE).st_nlink == 1
    assert f'"pid": {os.getpid()}' in (tmp_path / "run" / LOCK_FILE).read_text()
    with pytest.raises(UserError, match="in use by another training run"):
        lock(tmp_path / "run")
    held.release()


def test_unshare_gives_a_hard_linked_file_its_own_bytes_and_leaves_others_alone(tmp_path):
    from ds_sft.safe_write import unshare

    first, second, alone = tmp_path / "first", tmp_path / "second", tmp_path / "alone"
    first.write_text("shared")
    os.link(first, second)
    alone.write_text("alone")
    inode = os.stat(alone).st_ino
    unshare(second)
    unshare(alone)
    unshare(tmp_path / "missing")
    with second.open("a") as handle:
        handle.write(" and more")
    assert first.read_text() == "shared" and second.read_text() == "shared and more"
    assert os.stat(alone).st_ino == inode  # a file with one name is written in place, not copied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "first", "second"]


def test_a_replaced_file_whose_writer_fails_keeps_its_old_bytes_and_no_temporary(tmp_path):
    from ds_sft.safe_write import replace_file

    path = tmp_path / "model.safetensors"
    path.write_text("old")

    def fails(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_file(path, fails)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


# mark() in a process whose writes past 16 bytes the kernel refuses (EFBIG), as a disk that fills
MARK_LIMITED = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))
from ds_sft.train.run_dir import mark
try:
    mark(Path(sys.argv[1]))
except OSError as err:
    sys.exit(err.errno)
"""


def test_a_run_marker_whose_write_fails_leaves_nothing_that_blocks_the_next_run(tmp_path):
    """A disk that filled while the marker was written left a partial marker, and every later run
    into the folder was refused: "not empty and not a ds-sft run folder (it holds .lock,
    ds_sft_run.json)". The marker appears whole or not at all."""
    import errno

    from ds_sft.train.run_dir import LOCK_FILE, MARKER, check_is_run_folder, is_marked, mark

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("")  # as claim leaves it: the lock is taken before the marker
    said = subprocess.run([sys.executable, "-c", MARK_LIMITED, str(run_dir)], cwd=REPO_ROOT, check=False)
    assert said.returncode == errno.EFBIG
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    check_is_run_folder(run_dir)  # a fresh folder still
    mark(run_dir)
    assert is_marked(run_dir) and sorted(p.name for p in run_dir.iterdir()) == sorted([LOCK_FILE, MARKER])


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
        deadline = time.monotonic() + 600  # only a hang reaches it: a busy machine starts a trainer slowly
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
    assert first.returncode == 143, first_err[-3000:]  # saved, then stopped as SIGTERM asked
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


@pytest.mark.parametrize("character", ["\n", "\r", "\x1b", "\t", "\x7f", "\u2028"])
@pytest.mark.parametrize("flag", ["--out_dir", "--out", "--hf", "--output_dir"])
def test_an_output_name_with_a_control_character_is_refused_before_any_work(
    data, tmp_path, capsys, flag, character
):
    """--out_dir $'runs/nl\\nwarning: ok' made that folder, and every line naming it ("final fp32
    weights:", "report:", "saved checkpoint") printed a second line that read as ds-sft's own."""
    out = tmp_path / f"runs{character}warning: all good"
    try:
        code = main([*_commands(data, tmp_path)[flag], flag, str(out)])
    except SystemExit as parser_exit:  # the flag's parser refused it
        code = parser_exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.strip().splitlines()
    # a C0/C1 control or DEL is refused with every flag's value, as it is parsed; the rest by the name
    by_parser = f"error: argument {flag}: {str(out)!r} holds a control character"
    assert by_parser in line or f"error: {flag} {str(out)!r}: the name holds a control character" in line
    assert (by_parser in line) == (character != "\u2028"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- whose folder it is


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind and bytes (a symlink: its target), never following one.
    The lock file's contents are left out: a claim rewrites them (its holder), and they are ds-sft's."""
    found = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("folder",)
            else:
                found[rel] = ("file", None if name == LOCK_FILE else path.read_bytes())
    return found


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank process group in this process: what claim_run_dir broadcasts its verdict over."""
    from ds_sft.train.distributed import init_distributed

    for key, value in single_rank_env().items():
        if key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TORCH_EXTENSIONS_DIR"):
            os.environ.setdefault(key, value)
    return init_distributed()


@pytest.fixture(scope="module")
def genuine_run(data, tmp_path_factory):
    """A finished run of two steps, checkpointed at both: the folder every test below copies."""
    out = tmp_path_factory.mktemp("genuine") / "run"
    done = run(train_flags(data, out, 2, "--save_interval", "1"), single_rank_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def copy_run(genuine_run: Path, where: Path) -> Path:
    return Path(shutil.copytree(genuine_run, where, symlinks=True))


def test_a_whole_run_writes_only_what_the_run_folder_layout_names(genuine_run):
    """The layout run_dir.py checks and removes is the one train writes (plots included)."""
    from ds_sft.train.run_dir import RUN_FILES, RUN_FOLDERS, check_is_run_folder, is_marked, removable

    names = {path.name for path in genuine_run.iterdir()}
    assert (
        names <= RUN_FILES | RUN_FOLDERS and {"final", "checkpoints", "metrics.jsonl", "report.md"} <= names
    )
    assert is_marked(genuine_run)
    check_is_run_folder(genuine_run)
    ckpt = genuine_run / "checkpoints"
    expected = {genuine_run / "final", genuine_run / "metrics.jsonl", *ckpt.iterdir()}
    expected |= {genuine_run / name for name in names if name.endswith(".png") or name == "report.md"}
    assert set(removable(genuine_run)) == expected


# Inputs of a run, each as (flag, a folder or file of the test's making).
INPUTS = ["--data_dir", "--base_model (a run folder)", "--base_model (a file)", "--deepspeed_config",
          "--resume (a checkpoint of another folder)"]  # fmt: skip
RELATIONS = ["is", "lies inside", "holds", "holds, through a symlink", "is, through a symlink", "apart"]
# A run folder can hold a file, or stand apart from it, but neither be one nor lie inside one.
FILE_INPUTS = ("--base_model (a file)", "--deepspeed_config")
HOLDS_OR_APART = ("holds", "holds, through a symlink", "apart")
OVERLAPS = [(kind, relation) for kind in INPUTS for relation in RELATIONS
            if kind not in FILE_INPUTS or relation in HOLDS_OR_APART]  # fmt: skip


def _input(kind: str, place: Path, data: Path, genuine_run: Path) -> tuple[str, Path]:
    flag = kind.split()[0]
    if flag == "--data_dir":
        return flag, Path(shutil.copytree(data, place / "data"))
    if kind == "--base_model (a run folder)":
        return flag, copy_run(genuine_run, place / "base")
    if kind == "--base_model (a file)":
        folder = copy_run(genuine_run, place / "base")
        return flag, folder / "final" / "model.safetensors"
    if flag == "--deepspeed_config":
        (place / "cfg").mkdir()
        return flag, Path(shutil.copy(REPO_ROOT / "ds_configs" / "zero2.json", place / "cfg" / "ds.json"))
    tag = sorted((genuine_run / "checkpoints").glob("step_*"))[-1]
    return flag, Path(shutil.copytree(tag, place / "ckpt" / tag.name))


def _out_dir(relation: str, path: Path, root: Path) -> Path:
    """The --out_dir standing in ``relation`` to the input ``path``."""
    if relation == "is":
        return path
    if relation == "lies inside":
        return path / "sub" / "run"
    if relation == "holds":
        return path.parent
    if relation == "holds, through a symlink":
        (root / "link").symlink_to(path.parent)
        return root / "link"
    if relation == "is, through a symlink":
        (root / "link").symlink_to(path)
        return root / "link"
    return root / "apart" / "run"


class WorkStarted(Exception):
    pass


@pytest.mark.parametrize(("kind", "relation"), OVERLAPS)
def test_a_run_folder_overlapping_an_input_is_refused_before_anything_is_touched(
    data, genuine_run, tmp_path, capsys, monkeypatch, kind, relation
):
    """F5/F9: `cp -r run1 run8; train --base_model run8 --out_dir run8 --overwrite` deleted the only copy
    of the weights before loading them; --out_dir = --data_dir made the data dir unrecognisable."""
    import ds_sft.train.distributed

    def work(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(ds_sft.train.distributed, "init_distributed", work)
    (tmp_path / "inputs").mkdir()
    flag, path = _input(kind, tmp_path / "inputs", data, genuine_run)
    out = _out_dir(relation, path, tmp_path)
    argv = ["train", "--out_dir", str(out), "--max_iters", "2"]
    argv += [] if flag == "--data_dir" else ["--data_dir", str(data)]  # an input flag is given once
    argv += [] if kind.startswith("--base_model") else ["--model", "tiny"]
    argv += [] if flag == "--resume" else ["--overwrite"]  # the sharpest case: a run that deletes first
    argv += [flag, str(path)]
    before = snapshot(tmp_path)
    if relation == "apart":
        with pytest.raises(WorkStarted):
            main(argv)
        return
    assert main(argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"--out_dir {out} " in line and f"{flag} {path}" in line and "apart from every input" in line
    assert snapshot(tmp_path) == before


def test_the_runs_own_effective_config_may_be_passed_back(data, genuine_run, tmp_path, monkeypatch):
    """The documented way to rerun a run's settings: --deepspeed_config RUN/effective_config.json, with
    the paths given as flags (the file records them, and a config never sets them)."""
    import ds_sft.train.distributed

    def work(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(ds_sft.train.distributed, "init_distributed", work)
    out = copy_run(genuine_run, tmp_path / "run")
    argv = ["train", "--deepspeed_config", str(out / "effective_config.json"), "--resume",
            "--data_dir", str(data), "--out_dir", str(out)]  # fmt: skip
    with pytest.raises(WorkStarted):
        main(argv)


# Paths of a folder ds-sft did not make: a user's own files, some named like a run's.
USER_FILES = ["report.md", "loss.png", "lr.png", "effective_config.json", "metrics.jsonl", "notes.txt",
              "final/thesis.tex", "final/model.safetensors", "checkpoints/best/model.pt",
              "checkpoints/latest", "checkpoints/step_000001/notes", "src/main.py",
              "wandb/run.log"]  # fmt: skip


@given(files=st.sets(st.sampled_from(USER_FILES), min_size=1), extra=st.sampled_from(["", LOCK_FILE, "dir/"]))
@pytest.mark.parametrize("mode", ["fresh", "--overwrite", "--resume"])
def test_a_folder_that_is_not_a_ds_sft_run_is_never_claimed(one_rank, tmp_path_factory, mode, files, extra):
    """F4/F6: a user's folder holding report.md, loss.png, lr.png, effective_config.json, notes.txt was
    claimed and four of its files replaced; --overwrite deleted final/thesis.tex and checkpoints/best."""
    out = tmp_path_factory.mktemp("user") / "mine"
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        if not (out / name).is_dir():
            (out / name).write_text(f"the user's {name}")
    if extra:
        (out / extra).mkdir(exist_ok=True) if extra.endswith("/") else (out / extra).write_text("{}")
    before = snapshot(out)
    with pytest.raises(UserError) as refused:
        claim_run_dir(out, "auto" if mode == "--resume" else None, mode == "--overwrite")
    message = str(refused.value)
    assert (
        "\n" not in message and "not a ds-sft run folder" in message and "new or empty --out_dir" in message
    )
    assert snapshot(out) == before


# What may be added to a finished run's folder: (path, how), and whether --overwrite must then refuse
# (it would delete or write through what the run did not write) or keep it and go on.
ADDITIONS = {
    "notes.txt": ("file", "kept"),
    "eval/eval.json": ("file", "kept"),
    "checkpoints/step_000002_universal/x.pt": ("file", "kept"),
    "checkpoints/README": ("file", "kept"),
    "final/thesis.tex": ("file", "refused"),
    "final/tokenizer/notes.txt": ("file", "refused"),  # tokenizer/ too holds only what the run copied
    "checkpoints/step_000002/notes.txt": ("file", "refused"),
    "checkpoints/.partial/step_000003/x.pt": ("file", "removed"),  # a save cut short: ds-sft's
    "checkpoints/best": ("folder", "refused"),
    "report.md": ("folder", "refused"),
    "metrics.jsonl": ("symlink", "refused"),
    "final/model.safetensors": ("symlink", "refused"),
    "checkpoints/latest": ("symlink", "refused"),
    "checkpoints/step_000001": ("symlink", "refused"),
    "checkpoints/.partial/evil": ("symlink", "refused"),
    "checkpoints": ("symlink", "refused"),
    "final": ("symlink", "refused"),
}


def _add(out: Path, victim: Path, name: str, how: str) -> None:
    path = out / name
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "file":
        path.write_text(f"the user's {name}")
    elif how == "folder":
        (path / "mine").mkdir(parents=True)
        (path / "mine" / "data").write_text("the user's")
    else:  # to the victim's copy of what was there, so a run would read and write through it
        path.symlink_to(victim / name.replace("/", "_"))


def additions(*outcomes: str):
    """Sets of the additions that lead to one of ``outcomes``."""
    return st.sets(st.sampled_from(sorted(name for name, (_, then) in ADDITIONS.items() if then in outcomes)))


@given(harmless=additions("kept", "removed"), blocking=st.one_of(st.just(set()), additions("refused")))
def test_overwrite_removes_only_what_the_run_wrote(
    one_rank, genuine_run, tmp_path_factory, harmless, blocking
):
    """F6: whatever is added to a finished run, --overwrite deletes nothing but the run's own files,
    never through a symlink, and refuses when what it would remove holds anything else."""
    added = harmless | blocking
    root = tmp_path_factory.mktemp("overwrite")
    out = copy_run(genuine_run, root / "run")
    victim = root / "victim"
    victim.mkdir()
    for name in sorted(added):
        if ADDITIONS[name][0] == "symlink":
            source = genuine_run / name
            target = victim / name.replace("/", "_")
            if source.is_dir():
                shutil.copytree(source, target)
            elif source.exists():
                shutil.copy(source, target)
            else:
                target.mkdir()
    for name in sorted(added, key=lambda n: -n.count("/")):  # a folder's symlink last
        _add(out, victim, name, ADDITIONS[name][0])
    before, victim_before = snapshot(out), snapshot(victim)
    refused = any(ADDITIONS[name][1] == "refused" for name in added)
    event("refused" if refused else "replaced")  # both outcomes are drawn (--hypothesis-show-statistics)
    if refused:
        with pytest.raises(UserError) as err:
            claim_run_dir(out, None, overwrite=True)
        assert "\n" not in str(err.value) and "--out_dir" in str(err.value)
        assert snapshot(out) == before and snapshot(victim) == victim_before
        return
    claim_run_dir(out, None, overwrite=True).release()
    after = snapshot(out)
    assert snapshot(victim) == victim_before
    kept = [name for name in added if ADDITIONS[name][1] == "kept"]
    assert all(after[name] == before[name] for name in kept)
    # of the old run's files nothing is left: only the kept additions (and the folders holding them)
    kept_paths = {"/".join(name.split("/")[:i]) for name in kept for i in range(1, name.count("/") + 2)}
    assert {name for name in after if is_old_run(name)} == {name for name in kept_paths if is_old_run(name)}


# Files in checkpoints/'s scratch folders: (path, whether --overwrite may delete it). ds-sft's own are
# named as a save or a universal conversion names its files, whichever ds-sft version left them.
SCRATCH_FILES = {
    "checkpoints/.partial/step_000003/mp_rank_00_model_states.pt": True,  # a save cut short
    "checkpoints/.partial/step_000003/trainer_state.json.tmp": True,
    "checkpoints/.partial/zero_to_fp32.py": True,
    "checkpoints/.replaced/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": True,  # killed mid-replace
    "checkpoints/.universal-ab12/latest_universal": True,  # a conversion killed before its removal
    "checkpoints/.universal-ab12/step_000002/zero/wte.weight/exp_avg.pt": True,
    "checkpoints/.universal-ab12/step_000002/tmp/wte.weight/0/exp_avg.00": True,
    "checkpoints/.partial/notes.txt": False,
    "checkpoints/.partial/step_000003/notes.txt": False,
    "checkpoints/.replaced/thesis.tex": False,
    "checkpoints/.universal-backup/thesis.txt": False,
    "checkpoints/.universal-backup/step_000002/README": False,
}


@pytest.mark.parametrize("name", SCRATCH_FILES)
def test_overwrite_deletes_a_scratch_folder_only_when_it_holds_ds_sfts_files(
    one_rank, genuine_run, tmp_path, name
):
    """F11: --overwrite deleted checkpoints/.partial, .replaced and .universal-* whatever they held (a
    user's thesis in .universal-backup/ went without a word). Now a file of another name refuses it."""
    out = copy_run(genuine_run, tmp_path / "run")
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("someone's")
    before = snapshot(out)
    if SCRATCH_FILES[name]:
        claim_run_dir(out, None, overwrite=True).release()
        assert not (out / "checkpoints").exists()  # the old run's checkpoints/ went whole
        return
    with pytest.raises(UserError) as refused:
        claim_run_dir(out, None, overwrite=True)
    message = str(refused.value)
    assert "\n" not in message and name.split("/", 1)[1] in message and "--out_dir" in message, message
    assert snapshot(out) == before


# Where a run writes inside final/ (weights, config, listing, tokenizer copy): each replaced by a link.
FINAL_LINKS = ["final/model_config.json", "final/ds_sft_files.json", "final/model.safetensors",
               "final/tokenizer", "final/tokenizer/tokenizer.json"]  # fmt: skip


@pytest.mark.parametrize("name", FINAL_LINKS)
@pytest.mark.parametrize("mode", ["--resume", "--overwrite"])
def test_a_symlink_in_final_is_refused_whatever_the_run_would_do(one_rank, genuine_run, tmp_path, name, mode):
    """--resume checked final/ for nothing and wrote the new final weights through its symlinks: a
    file outside the run held the model config afterwards."""
    out = copy_run(genuine_run, tmp_path / "run")
    victim = tmp_path / "victim"
    (victim / "folder").mkdir(parents=True)
    (victim / "file").write_text("the user's")
    path = out / name
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(victim / ("folder" if name == "final/tokenizer" else "file"))
    before = snapshot(out), snapshot(victim)
    with pytest.raises(UserError, match=f"{name} is a symlink, where a run writes only files") as err:
        claim_run_dir(out, "auto" if mode == "--resume" else None, overwrite=mode == "--overwrite")
    assert "\n" not in str(err.value)
    assert (snapshot(out), snapshot(victim)) == before


def is_old_run(name: str) -> bool:
    """Whether a path of the run folder is (or is inside) one that a finished run leaves."""
    top = name.split("/")[0]
    return top in ("final", "checkpoints", "metrics.jsonl", "report.md") or top.endswith(".png")


# A run folder's states, and what --resume (alone, or naming a tag here or elsewhere) may do there.
STATES = ["missing", "fresh run folder", "checkpoints intact", "finished, checkpoints deleted",
          "stopped before its first checkpoint", "checkpoints copied into a new folder"]  # fmt: skip
RESUMES = ["alone", "a tag of this folder", "a tag of another folder"]
CONTINUES = {  # (state, resume) -> may it go on (a fresh start where there is nothing to continue)
    ("missing", "alone"): True,
    ("missing", "a tag of another folder"): True,
    ("fresh run folder", "alone"): True,
    ("fresh run folder", "a tag of another folder"): True,
    ("checkpoints intact", "alone"): True,
    ("checkpoints intact", "a tag of this folder"): True,
    ("checkpoints intact", "a tag of another folder"): False,  # would mix two runs' checkpoints
    ("finished, checkpoints deleted", "alone"): False,  # would restart from step 0 over final/ and metrics
    ("finished, checkpoints deleted", "a tag of another folder"): False,
    ("stopped before its first checkpoint", "alone"): False,
    ("stopped before its first checkpoint", "a tag of another folder"): False,
    ("checkpoints copied into a new folder", "alone"): True,
    ("checkpoints copied into a new folder", "a tag of this folder"): True,
    ("checkpoints copied into a new folder", "a tag of another folder"): False,
}


def _state(genuine_run: Path, out: Path, state: str) -> None:
    if state == "missing":
        return
    if state == "checkpoints copied into a new folder":
        shutil.copytree(genuine_run / "checkpoints", out / "checkpoints")
        return
    copy_run(genuine_run, out)
    if state == "fresh run folder":
        for name in (
            "final",
            "checkpoints",
            "metrics.jsonl",
            "report.md",
            *(p.name for p in out.glob("*.png")),
        ):
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    elif state == "finished, checkpoints deleted":
        shutil.rmtree(out / "checkpoints")
    elif state == "stopped before its first checkpoint":
        shutil.rmtree(out / "checkpoints")
        shutil.rmtree(out / "final")


@pytest.mark.parametrize(("state", "resume"), sorted(CONTINUES))
def test_resume_continues_a_run_or_starts_a_fresh_folder_and_refuses_the_rest(
    one_rank, genuine_run, tmp_path, state, resume
):
    """F12: --resume on a finished run whose checkpoints/ was deleted restarted at step 0, rewrote
    final/ and appended duplicate steps to its metrics.jsonl."""
    out = tmp_path / "run"
    _state(genuine_run, out, state)
    tag = sorted((genuine_run / "checkpoints").glob("step_*"))[0].name
    other = copy_run(genuine_run, tmp_path / "other")
    spec = {"alone": "auto", "a tag of this folder": str(out / "checkpoints" / tag),
            "a tag of another folder": str(other / "checkpoints" / tag)}[resume]  # fmt: skip
    before = snapshot(tmp_path)
    if CONTINUES[(state, resume)]:
        claim_run_dir(out, spec, overwrite=False).release()
        after = snapshot(tmp_path)
        assert {k: v for k, v in after.items() if k in before} == before  # nothing changed, a marker added
        return
    with pytest.raises(UserError) as refused:
        claim_run_dir(out, spec, overwrite=False)
    message = str(refused.value)
    assert "\n" not in message and "holds a training run" in message and "--out_dir" in message
    assert snapshot(tmp_path) == before


@pytest.mark.multiproc
def test_resume_of_a_finished_run_without_checkpoints_is_refused_end_to_end(
    data, genuine_run, tmp_path, ds_env
):
    out = copy_run(genuine_run, tmp_path / "run")
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    done = run(train_flags(data, out, 4, "--resume"), ds_env)
    (line,) = error_lines(done.stderr)
    assert done.returncode == 2 and "no checkpoint to continue it from" in line and "--overwrite" in line
    assert snapshot(out) == before


def every_byte(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` with its bytes (the lock file's too) and every folder, never following."""
    found = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[(Path(folder) / name).relative_to(root).as_posix()] = "folder"
        for name in filenames:
            path = Path(folder) / name
            found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


@pytest.mark.multiproc
@pytest.mark.parametrize("how", ["--resume", "--overwrite"])
def test_a_hard_linked_copy_of_a_run_is_continued_or_replaced_without_touching_the_original(
    data, genuine_run, tmp_path, ds_env, how
):
    """``cp -al`` (every file a hard link: how rsnapshot and a quick backup copy a run) shares each file
    with the original: a run that wrote in place (appended metrics.jsonl, truncated the lock, rewrote
    effective_config.json, report.md, the plots and final/) wrote into the original as well."""
    original = copy_run(genuine_run, tmp_path / "original")
    linked = Path(shutil.copytree(original, tmp_path / "linked", copy_function=os.link))
    assert os.stat(linked / "metrics.jsonl").st_ino == os.stat(original / "metrics.jsonl").st_ino
    before = every_byte(original)
    done = run(train_flags(data, linked, 4, how), ds_env)
    assert done.returncode == 0, done.stderr[-3000:]
    after = every_byte(original)
    assert sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name)) == []
    assert max(record["step"] for record in train_records(linked)) == 4  # the copy did go on


def test_resuming_an_earlier_checkpoint_names_the_later_ones_its_first_save_deletes(data, tmp_path, ds_env):
    """Resuming step 2 of a run that saved steps 2 and 4 deleted step 4 at the first save without a
    word (it is the other branch's). The resume now names it, before any step runs."""
    out = tmp_path / "run"
    first = run(train_flags(data, out, 4, "--save_interval", "2"), ds_env)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = out / "checkpoints"
    branched = run(train_flags(data, out, 3, "--resume", str(checkpoints / "step_000002")), ds_env)
    assert branched.returncode == 0, branched.stderr[-3000:]
    (note,) = [line for line in branched.stdout.splitlines() if "this run's first save deletes" in line]
    assert f"{checkpoints} also holds step_000004, saved after step 2" in note
    lines = branched.stdout.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert lines.index(note) < first_step  # said before any step, so before the save that deletes
    assert not (checkpoints / "step_000004").exists() and (checkpoints / "step_000003").is_dir()
    again = run(train_flags(data, out, 4, "--resume"), ds_env)  # the latest: nothing later to name
    assert again.returncode == 0 and "first save deletes" not in again.stdout, again.stderr[-3000:]


def test_the_report_of_a_branched_run_reads_only_its_own_branch(data, tmp_path, ds_env):
    """A run of 4 steps resumed from its step 2 to end at step 3: the report said "finished at step 3"
    beside step 4's loss and MFU, and drew steps 3-4 of the branch it left."""
    from ds_sft.train.report import read_records

    out = tmp_path / "run"
    first = run(train_flags(data, out, 4, "--save_interval", "2"), ds_env)
    assert first.returncode == 0, first.stderr[-3000:]
    branched = run(train_flags(data, out, 3, "--resume", str(out / "checkpoints" / "step_000002")), ds_env)
    assert branched.returncode == 0, branched.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["type"] == "train"] == [1, 2, 3, 4, 3]  # both branches are there
    records = read_records(out)[0]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and train[-1] == [
        r for r in logged if r["type"] == "train"
    ][-1]
    assert max(r["step"] for r in records) == 3
    assert f"| train loss (last step) | {train[-1]['loss']:.4f} |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("content", "taken"),
    [
        (b"", True),
        (b'{"pid": 12, "host": "node", "started": "2026-12-05 20:00:00"}\n', True),
        (b'{"pid": 12, "ho', True),  # cut short by a full disk
        (b"my notes about this folder\n", False),
        (b'{"owner": "another tool"}', False),
        (b"[1, 2]", False),
        (b"\xff\xfe", False),
    ],  # fmt: skip
)
def test_a_folder_holding_only_a_lock_file_is_fresh_only_if_the_lock_is_ds_sfts(tmp_path, content, taken):
    """A user's own .lock (notes, another tool's lock) alone in --out_dir was taken for a fresh run's,
    and the claim wrote its holder line over it."""
    from ds_sft.train.run_dir import check_is_run_folder

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_bytes(content)
    if taken:
        check_is_run_folder(tmp_path / "run")
    else:
        with pytest.raises(UserError, match="is not empty and not a ds-sft run folder"):
            check_is_run_folder(tmp_path / "run")
    assert (tmp_path / "run" / LOCK_FILE).read_bytes() == content


@pytest.mark.parametrize(
    "inside", ["checkpoints/step_000099", "checkpoints", "final/mine", "checkpoints/a/b"]
)
def test_an_out_dir_inside_another_runs_own_folders_is_refused(data, genuine_run, tmp_path, capsys, inside):
    """A run made at A/checkpoints/step_000099 was moved aside (step_000099.kept) by A's next resume,
    whose first save clears the tags after its own; final/ is rewritten whole by A's end."""
    other = copy_run(genuine_run, tmp_path / "A")
    before = snapshot(other)
    out = other / inside
    assert main(["train", "--data_dir", str(data), "--model", "tiny", "--out_dir", str(out)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    own = inside.split("/")[0]
    assert f"--out_dir {out} lies inside {other / own}, the {own}/ folder of the run in {other}" in line
    assert snapshot(other) == before


def test_a_run_marker_is_written_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    """The marker is linked into place; vfat and many FUSE mounts refuse links (EPERM), and every new
    run there failed with "Operation not permitted"."""
    import errno

    from ds_sft.train.run_dir import MARKER, is_marked, mark

    def refused(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", refused)
    (tmp_path / "run").mkdir()
    mark(tmp_path / "run")
    assert is_marked(tmp_path / "run") and [p.name for p in (tmp_path / "run").iterdir()] == [MARKER]


def _socket(path: Path):
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


@pytest.mark.parametrize(
    ("make", "named"),
    [(os.mkfifo, "a FIFO (named pipe)"), (_socket, "a socket"), (lambda p: p.mkdir(), "a folder")],
    ids=["fifo", "socket", "folder"],
)
@pytest.mark.parametrize("entry", ["metrics.jsonl", "checkpoints/latest"])
def test_what_is_where_a_run_writes_a_file_is_named_for_what_it_is(tmp_path, entry, make, named):
    """A FIFO or socket where a run writes a file was named 'a special' ("metrics.jsonl is a special,
    where a run writes a file"); it is named by the one table of file kinds (safe_read.describe_mode)."""
    from ds_sft.train.run_dir import wrong_kinds

    (tmp_path / "checkpoints").mkdir()
    make(tmp_path / entry)
    assert wrong_kinds(tmp_path) == [f"{entry} is {named}, where a run writes a file"]
