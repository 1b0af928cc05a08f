"""DeepSpeed's JIT builds of its C++ ops, taken in turns that a killed builder cannot block.

DeepSpeed compiles some ops the first time a process needs them (the CPU comm op when the process group
forms, CPU Adam under offload, its fused CUDA ops) with ``torch.utils.cpp_extension.load``. Torch marks
a build with a *baton*: a file ``lock`` in the op's folder under ``$TORCH_EXTENSIONS_DIR``, created
exclusively and removed when the build ends, while every other process waits for it to go. A builder
killed before it removes it (Ctrl-C, a Slurm time limit, the out-of-memory killer) leaves it behind,
and every later run waits forever without a word: the file names no one, so a dead builder looks like
a slow one.

While :func:`owned_batons` is in force, torch makes :class:`OwnedBaton` instead:

- Before making the baton, a process takes an ``flock`` on :data:`BUILD_LOCK` beside it. The kernel
  drops an flock when its process dies, however it dies, so the builders of one machine (the ranks of a
  node share the folder) take turns there: the first builds, the next find the op built.
- The baton says who made it (ds-sft, pid, host, the kernel's boot id). Holding the flock, a process
  that finds a baton ds-sft made under this kernel knows that its maker died mid-build (alive, it would
  hold the flock): it removes the baton and builds, and ninja redoes what the dead build left undone.
- Any other baton (torch's own, another program's, an older ds-sft's, one from another machine sharing
  the folder, whose flocks this kernel does not see) may belong to a live build: ds-sft waits as torch
  does and, after :data:`OTHER_BATON_NOTICE_S`, says in one line which file it waits on and how to clear it.

Triton's cache takes no lock (each file is written under a temporary name and renamed into place), and
torch.compile's caches lock with flock (the filelock package), which the kernel releases too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from torch.utils.file_baton import FileBaton

from ds_sft.json_input import JsonRefused, parse_json_object
from ds_sft.train.run_dir import holder, now

BUILD_LOCK = "ds_sft_build.lock"  # beside torch's baton, in the op's build folder
MAKER = "ds-sft"
# a turn is held by a live ds-sft (a build takes seconds to minutes: say who, once it is long)
TURN_NOTICE_S = 60.0
# a baton ds-sft cannot judge: most likely left by a killed build, so say so soon
OTHER_BATON_NOTICE_S = 10.0
RECORD_BYTES = 4096


def this_kernel() -> str:
    """The kernel this process runs under: its boot id, else (not Linux) the host name. Processes under
    one kernel see each other's flocks on any filesystem; other machines' flocks they may not see."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def record() -> str:
    """The line a ds-sft baton or build lock holds: who holds it, and under which kernel."""
    who = {"maker": MAKER, "pid": os.getpid(), "host": socket.gethostname(), "boot": this_kernel()}
    return json.dumps({**who, "started": now()}) + "\n"


def read_record(path: str) -> dict | None:
    """The record in ``path`` when ds-sft wrote it there, else None (no file, a symlink, anything else)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        found = parse_json_object(os.read(fd, RECORD_BYTES))
    except (OSError, JsonRefused):  # JsonRefused: not JSON, or nested past what json.loads survives
        return None
    finally:
        os.close(fd)
    return found if found.get("maker") == MAKER else None


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def take_turn(folder: str) -> int | None:
    """Hold the flock on ``folder``/:data:`BUILD_LOCK`, waiting while another process holds it; returns
    its descriptor (closing it ends the turn), or None where the folder's filesystem keeps no flocks."""
    path = os.path.join(folder, BUILD_LOCK)
    try:  # never through a symlink: the holder's line is written over the file's contents
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        return None  # torch's own baton then meets the same folder and says what is wrong
    started, told = time.monotonic(), False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not told and time.monotonic() - started > TURN_NOTICE_S:
                who = holder(Path(path))
                say(f"note: waiting for {who} to finish building the torch extension in {folder}")
                told = True
            time.sleep(0.1)
        except OSError:  # a filesystem without flock (some FUSE and Lustre mounts)
            os.close(fd)
            return None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record().encode(), 0)
    except BaseException:
        os.close(fd)  # a turn left held would stop every later build in this process and the others
        raise
    return fd


class OwnedBaton(FileBaton):
    """Torch's build baton, made in a turn (:func:`take_turn`) and naming its maker; see the module."""

    def __init__(self, lock_file_path, *args, **kwargs) -> None:
        super().__init__(lock_file_path, *args, **kwargs)
        self.turn = None

    def try_acquire(self) -> bool:
        self.turn = take_turn(os.path.dirname(self.lock_file_path))
        if self.turn is None:
            return super().try_acquire()  # no turns to be had: torch's unnamed baton, judged by no one
        try:
            self.remove_if_orphaned()
            self.fd = os.open(self.lock_file_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # a baton no ds-sft turn explains: wait() for it as torch would
            self.end_turn()
            return False
        except BaseException:
            self.end_turn()
            raise
        try:  # (killed before this write, it reads as torch's baton: named after a wait, not removed)
            os.write(self.fd, record().encode())
        except BaseException:
            self.release()
            raise
        return True

    def remove_if_orphaned(self) -> None:
        """Remove a baton that ds-sft made under this kernel. Called in a turn, which its maker held for
        as long as its baton was to exist: the maker is gone, and no one else removes a baton not theirs."""
        maker = read_record(self.lock_file_path)
        if maker is None or maker.get("boot") != this_kernel():
            return
        os.remove(self.lock_file_path)
        say(
            f"note: removed {self.lock_file_path}, left by ds-sft pid {maker.get('pid')} on "
            f"{maker.get('host')}, which was stopped while building it; building again"
        )

    def wait(self) -> None:
        started, told = time.monotonic(), False
        while os.path.exists(self.lock_file_path):
            if not told and time.monotonic() - started > OTHER_BATON_NOTICE_S:
                say(waiting_line(self.lock_file_path))
                told = True
            time.sleep(self.wait_seconds)

    def release(self) -> None:
        try:
            super().release()  # removes the baton, still in the turn: a waiter never sees it half-gone
        finally:
            self.end_turn()

    def end_turn(self) -> None:
        if self.turn is not None:
            os.close(self.turn)  # closing drops the flock
            self.turn = None


def waiting_line(baton: str) -> str:
    """The one line for a wait on a baton ds-sft cannot judge: whose it is, and how to clear it."""
    maker = read_record(baton)
    if maker is None:
        whose = "that names no maker (torch's own, another program's, or an older ds-sft's)"
    else:
        whose = f"made by ds-sft pid {maker.get('pid')} on {maker.get('host')}"
    return (
        f"warning: waiting for {baton}, a torch extension build lock {whose}: if no build is running "
        f"there (a killed job leaves it behind), remove it: rm '{baton}'"
    )


@contextlib.contextmanager
def owned_batons():
    """Torch's JIT builds (``cpp_extension.load``, as DeepSpeed's op builders call it) make
    :class:`OwnedBaton` for as long as the block runs."""
    from torch.utils import cpp_extension

    before = cpp_extension.FileBaton
    cpp_extension.FileBaton = OwnedBaton
    try:
        yield
    finally:
        cpp_extension.FileBaton = before
