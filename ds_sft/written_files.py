"""What ds-sft wrote into a folder, recorded so that it only ever removes its own files.

A listing is ``{relative path: {"bytes": n, "sha256": hex}}`` (:func:`file_record`) of the files a
command wrote, kept in a JSON file of the same folder (``listing_name``: ``manifest.json`` of a
prepared DATA dir, ``ds_sft_eval.json``, ``ds_sft_export.json``, a checkpoint tag's
``trainer_state.json``). It answers the questions every removal asks:

- which entries of the folder are not the command's (:func:`foreign_entries`: anything unlisted, a
  symlink, a FIFO, a folder holding no listed file), never following a link;
- which listed files are gone (:func:`missing_files`) or hold other bytes now (:func:`altered_files`:
  ds-sft cannot tell them from a user's);
- what to delete (:func:`remove_listed`): the listed files still holding their recorded bytes, the
  listing, then the folders left empty; nothing else.

Who checks the bytes before a removal, and what happens to what is not listed, is each owner's policy:
an output folder of ``prepare``, ``eval`` or ``export`` (``ds_sft.data.output``) has no other claim
to the folder, so every byte is checked and anything foreign refuses the replacement; a checkpoint tag
(``ds_sft.train.checkpointing``) lies in a run folder that ``ds_sft.train.run_dir`` claimed by its
marker and is pruned during training, so its listed names are removed without rehashing gigabytes at
every save and anything foreign is moved aside to ``<tag>.kept``. A run's ``final/`` lists its names
only (``ds_sft_files.json``, :func:`ds_sft.train.run_dir.final_listing`), checked with
:func:`foreign_entries` too, for the same reason: it is rewritten in place in a claimed run folder.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Collection
from pathlib import Path

from ds_sft.json_input import JsonRefused, parse_json_object
from ds_sft.safe_read import sha256_file


def file_record(path: Path) -> dict:
    """What a listing records of the file ``path``: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def list_files(folder: Path, listing_name: str) -> dict[str, dict]:
    """``{relative path: {bytes, sha256}}`` of every file under ``folder`` but its listing."""
    files = (path for path in sorted(folder.rglob("*")) if path.is_file())
    return {p.relative_to(folder).as_posix(): file_record(p) for p in files if p != folder / listing_name}


def is_safe_name(name: object, listing_name: str) -> bool:
    """A listed name is a plain relative path that stays inside the folder: no ``..``, no ``/x``."""
    return (
        isinstance(name, str)
        and name != listing_name
        and "\x00" not in name
        and not name.startswith("/")
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def plain_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` when it is a regular file reached through real folders only, else None."""
    path, mode = _plain_entry(folder, name)
    return path if mode is not None and stat.S_ISREG(mode) else None


def _plain_entry(folder: Path, name: str) -> tuple[Path, int | None]:
    """``folder/name`` and its mode, the mode None when a link stands on the way or it is missing."""
    path, mode = folder, None
    for part in name.split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return path, None
        if stat.S_ISLNK(mode):
            return path, None
    return path, mode


def missing_files(folder: Path, files: dict[str, dict]) -> list[str]:
    """The listed files that are gone (a deleted shard: the output is then not up to date)."""
    return [name for name in files if plain_file(folder, name) is None]


def altered_files(folder: Path, files: dict[str, dict]) -> list[str]:
    """The listed files present with other bytes than recorded: ds-sft cannot tell them from a user's."""
    altered = []
    for name, record in files.items():
        path = plain_file(folder, name)
        if path is not None and not holds(path, record):
            altered.append(name)
    return altered


def holds(path: Path, record: dict) -> bool:
    """Whether ``path`` still holds the recorded bytes (a file it cannot read does not prove it)."""
    try:
        return path.stat().st_size == record.get("bytes") and file_record(path) == record
    except OSError:
        return False


def read_listing(folder: Path, listing_name: str) -> dict | None:
    """The listing file ``listing_name`` when it is a readable regular file holding a JSON object that
    :func:`ds_sft.json_input.parse_json_object` reads, else None."""
    path = plain_file(folder, listing_name)
    if path is None:
        return None
    try:
        return parse_json_object(path.read_bytes())
    except (OSError, JsonRefused):
        return None


def foreign_entries(folder: Path, files: Collection[str], listing_name: str | None) -> list[str]:
    """Everything under ``folder`` that is not a listed regular file (``files``: the listed names),
    its listing (None: a folder whose listing could not be read, which is then not its own either)
    or a folder of them."""
    listed_dirs = {"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)}
    foreign = []

    def unreadable(err: OSError) -> None:  # its contents cannot be checked, so it cannot be replaced
        foreign.append(Path(err.filename).relative_to(folder).as_posix())

    for root, dirnames, filenames in os.walk(folder, onerror=unreadable):  # never follows a symlink
        for entry in sorted(dirnames + filenames):
            path = Path(root) / entry
            name = path.relative_to(folder).as_posix()
            mode = os.lstat(path).st_mode
            expected = listed_dirs if stat.S_ISDIR(mode) else {*files, listing_name} - {None}
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)) or name not in expected:
                foreign.append(name)
        dirnames[:] = [d for d in dirnames if (Path(root) / d).relative_to(folder).as_posix() in listed_dirs]
    return foreign


def remove_listed(folder: Path, files: dict[str, dict], listing_name: str) -> list[str]:
    """Delete the listed files that still hold their recorded bytes, the listing, then the folders
    of listed files left empty, and ``folder`` if it is. Returns what remains under ``folder``: its
    files and its empty folders (``name/``); the folder is gone when nothing does."""
    listing_file = plain_file(folder, listing_name)
    listing = read_listing(folder, listing_name) if listing_file is not None else None
    safe = [name for name in files if is_safe_name(name, listing_name)]
    for name in safe:
        path = plain_file(folder, name)
        if path is not None and holds(path, files[name]):
            path.unlink()
    if listing is not None and listing.get("files") == files:  # only the listing of what was removed
        listing_file.unlink()
    # only the folders the listed files made, deepest first: an empty folder a user made there is theirs
    made = {"/".join(name.split("/")[:i]) for name in safe for i in range(1, name.count("/") + 1)}
    for name in sorted(made, key=lambda name: -name.count("/")):
        path, mode = _plain_entry(folder, name)
        if mode is not None and stat.S_ISDIR(mode):  # never through a link
            with contextlib.suppress(OSError):  # not empty: something there is not ours to delete
                os.rmdir(path)
    with contextlib.suppress(OSError):
        os.rmdir(folder)
    if not folder.exists():
        return []
    return sorted(
        p.relative_to(folder).as_posix() + ("/" if p.is_dir() and not p.is_symlink() else "")
        for p in folder.rglob("*")
        if p.is_symlink() or not p.is_dir() or not any(p.iterdir())
    )
