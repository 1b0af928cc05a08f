"""One writer per run directory, and a finished run replaced only when asked.

Two ``train`` processes writing into one ``--out_dir`` would interleave their metrics and overwrite
each other's checkpoints, and a new run started where an old one finished would mix its checkpoints
with the old ones. So before any work:

1. **Lock.** Rank 0 takes an exclusive ``flock`` on ``RUN/.lock`` and writes who holds it (pid, host,
   start time) into it. The kernel drops the lock when its process dies, however it dies, so a lock
   file left by a dead process is simply taken over; a live holder makes the new run stop in one line
   naming it. Only rank 0 locks (the other ranks of the same run write into the folder too); its
   verdict is broadcast, so every rank stops (rank 0 saying why, once), or goes on, together.
2. **A finished run stays** unless the user says what to do with it: ``--resume`` continues it,
   ``--overwrite`` replaces it (removing what the old run wrote: its checkpoints, ``final/`` and
   ``metrics.jsonl``, and nothing it did not write), and without either the run stops in one line saying so.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from ds_sft.errors import UserError

LOCK_FILE = ".lock"
# What a previous run leaves that a new one would mix with (the report and plots are rewritten whole):
# RUN/final/, RUN/metrics.jsonl, and in RUN/checkpoints/ the tags, the universal conversion's folders
# and these files (the last three written by DeepSpeed).
CHECKPOINT_FILES = ("latest", "best", "latest_universal", "zero_to_fp32.py", "zero_to_torch.py")


class RunLock:
    """The held ``flock`` on ``RUN/.lock`` (rank 0), or nothing (other ranks). Released on
    :meth:`release` or when the process ends."""

    def __init__(self, handle=None):
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file drops the flock
            self.handle = None


def holder(lock_path: Path) -> str:
    """Who holds ``lock_path``, as its holder wrote it."""
    try:
        info = json.loads(lock_path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def lock(run_dir: Path) -> RunLock:
    """Take ``RUN/.lock`` or raise a UserError naming its live holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    try:  # never through a symlink: truncating it would clobber whatever it points to
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise UserError(
            f"cannot open {lock_path} ({err.strerror}): remove it if it is not a plain file"
        ) from None
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"{run_dir} is in use by another training run ({holder(lock_path)}): wait for it to end, "
            "stop it, or pass another --out_dir"
        ) from None
    except OSError as err:  # a filesystem without locks (some FUSE mounts): run, but say it is unguarded
        print(f"warning: cannot lock {lock_path} ({err.strerror}): nothing stops a second run from "
              "writing into this folder", file=sys.stderr)  # fmt: skip
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
    handle.flush()
    return RunLock(handle)


def previous_run(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir`` (empty for a fresh folder)."""
    found = []
    if (run_dir / "final").exists():
        found.append("final/ weights")
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        found.append("checkpoints")
    if (run_dir / "metrics.jsonl").exists():
        found.append("metrics.jsonl")
    return found


def remove_previous_run(run_dir: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote (see :data:`CHECKPOINT_FILES`), nothing else."""
    from ds_sft.train.checkpointing import PARTIAL, REPLACED, is_tag

    ckpt_dir = run_dir / "checkpoints"
    ours = [run_dir / "final", run_dir / "metrics.jsonl"]
    if ckpt_dir.is_dir():
        ours += [
            path
            for path in ckpt_dir.iterdir()
            if is_tag(path.name)
            or path.name in (*CHECKPOINT_FILES, PARTIAL, REPLACED)  # the last two: a save cut short
            or path.name.startswith(".universal-")
        ]
    for path in ours:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()


def claim_run_dir(run_dir: Path, resume, overwrite: bool) -> RunLock:
    """Rank 0 locks ``run_dir`` and decides whether this run may write there; every rank gets the
    verdict before any work. If it is no, rank 0 raises the UserError and the others exit with 2."""
    import torch
    import torch.distributed as dist

    verdict = [None]
    held = RunLock()
    if dist.get_rank() == 0:
        try:
            held = lock(run_dir)
            found = previous_run(run_dir)
            if found and resume is None:
                if not overwrite:
                    raise UserError(
                        f"{run_dir} already holds a training run ({', '.join(found)}): pass --resume to "
                        "continue it, --overwrite to replace it, or another --out_dir"
                    )
                remove_previous_run(run_dir)
                print(f"--overwrite: removed the previous run's {', '.join(found)} from {run_dir}")
        except UserError as err:
            held.release()
            verdict[0] = str(err)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    dist.broadcast_object_list(verdict, src=0, device=device)
    if verdict[0] is not None:
        if dist.get_rank() > 0:
            raise SystemExit(2)  # rank 0 prints the one line; the others stop with the same exit status
        raise UserError(verdict[0])
    return held
