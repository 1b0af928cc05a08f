"""The one exception type that reaches the user as a single line instead of a traceback.

Raise :class:`UserError` for anything the user can fix (a missing file, a contradictory flag, a
malformed row). The message says what is wrong and how to fix it, in one line. Command entry
points catch it and print ``ds-sft <command>: error: <message>``. They treat an ``OSError`` that
carries an errno the same way (:func:`os_error_line`): the system refused a file operation (no
permission, disk full, a name too long), which any read or write can meet and only the user can
mend. Anything else is a bug in ds-sft and keeps its traceback.
"""

import errno
import os
import re


class UserError(Exception):
    """A problem with the user's input, config or environment, reported as one line."""


def first_line(err: BaseException) -> str:
    """The first line of a third-party exception's message (or its type name), to quote in a UserError.

    A pydantic ``ValidationError`` (DeepSpeed's and wandb's config models) only counts its errors on
    its first line ("1 validation error for Settings"): its first error is quoted, field and message.
    """
    if type(err).__name__ == "ValidationError" and callable(getattr(err, "errors", None)):
        first = err.errors()[0]
        where = ".".join(map(str, first.get("loc", ())))
        return f"{where!r}: {first.get('msg', '')}" if where else str(first.get("msg", ""))
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# What the user can do when the system refuses a file operation, by errno.
OS_ERROR_FIXES = {
    errno.EACCES: "check its permissions, or use another path",
    errno.EPERM: "check its permissions, or use another path",
    errno.ENOSPC: "free some space there, or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some, or write somewhere else",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EROFS: "the filesystem is read-only: write somewhere else",
    errno.ELOOP: "a symbolic link on the path loops: fix the link",
    errno.EBUSY: "it is in use, or a mount point: use another path",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n)",
    errno.EIO: "the storage reported an I/O error: check the disk",
}


def os_error_line(err: OSError) -> str:
    """One line for a refused file operation: the path(s), the system's reason, and what to do."""
    names = [_printable(name) for name in (err.filename, err.filename2) if name is not None]
    reason = err.strerror or os.strerror(err.errno)
    fix = OS_ERROR_FIXES.get(err.errno, "check the path and the machine, then run again")
    return f"{' -> '.join(names) + ': ' if names else ''}{reason}; {fix}"


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``...): a message quotes
    names from the user's files and folders, and a newline in one would start a line of its own
    that reads like a message of ds-sft's (``evil\\nwarning: all good``), an escape would drive the
    terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _printable(name) -> str:
    text = os.fsdecode(name) if isinstance(name, bytes | os.PathLike) else str(name)
    return text if text.isprintable() else repr(text)  # a newline in a path would break the line


RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(err: Exception, path) -> Exception:
    """``err`` as the ``OSError`` it reports, when it is one in disguise: the Rust ``tokenizers``
    library raises plain ``Exception("No space left on device (os error 28)")``. Else ``err``."""
    found = RUST_IO_ERROR.search(str(err))
    if isinstance(err, OSError) or found is None:
        return err
    code = int(found.group(1))
    return OSError(code, os.strerror(code), os.fspath(path))
