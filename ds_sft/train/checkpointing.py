"""Save a checkpoint, on top of ``engine.save_checkpoint``, and keep the checkpoints folder tidy.

Layout::

    RUN/checkpoints/step_000050/     the engine's files (model, optimizer partitions, client state)
                    step_000050/trainer_state.json   ds-sft's record (:mod:`ds_sft.train.trainer_state`),
                                                     with the size and sha256 of every other file
    RUN/checkpoints/latest           the tag of the newest *complete* checkpoint
    RUN/checkpoints/best             the tag with the lowest val loss

Every rank writes into ``RUN/checkpoints/.partial/<tag>/``; once all have returned from
``save_checkpoint`` and passed a barrier, rank 0 writes the manifest, moves the folder to its tag,
and only then rewrites ``latest`` (atomically), so a run killed mid-save resumes from the previous
checkpoint and a tag folder is only ever a complete save. The next save deletes what such a save
left in ``.partial/`` (or ``.replaced/``) only when every file there is named as a save names its
files (:func:`remove_scratch`; no marker is needed, so an older ds-sft's leftovers qualify too); a
folder holding anything else is moved whole to ``.partial.kept`` and named, never deleted. A run
resumed from an older checkpoint saves steps the first run saved too: the new tag *replaces* the old
one whole (the old folder is moved aside, then deleted; a symlink is unlinked, never followed), so
no file of the first run (such as another world size's ZeRO partitions) stays beside the new ones.
Tags later than the one just saved belong to the run this one branched from: they are deleted before
the new tag takes its place (a crash then falls back to this run's own checkpoints, never the other
run's), then older tags beyond ``--keep_last``, except the best. Deleting a tag deletes the files its
trainer state lists, nothing a user put beside them (:func:`remove_tag`).

Exact resume needs everything that shapes the next step: weights, optimizer moments and step
counts (the engine), the position in the data stream (the sampler state), the RNG of every rank
(gathered to rank 0 into the client state), and the step counter (which fixes the lr). A disk error
while saving (full, read-only) stops the run with one line saying so and that the previous
checkpoint, which ``latest`` still names, is intact.

Checking a tag before a resume: :mod:`ds_sft.train.checkpoint_check`; loading it:
:mod:`ds_sft.train.checkpoint_load`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ds_sft.errors import UserError, one_line
from ds_sft.run_layout import TRAINER_STATE, is_tag, tag_for, tag_step
from ds_sft.train.checkpoint_check import file_digests, saved_tags
from ds_sft.train.trainer_state import FILES, read_trainer_state, trainer_state_problem
from ds_sft.written_files import foreign_entries

PARTIAL = ".partial"  # where every rank writes a checkpoint before it takes its tag's place
REPLACED = ".replaced"  # where an earlier run's folder of the same tag waits to be deleted
UNIVERSAL_PREFIX = ".universal-"  # + tempfile's suffix: a universal conversion while it is loaded
# The names of the files a save (.partial), a replaced tag (.replaced) and a universal conversion
# (.universal-XXXX, with ds_to_universal's temporary shards "exp_avg.00") hold: DeepSpeed's pickles and
# scripts, the trainer state (+ write_atomic's .tmp). A scratch folder holding any other file is not
# ds-sft's alone, whichever ds-sft version left it.
SCRATCH_FILES = re.compile(
    rf"[^/]+\.pt|\w+\.\d+|{re.escape(TRAINER_STATE)}(\.tmp)?|latest_universal|zero_to_\w+\.py"
)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a new file: one left hard-linked (cp -al) would be written through
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict]:
    import torch.distributed as dist

    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


@contextmanager
def disk_errors(ckpt_dir: Path, tag: str):
    """Turn a failed write (disk full, read-only, no permission) into one line that says what is safe;
    the half-written save is deleted first, so the space it took is free again."""

    try:
        yield
    except (OSError, RuntimeError) as err:
        # torch's zip writer reports a full disk as a RuntimeError from inline_container.cc
        if isinstance(err, RuntimeError) and "inline_container" not in str(err):
            raise
        remove_scratch(ckpt_dir / PARTIAL)
        reason = str(err).strip().splitlines()[0]
        if isinstance(err, RuntimeError):  # its words ("unexpected pos 704 vs 598") name no cause
            reason = f"a file was cut short: a full disk or quota, or a file-size limit ({reason})"
        free = shutil.disk_usage(ckpt_dir).free / 2**20 if ckpt_dir.exists() else 0.0
        latest = ckpt_dir / "latest"
        kept = (
            f"{latest.read_text().strip()} (named by {latest}) is intact"
            if latest.is_file()
            else "no earlier checkpoint was saved"
        )
        raise UserError(
            f"could not write checkpoint {ckpt_dir / tag} ({reason}; {free:.0f} MiB free there): "
            f"{kept}; free space or fix permissions, then rerun with --resume"
        ) from None


def remove(path: Path, missing_ok: bool = False) -> None:
    """Delete ``path``: a folder with everything in it, a file, or a symlink itself (never its target;
    ``shutil.rmtree`` unlinks the symlinks it meets inside a folder, never follows them)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=missing_ok)
        else:
            path.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def scratch_problem(folder: Path) -> str | None:
    """What in the scratch folder ``folder`` (:data:`PARTIAL`, :data:`REPLACED`, a universal
    conversion) ds-sft did not write, named from ``folder``'s parent: a link or special file, or a file
    not named as a save or conversion names its files (:data:`SCRATCH_FILES`); None when all is its own."""
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder.name} is not a folder"
    for root, dirnames, filenames in os.walk(folder):  # never follows a symlink
        for name in sorted(dirnames + filenames):
            path = Path(root) / name
            where = path.relative_to(folder.parent).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                return f"{where} is not a regular file or folder"
            if path.is_file() and not SCRATCH_FILES.fullmatch(name):
                return f"{where} is not a file a checkpoint save writes"
    return None


def kept_path(path: Path, name: str) -> Path:
    """The first free ``<name>.kept``, ``<name>.kept2``... beside ``path``: where what the run did not
    write goes instead of being deleted (no ds-sft name, so nothing reads or deletes it again)."""
    kept, n = path.with_name(f"{name}.kept"), 2
    while os.path.lexists(kept):
        kept, n = path.with_name(f"{name}.kept{n}"), n + 1
    return kept


def remove_scratch(folder: Path) -> None:
    """Delete the scratch folder ``folder`` an earlier save left (cut short, or killed before it deleted
    a replaced tag), when it holds only what ds-sft writes there (:func:`scratch_problem`); else move it
    whole to ``<name>.kept`` and say so: a file put there by someone else is never deleted."""
    if not os.path.lexists(folder):
        return
    problem = scratch_problem(folder)
    if problem is None:
        remove(folder, missing_ok=True)
        return
    kept = kept_path(folder, folder.name)
    os.replace(folder, kept)
    print(f"note: kept {one_line(str(folder))} ({one_line(problem)}), now in {one_line(str(kept))}",
          file=sys.stderr, flush=True)  # fmt: skip


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, keep_last: int) -> str:
    """Save a complete checkpoint for ``step`` on every rank, replacing any earlier folder of its tag;
    move ``latest`` once all are done (see the module docstring)."""
    import torch.distributed as dist

    from ds_sft.train.distributed import on_rank_zero

    tag = tag_for(step)
    partial = ckpt_dir / PARTIAL
    client_state = {"trainer": trainer_state, "rng": gather_rng_states()}
    # rank 0's parts are told to every rank (on_rank_zero): a full disk there must not leave them waiting
    on_rank_zero(lambda: remove_scratch(partial), engine.device)  # what a save killed mid-way left
    with disk_errors(ckpt_dir, tag):
        engine.save_checkpoint(str(partial), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()

    def publish() -> None:
        with disk_errors(ckpt_dir, tag):
            state = {**trainer_state, FILES: file_digests(partial / tag)}
            write_atomic(partial / tag / TRAINER_STATE, json.dumps(state, indent=2))
            drop_later_tags(ckpt_dir, step)
            replace_tag(partial / tag, ckpt_dir / tag)
            write_atomic(ckpt_dir / "latest", tag)
            for script in partial.glob("zero_to_*.py"):  # DeepSpeed's recovery scripts, kept beside the tags
                os.replace(script, ckpt_dir / script.name)
            partial.rmdir()
        if trainer_state.get("best_tag"):
            write_atomic(ckpt_dir / "best", trainer_state["best_tag"])
        else:  # an earlier run's, which this one (resumed from before that run's best) never had
            remove(ckpt_dir / "best", missing_ok=True)
        prune(ckpt_dir, keep_last, trainer_state.get("best_tag"))

    on_rank_zero(publish, engine.device)
    return tag


def remove_tag(tag_dir: Path, tag: str | None = None) -> None:
    """Delete the checkpoint tag in ``tag_dir`` (named ``tag``, when it was moved aside), but no file
    a user put there. Then only the files its trainer state lists go (that file first, so no complete
    tag is left half deleted), and the folder, holding only theirs, is renamed ``<tag>.kept``: the
    tag's name is free, and ``--resume`` never takes it for a checkpoint. A folder whose list cannot
    be read is kept whole (which of its files the run wrote is not known), renamed the same way."""
    tag = tag or tag_dir.name
    if tag_dir.is_symlink() or not tag_dir.is_dir():
        remove(tag_dir, missing_ok=True)  # a link itself, never its target
        return
    try:
        state = read_trainer_state(tag_dir)
    except (OSError, ValueError, RecursionError):
        state = None
    listed = state[FILES] if trainer_state_problem(state, with_files=True) is None else None
    # the listed names, not their bytes: rehashing gigabytes at every prune would stall training, and
    # the tag lies in a run folder the run claimed (ds_sft.written_files says who checks what)
    entries = sorted(p.name for p in tag_dir.iterdir())
    theirs = foreign_entries(tag_dir, listed, TRAINER_STATE) if listed is not None else entries
    if not theirs:
        remove(tag_dir)
        return
    ours = set(entries) - set(theirs)
    for name in sorted(ours, key=lambda name: name != TRAINER_STATE):
        (tag_dir / name).unlink(missing_ok=True)
    kept = kept_path(tag_dir, tag)
    os.replace(tag_dir, kept)
    why = "" if listed is not None else f" (its {TRAINER_STATE} does not say which files the run wrote)"
    print(
        f"note: checkpoint {tag}: kept what the run did not write there{why}, "
        f"now in {one_line(str(kept))}: {one_line(', '.join(theirs))}",
        file=sys.stderr,
        flush=True,
    )


def later_tags(ckpt_dir: Path, step: int) -> list[Path]:
    """The tags in ``ckpt_dir`` of steps after ``step``, oldest first: after a resume from ``step``,
    those of the run this one branched from (by resuming one of its earlier checkpoints)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        (p for p in ckpt_dir.iterdir() if is_tag(p.name) and tag_step(p.name) > step),
        key=lambda p: tag_step(p.name),
    )


def drop_later_tags(ckpt_dir: Path, step: int) -> None:
    """Delete :func:`later_tags`: not part of this run's history (said at the resume)."""
    for path in later_tags(ckpt_dir, step):
        remove_tag(path)


def replace_tag(new: Path, tag_dir: Path) -> None:
    """Move the complete checkpoint ``new`` to ``tag_dir``; an earlier run's folder there is moved
    aside first and deleted once the new one is in place (a rename cannot replace a folder)."""
    replaced = tag_dir.with_name(REPLACED)
    remove_scratch(replaced)
    if tag_dir.is_symlink() or tag_dir.exists():
        os.replace(tag_dir, replaced)  # renames a symlink itself, never its target
    os.replace(new, tag_dir)
    remove_tag(replaced, tag_dir.name)


def prune(ckpt_dir: Path, keep_last: int, best_tag: str | None) -> None:
    for path in saved_tags(ckpt_dir)[keep_last:]:
        if path.name != best_tag:
            remove_tag(path)
