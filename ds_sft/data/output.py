"""The output folder of ``prepare`` (and of ``export`` and ``eval``, each with its own manifest name):
what it may replace, and how, without losing a byte it did not write.

``prepare`` writes a whole folder (manifest.json, train/, val/, tokenizer/, lengths.png), and its
manifest lists every other file in it with size and sha256 (``files``). That list is the only thing
ds-sft ever deletes:

- :func:`check_output_dir`, before any work, refuses what no output flag takes
  (:func:`ds_sft.safe_write.writable_dir`: a file or a path under one, a folder that cannot be written), the
  current folder or a folder above it, a folder holding an input, a folder holding anything its
  manifest does not list (a README, a ``src/`` tree, a symlink) or a listed file whose bytes changed
  (ds-sft cannot tell it from a user's), and a folder with no ds-sft manifest at all;
- the new output is written into a fresh temporary sibling and swapped in by one atomic rename
  (:func:`replace_output`; Linux ``renameat2(RENAME_EXCHANGE)``, two renames where that is missing);
- the old output is then removed file by file (:func:`ds_sft.written_files.remove_listed`, the one
  record of what ds-sft wrote, shared with checkpoint tags and a run's ``final/``): only paths its manifest
  lists, only while they still hold the recorded bytes, never through a symlink or outside the
  folder. Anything else (say, a file someone added meanwhile) is left where it is, and reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.locations import expand_user
from ds_sft.run_layout import RUN_SIGNS
from ds_sft.safe_write import temporary_name_prefix, writable_dir
from ds_sft.written_files import (
    altered_files,
    foreign_entries,
    is_safe_name,
    list_files,
    read_listing,
    remove_listed,
)

MANIFEST = "manifest.json"
SWAP_SUFFIX = "-swap"  # _exchange's name for the old output while it renames twice
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


def check_output_dir(
    output_dir: str | Path,
    inputs: list[Path],
    option: str = "--output_dir",
    command: str = "prepare",
    manifest_name: str = MANIFEST,
) -> tuple[Path, dict | None]:
    """Refuse, before any work, an output folder (``option``) that ``command`` could not replace without loss.

    ``manifest_name`` is the file in which ``command`` lists what it wrote there (each command its
    own: one command's output is never taken for another's). Returns (the folder with symlinks
    resolved, the manifest of the ds-sft output already there or None); a returned manifest's
    ``files`` names are all safe (:func:`is_safe_name`).
    """
    flag = f"{option} {output_dir}"
    out = Path(os.path.realpath(writable_dir(output_dir, option)))
    if Path.cwd().resolve().is_relative_to(out):
        raise UserError(
            f"{flag} is the current folder or holds it; {command} replaces its output folder as a whole, "
            "so name a new one"
        )
    for path in inputs:
        if Path(os.path.realpath(path)).is_relative_to(out):
            raise UserError(f"{flag} holds the input {path}; {command} replaces that folder: choose another")
    if out.exists():
        if os.path.ismount(out):
            raise UserError(
                f"{flag} is a mount point; {command} swaps in its output folder by renaming, which a mount "
                "point refuses: pass a folder inside it"
            )
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise UserError(
                f"{flag}: {command} builds the new output beside it, in {out.parent}, which cannot be "
                "written; pass a folder whose parent you can write"
            )
    try:
        if not out.exists() or not any(out.iterdir()):
            return out, None
    except OSError as err:
        raise UserError(f"{flag} cannot be listed ({err.strerror}); pass a folder you can read") from None
    manifest = read_listing(out, manifest_name)
    if manifest is None or "files" not in manifest:
        if manifest is None:
            why = f"no ds-sft {manifest_name}"
        elif {"key", "sources", "splits"} <= manifest.keys():
            why = "its manifest lists no files: an older ds-sft wrote it"
        else:
            why = f"its {manifest_name} is not one ds-sft writes"
        raise UserError(
            f"{flag} holds files that {command} cannot prove it wrote ({why}); choose another {option}, "
            "or empty that folder yourself"
        )
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        is_safe_name(n, manifest_name) and isinstance(r, dict) for n, r in files.items()
    ):
        raise UserError(
            f"{flag}: its {manifest_name} lists paths outside the folder or malformed entries, so it is not "
            f"one ds-sft wrote; choose another {option}"
        )
    foreign = foreign_entries(out, files, manifest_name) or altered_files(out, files)
    if foreign:
        raise UserError(
            f"{flag} holds {len(foreign)} file(s) not as ds-sft wrote them (first: {foreign[0]}); "
            f"{command} replaces the whole folder, so choose another {option} or move them out"
        )
    return out, manifest


def staging_dir(out: Path, option: str = "--output_dir") -> Path:
    """A fresh, empty sibling of ``out`` to build the new output in (same filesystem: renames are atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # room: mkdtemp's 8 random characters, and _exchange's "-swap" where it renames twice
        prefix = temporary_name_prefix(out, ".new-", room=8 + len(SWAP_SUFFIX))
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    except OSError as err:
        raise UserError(f"{option} {out}: cannot write there ({err.strerror})") from None
    if out.is_dir():  # it is swapped for the staging folder: keep the mode and ACLs the user gave it
        shutil.copystat(out, staging)
        os.utime(staging)
    else:  # mkdtemp's 0700 would otherwise become the output folder's mode
        umask = os.umask(0o022)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
    return staging


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (renameat2 RENAME_EXCHANGE); two renames where it is missing."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if (
        renameat2 is not None
        and renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0
    ):
        return
    aside = a.with_name(a.name + SWAP_SUFFIX)
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except OSError:
        os.rename(aside, b)  # the old output back where it was
        raise
    os.rename(aside, a)


def replace_output(
    new: Path,
    out: Path,
    old_files: dict[str, dict],
    option: str = "--output_dir",
    manifest_name: str = MANIFEST,
) -> list[str]:
    """Put the finished folder ``new`` at ``out``; remove the old output's listed files.

    Returns what was left of the old output (now under ``new``'s path): files that changed since
    prepare wrote them, or that someone added meanwhile. Nothing there is deleted.

    Another ds-sft command that wrote ``out`` while this one ran (two prepares into one folder) is
    refused here, before the swap: the output now there is not the one ``old_files`` lists, and it
    was moved aside with its manifest deleted, its folder left unusable.
    """
    now = read_listing(out, manifest_name) if out.is_dir() else None
    if now is not None and now.get("files") != old_files:
        raise UserError(
            f"{option} {out} was written by another ds-sft command while this one ran; this output is in "
            f"{new}: move it where you want it, or run again with another {option}"
        )
    try:
        if not os.path.lexists(out):
            os.rename(new, out)
            return []
        _exchange(new, out)
    except OSError as err:
        raise UserError(
            f"{option} {out}: could not be replaced ({err.strerror}); the finished output is in {new}: "
            f"move it there yourself, or run again with another {option}"
        ) from None
    return remove_listed(new, old_files, manifest_name)


def refuse_overlap(output_dir: str | Path, option: str, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is, holds or lies inside an input folder, or holds an input file.

    ``inputs`` maps how to name each input (``"the model"``) to its path; a model in a training run's
    ``final/`` stands for its whole run. Writing there would replace what the command reads (an fp32
    model by its own bf16 export) or add files to a folder that belongs to something else (a run, a
    data dir, a tokenizer).
    """
    out = Path(os.path.realpath(expand_user(output_dir)))
    for what, path in inputs.items():
        real = Path(os.path.realpath(path))
        if real.name == "final" and any(os.path.lexists(real.parent / name) for name in RUN_SIGNS):
            what, path, real = f"the run of {what} {path}:", real.parent, real.parent
        if real.is_relative_to(out) or (real.is_dir() and out.is_relative_to(real)):
            where = "is" if real == out else "holds" if real.is_relative_to(out) else "lies inside"
            raise UserError(
                f"{option} {output_dir} {where} {what} {path}; write the output to a folder of its own, "
                "outside what it is made from"
            )


@contextlib.contextmanager
def building_output(out: Path, old_files: dict[str, dict], option: str, manifest: dict, manifest_name: str):
    """Yield a fresh staging folder to write the new output into; on success list every file in it
    under ``manifest["files"]``, write ``manifest`` as ``manifest_name`` and swap the folder in for
    ``out`` (:func:`replace_output`), so a failure leaves the old output as it was. ``old_files``: the
    previous output's listed files (``check_output_dir``'s manifest), the only ones deleted."""
    staging = staging_dir(out, option)
    try:
        yield staging
        manifest["files"] = list_files(staging, manifest_name)
        (staging / manifest_name).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a fresh folder of ours: nothing else is in it
        raise
    left = replace_output(staging, out, old_files, option, manifest_name)
    if left:
        print(
            f"note: kept {len(left)} file(s) of the old output that changed since ds-sft wrote them or "
            f"that it did not write (first: {left[0]}), in {staging}",
            file=sys.stderr,
        )
