"""Writing without harm: never over, through or into what ds-sft did not make.

An output folder is checked before any work (:func:`writable_dir`); a result file is replaced whole
by a rename, so a reader never sees half of it and a crash keeps the old one
(:func:`replace_file`, :func:`write_result_file`), and it is never written through a symlink
(:func:`check_result_path`) or a hard link (:func:`unshare`); a folder of ds-sft's own inside an
output is made only where no link or file stands (:func:`own_folder`). Each refusal is one line.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ds_sft.errors import UserError, as_os_error
from ds_sft.locations import expand_user


def writable_dir(path: str | Path, flag: str) -> Path:
    """``path`` if it is, or can become, a folder this process may write into; else one UserError.

    For an output flag (``--out_dir``, ``--out``, ``--hf``, ``--output_dir``), checked before any work,
    so a refusal costs nothing and leaves nothing behind: nothing is created here. Refused: a file (or
    FIFO, device, broken symlink) where the folder should be or anywhere above it, and a folder that
    cannot be written (permissions, read-only filesystem), and a name with a control character (ds-sft
    makes the folder, so it makes no name that breaks the lines naming it).
    """
    if not isinstance(path, str | os.PathLike) or str(path).strip() == "":
        raise UserError(f"{flag} {path!r}: pass the path of a folder")
    if not os.fspath(path).isprintable():  # a newline in it broke every line that names the output
        raise UserError(
            f"{flag} {os.fspath(path)!r}: the name holds a control character (a newline, an escape), which "
            "breaks every line that names what is written there: pass a printable name"
        )
    path = expand_user(path)
    existing = path
    while not (existing.exists() or existing.is_symlink()):
        existing = existing.parent  # ends at "." or "/", which exist
    if not existing.is_dir():
        kind = (
            "a broken symlink"
            if not existing.exists()
            else "a file"
            if existing.is_file()
            else "not a folder"
        )
        where = f"{existing} is {kind}" if existing == path else f"{existing}, above it, is {kind}"
        raise UserError(f"{flag} {path}: {where}; pass a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else f"{existing}, the nearest existing folder above it,"
        raise UserError(
            f"{flag} {path}: {where} cannot be written (permissions or a read-only filesystem); "
            "pass another folder"
        )
    return path


def make_readable(path: Path) -> None:
    """Give ``path`` the mode a file this process creates with ``open`` gets (0666 less the umask), for
    writers whose files come out owner-only (safetensors, ``mkstemp``)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_result_path(path: str | Path) -> Path:
    """``path`` when :func:`write_result_file` may write there (nothing, or a regular file), else one
    line: to check before the work whose result goes there."""
    path = Path(path)
    if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
        what = "a link" if path.is_symlink() else "not a regular file"
        raise UserError(
            f"{path} is {what}: ds-sft writes a result file there; move it away, or pass another path"
        )
    return path


def own_folder(path: str | Path) -> Path:
    """Make (or enter) ``path``, a folder of ds-sft's own inside an output it made (a run's ``final/``
    and ``final/tokenizer/``): refused in one line if a link or a file stands there. The output was
    checked when the command began, but a run lasts hours, and a link put there meanwhile (``ln -s
    ~/models RUN/final``) had the final weights written over the files it pointed to."""
    path = Path(path)
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        what = "a link" if path.is_symlink() else "not a folder"
        raise UserError(
            f"{path} is {what}, made after the command checked its output: ds-sft writes its own folder "
            "there and nothing through a link; remove it, then run the command again"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def temporary_name_prefix(path: Path, tag: str, room: int) -> str:
    """A hidden name beside ``path`` to build its replacement under: ``.NAME`` + ``tag``, NAME cut so
    that ``room`` more bytes (``mkdtemp``'s random part, a suffix) stay within the folder's name limit.
    Uncut, a name near the limit (a 242-byte ``--out``) failed only after the work, at the rename."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255  # Linux filesystems' limit
    keep = max(limit - len(os.fsencode(tag)) - 1 - room, 1)
    return "." + os.fsdecode(os.fsencode(path.name)[:keep]) + tag


def replace_file(path: str | Path, fill) -> Path:
    """Make the file ``path`` anew: ``fill(temporary)`` writes a new file beside it, which is renamed
    over ``path``. A reader never sees half of it, a crash leaves the old one whole, and a ``path``
    that is a hard link (a ``cp -al`` copy of a run) is replaced rather than written through, so the
    other copy keeps its bytes. A link, folder or FIFO at ``path`` is refused in one line
    (:func:`check_result_path`): writing through a symlink overwrote its target (a user's notes)."""
    import tempfile

    path = check_result_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = temporary_name_prefix(path, ".", room=8 + len(".tmp"))  # mkstemp's 8 random characters
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    os.close(descriptor)
    try:
        try:
            fill(Path(temporary))
        except Exception as err:  # a library's writer reporting a full disk in a plain Exception
            disguised = as_os_error(err, path)
            if disguised is err:
                raise
            raise disguised from None
        make_readable(Path(temporary))  # mkstemp's file is owner-only; ds-sft's results are not secret
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_result_file(path: str | Path, text: str) -> Path:
    """Write ``text`` as the file ``path`` (a result ds-sft keeps under a fixed name, such as
    ``bench/results/kernel_speed.json``, or a run's report) through :func:`replace_file`."""
    return replace_file(path, lambda temporary: temporary.write_text(text))


def unshare(path: Path) -> None:
    """Give ``path`` bytes of its own when it is a hard link (``cp -al`` copies every file of a run
    that way), before ds-sft writes into it in place (appends to it, truncates it): such a write
    changes every name of the file, the other copy's included."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        replace_file(path, lambda temporary: shutil.copyfile(path, temporary))
