"""``ds-sft train`` with one injected crash: the process SIGKILLs itself at a chosen point.

A SIGKILL cannot be caught, so nothing in the trainer gets to clean up: it is what a preempted node,
an OOM kill or a power cut looks like. Where the kill lands is chosen with the environment variable
``DS_SFT_FAULT="<point>@<step>"`` (steps are 1-based, as in the logs):

- ``step@N``: in optimizer step N, after the backward of its micro-batches, before the update;
- ``save@N``: inside step N's checkpoint save, having written *half* of DeepSpeed's first file
  (a torn file on disk, as when the writer dies mid-``write``);
- ``before_latest@N``: after every file of step N's checkpoint is on disk, before ``latest`` moves;
- ``latest_tmp@N``: after the new ``latest`` was written to its temporary name, before the rename;
- ``prune@N``: half-way through deleting an old checkpoint after step N's save;
- ``read_only@N``: not a kill: step N's save finds its directory read-only (``EROFS``);
- ``hold@N``: not a kill: in optimizer step N, before the update, the process waits to be killed from
  outside (a test's external kill that a busy machine delays still finds the run alive, not ended).

The hooks wrap DeepSpeed's and ds-sft's functions from outside (nothing in the trainer knows about
them). Run it as the trainer module is run::

    DS_SFT_FAULT=save@40 python tests/reliability/faulty_train.py --model tiny --data_dir D ...
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import sys
from pathlib import Path

POINTS = ("step", "save", "before_latest", "latest_tmp", "prune", "read_only", "hold")


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def wait_to_be_killed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    while True:
        signal.pause()


def install(point: str, at_step: int) -> None:
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    from ds_sft.train import checkpointing

    saving = {"step": None}  # the step whose checkpoint is being written, while it is

    if point in ("step", "hold"):
        original_step = DeepSpeedEngine.step
        stop = die if point == "step" else wait_to_be_killed

        def step(self, *args, **kwargs):
            if self.is_gradient_accumulation_boundary() and self.global_steps + 1 == at_step:
                stop()
            return original_step(self, *args, **kwargs)

        DeepSpeedEngine.step = step
        return

    original_save = checkpointing.save

    def save(engine, ckpt_dir, step, *args, **kwargs):
        saving["step"] = step
        try:
            return original_save(engine, ckpt_dir, step, *args, **kwargs)
        finally:
            saving["step"] = None

    checkpointing.save = save
    here = lambda: saving["step"] == at_step  # noqa: E731

    if point == "save":
        original_torch_save = torch.save

        def torn_save(obj, f, *args, **kwargs):
            if here() and isinstance(f, str | os.PathLike):
                buffer = io.BytesIO()
                original_torch_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
                die()
            return original_torch_save(obj, f, *args, **kwargs)

        torch.save = torn_save
    elif point == "read_only":
        original_torch_save = torch.save

        def refused_save(obj, f, *args, **kwargs):
            if here() and isinstance(f, str | os.PathLike):  # files, not the in-memory pickles of collectives
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(f))
            return original_torch_save(obj, f, *args, **kwargs)

        torch.save = refused_save
    elif point in ("before_latest", "latest_tmp"):
        original_write = checkpointing.write_atomic

        def write_atomic(path: Path, text: str) -> None:
            if here() and Path(path).name == "latest":
                if point == "latest_tmp":
                    Path(path).with_name(Path(path).name + ".tmp").write_text(text)
                die()
            return original_write(path, text)

        checkpointing.write_atomic = write_atomic
    elif point == "prune":
        original_rmtree = shutil.rmtree

        def half_rmtree(path, *args, **kwargs):
            if here():
                files = sorted(Path(path).iterdir())
                for victim in files[: max(1, len(files) // 2)]:
                    victim.unlink() if victim.is_file() else original_rmtree(victim)
                die()
            return original_rmtree(path, *args, **kwargs)

        shutil.rmtree = half_rmtree
    else:
        raise SystemExit(f"DS_SFT_FAULT: unknown point {point!r}; expected one of {POINTS}")


def main() -> int:
    fault = os.environ.get("DS_SFT_FAULT")
    if fault:
        point, _, step = fault.partition("@")
        install(point, int(step))
    from ds_sft.command import main_for

    return main_for("train", sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
