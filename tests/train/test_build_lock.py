"""Torch extension build locks (``ds_sft/train/build_lock.py``): one left by a killed build never hangs a
run, one that may be live is never removed, and builders on one machine still build one at a time.

The runs here are real: a process killed in the middle of DeepSpeed's JIT build of its CPU comm op (at
the point where ninja would compile), then a tiny ``python -m ds_sft.train`` in the same
TORCH_EXTENSIONS_DIR; and two processes building one small extension with torch's own
``cpp_extension.load`` at once. The op is copied in prebuilt (the suite's cache) so that no test pays
for its compile.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ds_sft.train import build_lock
from ds_sft.train.build_lock import BUILD_LOCK, OwnedBaton, owned_batons, record, take_turn, this_kernel
from tests.rendezvous import without_launcher_variables
from tests.train.helpers import REPO_ROOT, write_data_dir

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SHM_OP = "deepspeed_shm_comm"
TRAIN_FLAGS = [
    "--model", "tiny", "--precision", "fp32", "--micro_batch_size", "2", "--grad_accum", "1",
    "--max_iters", "1", "--eval_interval", "1", "--eval_iters", "1", "--wandb_mode", "disabled",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture
def extensions(tmp_path) -> Path:
    """A TORCH_EXTENSIONS_DIR of this test's own, holding the suite's build of the comm op (without any
    lock: a copy cannot be anyone's build in progress)."""
    root = tmp_path / "torch_extensions"
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / SHM_OP
    if (built / f"{SHM_OP}.so").is_file():
        shutil.copytree(built, root / SHM_OP, ignore=shutil.ignore_patterns("lock", BUILD_LOCK))
    else:
        root.mkdir()  # the first run here builds it
    return root


def environment(extensions: Path) -> dict[str, str]:
    env = without_launcher_variables()
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return env


def train(data_dir: Path, out_dir: Path, extensions: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "ds_sft.train", "--data_dir", str(data_dir), "--out_dir", str(out_dir)]
    return subprocess.Popen(
        [*command, *TRAIN_FLAGS], env=environment(extensions), cwd=REPO_ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def lines_of(process: subprocess.Popen) -> queue.Queue:
    """The process's output, line by line, as it comes (None at its end)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def output_until(process: subprocess.Popen, seconds: float, wanted: str | None = None) -> tuple[str, bool]:
    """The output of ``process`` until it ends, or a line holds ``wanted``, or ``seconds`` pass (then the
    process is killed). Returns (output, whether it stopped by itself or showed ``wanted``)."""
    lines, seen, deadline = lines_of(process), [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            process.wait()
            return "".join(seen), True
        seen.append(line)
        if wanted is not None and wanted in line:
            process.kill()
            process.wait()
            return "".join(seen), True
    process.kill()
    process.wait()
    return "".join(seen), False


# Killed in the middle of the comm op's build, as Ctrl-C or a Slurm time limit does it: torch's build
# step (ninja) is where a real build spends its time, so the kill comes there.
KILLED_MID_BUILD = """
import os, signal
import torch.utils.cpp_extension as cpp_extension

def killed_mid_build(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

cpp_extension._write_ninja_file_and_build_library = killed_mid_build
from ds_sft.train.distributed import init_distributed
init_distributed()
"""


def test_a_build_lock_left_by_a_killed_run_is_cleared_and_the_next_train_runs(data_dir, extensions, tmp_path):
    """The next `ds-sft train` waited forever on the killed build's lock, printing nothing."""
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_BUILD], env=environment(extensions), cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    baton = extensions / SHM_OP / "lock"
    assert baton.is_file()  # what the killed build left

    output, ended = output_until(train(data_dir, tmp_path / "run", extensions), seconds=400)
    assert ended, f"the train still waited after 400 s:\n{output[-2000:]}"
    assert f"note: removed {baton}, left by ds-sft pid" in output, output[-2000:]
    assert "step      1/1" in output, output[-2000:]
    assert not baton.exists()


def test_a_lock_ds_sft_did_not_write_is_kept_and_named_in_one_line(data_dir, extensions, tmp_path):
    """A lock made by hand (or by torch's own builds, another program, an older ds-sft) may be a live
    build: the run waits, but says within seconds which file and how to clear it, and deletes nothing."""
    baton = extensions / SHM_OP / "lock"
    baton.parent.mkdir(exist_ok=True)
    baton.touch()
    limit = build_lock.OTHER_BATON_NOTICE_S + 120  # the notice, after the imports and the data checks
    output, shown = output_until(train(data_dir, tmp_path / "run", extensions), limit, wanted=f"rm '{baton}'")
    assert shown, f"no line naming the lock within {limit} s:\n{output[-2000:]}"
    line = next(line for line in output.splitlines() if f"rm '{baton}'" in line)
    assert line.startswith(f"warning: waiting for {baton}, a torch extension build lock that names no maker")
    assert baton.is_file() and baton.read_text() == ""


def test_the_engine_is_built_with_owned_batons(monkeypatch):
    """deepspeed.initialize JIT-builds the ops a config asks for (CPU Adam under offload without
    torch_adam, fused Adam, async I/O): their batons are ds-sft's too. (init_distributed's are the
    killed run's above.)"""
    import deepspeed
    from torch.utils import cpp_extension

    from ds_sft.train.engine import build_engine
    from tests.train.helpers import tiny_model

    class Built(Exception):
        pass

    batons = []

    def initialize(**kwargs):
        batons.append(cpp_extension.FileBaton)
        raise Built

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    with pytest.raises(Built):
        build_engine(tiny_model(), {}, 0.0)
    assert batons == [OwnedBaton]


# ------------------------------------------------------------------------------------------ the baton


def stale_record(**changes) -> str:
    """The record a ds-sft maker killed on this machine leaves, with ``changes``."""
    record = {"maker": "ds-sft", "pid": 2**22 + 1, "host": "here", "boot": this_kernel(), "started": "then"}
    return json.dumps({**record, **changes}) + "\n"


ORPHANED = stale_record()
NOT_JUDGED = {
    "empty (torch's own baton)": "",
    "another machine's ds-sft": stale_record(boot="another-kernel"),
    "another maker": stale_record(maker="other"),
    "no maker": json.dumps({"pid": 1, "boot": this_kernel()}),
    "not a record": "12345\n",
    "a list": json.dumps([ORPHANED]),
    "bytes that are not text": "\udcff",
    "a record cut short": ORPHANED[:40],
    "nested past json.loads' recursion": "[" * 3000,
    "a record with its key twice": ORPHANED.replace("{", '{"maker": "other", ', 1),
}


def test_a_baton_ds_sft_made_on_this_machine_in_a_turn_no_one_holds_is_replaced_by_ours(tmp_path):
    baton = tmp_path / "lock"
    baton.write_text(ORPHANED)
    mine = OwnedBaton(str(baton))
    assert mine.try_acquire()
    try:
        assert json.loads(baton.read_text())["pid"] == os.getpid()
    finally:
        mine.release()
    assert not baton.exists()


@pytest.mark.parametrize("contents", NOT_JUDGED.values(), ids=NOT_JUDGED.keys())
def test_a_baton_ds_sft_cannot_judge_is_waited_for_and_kept(contents, tmp_path, monkeypatch, capsys):
    baton = tmp_path / "lock"
    baton.write_text(contents, errors="surrogateescape")
    before = baton.read_bytes()
    mine = OwnedBaton(str(baton))
    assert not mine.try_acquire()
    assert baton.read_bytes() == before
    monkeypatch.setattr(build_lock, "OTHER_BATON_NOTICE_S", 0.0)
    gone = threading.Timer(1.0, baton.unlink)
    gone.start()
    mine.wait()  # returns once the file is gone, as torch's
    gone.join()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: waiting for {baton}, a torch extension build lock ")
    assert line.endswith(f"remove it: rm '{baton}'")


def turn_is_free(folder: Path) -> bool:
    fd = os.open(folder / BUILD_LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("failing_write", ["the turn's record", "the baton's record"])
def test_a_record_that_cannot_be_written_leaves_no_baton_and_no_turn_held(
    failing_write, tmp_path, monkeypatch
):
    """A full disk: a turn left held stops every later build; a baton made but not named hangs the next
    run (an empty baton is never removed)."""
    writes = []

    def full_disk_at_last():
        writes.append(1)
        if len(writes) == ["the turn's record", "the baton's record"].index(failing_write) + 1:
            raise OSError(28, "No space left on device")
        return record()

    monkeypatch.setattr(build_lock, "record", full_disk_at_last)
    baton = tmp_path / "lock"
    with pytest.raises(OSError, match="No space left"):
        OwnedBaton(str(baton)).try_acquire()
    assert not baton.exists()
    assert turn_is_free(tmp_path)


def test_a_symlink_named_lock_is_neither_followed_nor_removed(tmp_path):
    target = tmp_path / "theirs.txt"
    target.write_text(ORPHANED)
    (tmp_path / "build").mkdir()
    baton = tmp_path / "build" / "lock"
    baton.symlink_to(target)
    assert not OwnedBaton(str(baton)).try_acquire()
    assert baton.is_symlink() and target.read_text() == ORPHANED


TURN_HOLDER = """
import sys, time
from ds_sft.train.build_lock import OwnedBaton
baton = OwnedBaton(sys.argv[1])
assert baton.try_acquire()
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
baton.release()
"""


def test_a_live_builders_baton_is_waited_for_in_turn_never_removed(tmp_path, monkeypatch, capsys):
    """A process that holds its turn is building: the next waits for the turn (saying whose it is once
    that is long), and then finds the baton gone, removed by its maker."""
    baton = tmp_path / "lock"
    command = [sys.executable, "-c", TURN_HOLDER, str(baton), "3"]
    holder = subprocess.Popen(command, env=environment(tmp_path), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    made = baton.read_text()
    monkeypatch.setattr(build_lock, "TURN_NOTICE_S", 0.5)
    mine = OwnedBaton(str(baton))
    assert mine.try_acquire()  # after the holder's release: its baton was never judged
    assert holder.wait(timeout=60) == 0
    try:
        assert json.loads(made)["pid"] == holder.pid
    finally:
        mine.release()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"note: waiting for pid {holder.pid} on ")
    assert line.endswith(f"to finish building the torch extension in {tmp_path}")


def test_without_flock_the_baton_is_torchs_own_and_judged_by_no_one(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(build_lock.fcntl, "flock", no_flock)
    baton = tmp_path / "lock"
    baton.write_text(ORPHANED)  # a turn cannot be had, so a record proves nothing
    assert not OwnedBaton(str(baton)).try_acquire()
    assert baton.read_text() == ORPHANED
    baton.unlink()
    mine = OwnedBaton(str(baton))
    assert mine.try_acquire()
    assert baton.read_text() == ""  # torch's: a later process cannot tell it from a live one's
    mine.release()
    assert take_turn(str(tmp_path)) is None


def test_torch_makes_its_own_baton_again_after_the_block_even_when_it_raised():
    from torch.utils import cpp_extension

    before = cpp_extension.FileBaton
    with pytest.raises(RuntimeError), owned_batons():
        assert cpp_extension.FileBaton is OwnedBaton
        raise RuntimeError
    assert cpp_extension.FileBaton is before


# ------------------------------------------------------------------------------ builders at one time

# torch's own load of a small extension, its build step (ninja) logged and slowed to a second
BUILDER = """
import json, sys, time
import torch.utils.cpp_extension as cpp_extension
from ds_sft.train.build_lock import owned_batons

build = cpp_extension._write_ninja_file_and_build_library
log = sys.argv[2]

def logged_build(*args, **kwargs):
    with open(log, "a") as out:
        out.write(json.dumps({"pid": __import__("os").getpid(), "start": time.time()}) + "\\n")
    time.sleep(1.0)
    build(*args, **kwargs)
    with open(log, "a") as out:
        out.write(json.dumps({"pid": __import__("os").getpid(), "end": time.time()}) + "\\n")

cpp_extension._write_ninja_file_and_build_library = logged_build
with owned_batons():
    cpp_extension.load(name="ds_sft_probe", sources=[sys.argv[1]], is_python_module=False)
print("loaded", flush=True)
"""


def test_two_processes_building_one_extension_build_one_at_a_time(tmp_path):
    """Ranks on one node share the folder: one builds while the other waits, and both load the op."""
    source = tmp_path / "probe.cpp"
    source.write_text('extern "C" int ds_sft_probe() { return 7; }\n')
    log = tmp_path / "builds.jsonl"
    env = environment(tmp_path / "torch_extensions")
    builders = [
        subprocess.Popen([sys.executable, "-c", BUILDER, str(source), str(log)], env=env, cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [builder.communicate(timeout=300)[0] for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0], outputs
    assert all(output.rstrip().endswith("loaded") for output in outputs), outputs
    spans: dict[int, dict] = {}
    for line in log.read_text().splitlines():
        event = json.loads(line)
        spans.setdefault(event["pid"], {}).update(event)
    spans_in_order = sorted(spans.values(), key=lambda span: span["start"])
    for before, after in zip(spans_in_order, spans_in_order[1:], strict=False):
        assert after["start"] >= before["end"], spans_in_order  # begun once the build before it ended
    assert not (tmp_path / "torch_extensions" / "ds_sft_probe" / "lock").exists()
