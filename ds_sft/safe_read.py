"""Reading a file someone else made without harm: refuse what would hang, run code or crash a reader.

Anything but a regular file is refused before it is opened (:func:`require_regular_file`: a FIFO
blocks, ``/dev/zero`` never ends), or, for a file read by name inside a folder ds-sft made, on the
file opened without blocking (:func:`read_regular_file`); a JSON object is read or refused in one line
(:func:`read_json_object`); a model folder whose configs would make transformers import its own
Python is refused (:func:`refuse_remote_code`); a file's sha256 is read in blocks
(:func:`sha256_file`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.json_input import JsonRefused, parse_json_object


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (inputs and checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_FILE_KINDS = [
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


def describe_mode(mode: int) -> str:
    """What a ``stat``/``lstat`` mode is, as a line names it: 'a FIFO (named pipe)', 'a directory'..."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "a special file")


def require_regular_file(path: Path, what: str = "input") -> os.stat_result:
    """Refuse anything but a regular file (after symlinks), before it is opened, in one line.

    Opening a FIFO blocks until a writer comes, ``/dev/zero`` never ends, and a directory named
    ``x.json`` fails deep inside a reader: ``os.stat`` tells them apart without opening anything.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        broken = " (a symlink to a missing file)" if path.is_symlink() else ""
        raise UserError(f"{path}: no such file{broken}; pass the {what} file's path") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror}); pass a readable {what} file") from None
    if not stat.S_ISREG(info.st_mode):
        kind = describe_mode(info.st_mode)
        target = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise UserError(f"{path}: is {kind}{target}, not a regular file; pass the {what} file itself")
    return info


def read_regular_file(path: Path, limit: int = -1) -> bytes:
    """The bytes of ``path`` (at most ``limit``), or an OSError, like a missing file's, when it is not a
    regular file. For the files ds-sft reads back by name from a folder it wrote (a checkpoint's
    ``latest``, a tag's ``trainer_state.json``), where a FIFO put in a file's place blocked the open
    forever (SIGTERM too: the handler returns into the open): it is opened without blocking and checked
    on the open file, so nothing can be swapped in between the check and the read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return file.read(limit)


# Files of a model folder whose ``auto_map`` would make transformers import the folder's own Python.
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json")


def read_json_object(path: Path, what: str = "config") -> dict:
    """The JSON object in ``path``; anything else (a FIFO, invalid JSON, a list, a repeated key, NaN:
    :func:`ds_sft.json_input.parse_json_object`) is one UserError naming the file."""
    require_regular_file(path, what)
    try:
        return parse_json_object(Path(path).read_bytes())
    except JsonRefused as err:
        raise UserError(f"{path}: {err}; repair or replace the {what}") from None


def refuse_remote_code(directory: Path) -> None:
    """Refuse a model or tokenizer folder whose configs name Python classes of its own (``auto_map``).

    transformers would import the folder's ``*.py`` for them (after a [y/N] prompt, or at once with
    ``trust_remote_code=True``): code from a download. ds-sft also passes ``trust_remote_code=False`` to
    every ``from_pretrained``; this check says why in one line instead of transformers' paragraph, and
    before a caller could fall back to a part of the folder (its ``tokenizer.json`` alone).
    """
    for name in REMOTE_CODE_CONFIGS:
        config = Path(directory) / name
        if (config.exists() or config.is_symlink()) and "auto_map" in read_json_object(config, name):
            raise UserError(
                f"{directory}: its {name} asks to run its own Python code (auto_map); ds-sft never runs "
                "code from a model folder: use a model transformers supports natively"
            )
