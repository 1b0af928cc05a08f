"""Where ds-sft's own folders are, and a user's path as they meant it.

The repository (:data:`REPO_ROOT`), the read-only ``shared/`` folder beside it that holds the offline
data and tokenizer (:func:`shared_dir`; :func:`shared_dir_sought` says where it looked), and a path
flag's ``~`` expanded, or one line when it names no user (:func:`expand_user`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ds_sft.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def expand_user(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded, or one line when that user does not exist
    (``Path.expanduser`` raises a RuntimeError, which ended every path flag in a traceback)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path).split("/", 1)[0]
        raise UserError(f"{path}: {user} names no home folder on this machine; write the full path") from None


def shared_dir() -> Path | None:
    """The read-only ``shared/`` folder beside the project, if present. ``$DS_SFT_SHARED``, when set,
    names it and nothing else is tried: one without ``data/`` means none (a mistyped path fell back to
    ``../shared`` without a word, and the run read data the user had pointed away from). A path that
    cannot even be looked at (too long, a loop of links) is no folder either."""
    chosen = os.environ.get("DS_SFT_SHARED", "").strip()
    candidates = [chosen] if chosen else [REPO_ROOT.parent / "shared", Path.cwd().parent / "shared"]
    for candidate in candidates:
        try:
            if (Path(candidate) / "data").is_dir():
                return Path(candidate)
        except (OSError, ValueError):  # ENAMETOOLONG, ELOOP, EACCES; a NUL byte in the variable
            continue
    return None


def shared_dir_sought() -> str:
    """Where :func:`shared_dir` looked, for the line that says it found nothing."""
    chosen = os.environ.get("DS_SFT_SHARED", "").strip()
    if chosen:
        shown = chosen if len(chosen) <= 200 else chosen[:197] + "..."
        return f"$DS_SFT_SHARED ({shown!r}) has no data/ folder"
    return "no ../shared/data beside the project or the current folder"
