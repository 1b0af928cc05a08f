"""The one exception type that reaches the user as a single line instead of a traceback.

Raise :class:`UserError` for anything the user can fix (a missing file, a contradictory flag, a
malformed row). The message says what is wrong and how to fix it, in one line. Command entry
points catch it and print ``ds-sft <command>: error: <message>``. They treat an ``OSError`` that
carries an errno the same way (:func:`os_error_line`): the system refused a file operation (no
permission, disk full, a name too long), which any read or write can meet and only the user can
mend. Memory running out in a step is the third (:func:`out_of_memory_line`): the sizes the user
chose do not fit, and the command says which of its flags shrink them. :func:`refusal_line` is the one
place that tells these from the rest: anything else is a bug in ds-sft and keeps its traceback.
"""

import errno
import os
import re
import signal
import sys


class UserError(Exception):
    """A problem with the user's input, config or environment, reported as one line."""


class ConsoleError(OSError):
    """A write to the console (standard output or error) that the system refused: a full device behind
    it (``> /dev/full``), a pipe whose reader is gone (``| head``), a terminal that went away. Its
    ``filename`` names the stream, so that it is never taken for the command's output: "No space left
    on device" was reported as the output folder's, whose disk had room."""

    def __init__(self, stream: str, err: OSError):
        super().__init__(err.errno, err.strerror or os.strerror(err.errno or 0), stream)


def console_line(err: ConsoleError) -> str:
    """The one line for :class:`ConsoleError`: which stream, the system's reason, what to do."""
    return (
        f"{err.filename} cannot be written ({err.strerror}), so the command stopped: send it to a file "
        "that can be written (> log.txt), or keep open the pipe it goes into"
    )


def is_native_panic(err: BaseException) -> bool:
    """A Rust panic inside a library (the tokenizers' regexes on hostile input, a damaged charsmap):
    pyo3's PanicException, a BaseException that no ``except Exception`` sees."""
    return type(err).__name__ == "PanicException"


def process_ending(returncode: int) -> str:
    """How a child process ended, in words, for a line that names it: ``exit 2``; ``killed by SIGKILL``
    (a negative code: the signal's default action ended it, e.g. the kernel's out-of-memory killer); or
    ``exit 143, on SIGTERM``: a process that caught the signal, cleaned up and exited as a shell reports
    a process the signal ended (128 + N; ds-sft's own commands do this)."""

    def name(number: int) -> str:
        try:
            return signal.Signals(number).name
        except ValueError:
            return f"signal {number}"

    if returncode < 0:
        return f"killed by {name(-returncode)}"
    if stopped_on_signal(returncode):
        return f"exit {returncode}, on {name(returncode - 128)}"
    return f"exit {returncode}"


def stopped_on_signal(returncode: int) -> bool:
    """An exit code of 128 + N for a signal N: the process stopped on that signal, not on a failure."""
    return returncode > 128 and returncode - 128 in set(signal.Signals)


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
    errno.EFBIG: "a file-size limit (ulimit -f, or the filesystem's) is reached: raise it or write elsewhere",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EROFS: "the filesystem is read-only: write somewhere else",
    errno.ELOOP: "a symbolic link on the path loops: fix the link",
    errno.EBUSY: "it is in use, or a mount point: use another path",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n)",
    errno.EIO: "the storage reported an I/O error: check the disk",
}


# Refusals that only a write meets: when the system names no file (a write through an open handle, a
# library's own writer), the command's output is where the space or the quota ran out.
WRITE_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error_line(err: OSError, output: str | None = None) -> str:
    """One line for a refused file operation: the path(s), the system's reason, and what to do. An
    ``err`` that names no path says ``output`` (the command's output folder) for a refused write."""
    names = [_printable(name) for name in (err.filename, err.filename2) if name is not None]
    if not names and output is not None and err.errno in WRITE_REFUSALS:
        names = [f"writing to {_printable(output)}"]
    reason = err.strerror or os.strerror(err.errno)
    fix = OS_ERROR_FIXES.get(err.errno, "check the path and the machine, then run again")
    return f"{' -> '.join(names) + ': ' if names else ''}{reason}; {fix}"


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``...): a message quotes
    names from the user's files and folders, and a newline in one would start a line of its own
    that reads like a message of ds-sft's (``evil\\nwarning: all good``), an escape would drive the
    terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else _escaped(c) for c in text)


# What drives a terminal instead of showing on it: the C0 controls but the tab, newline and carriage
# return that lay lines out (a progress bar redraws its line with \r), DEL, the C1 controls (\x9b is a
# one-character CSI to some terminals), and lone surrogates (a file name's bytes that are not UTF-8,
# which a strict standard output refuses with a traceback)
TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def terminal_safe(text: str) -> str:
    """``text`` with every character of :data:`TERMINAL_CONTROLS` escaped (``\\x1b``, ``\\udcff``), its
    lines left as they are: what a command writes to its console (``command.NamedConsole``) quotes
    names from the user's files, whose escape sequences would retitle or redraw the terminal."""
    return TERMINAL_CONTROLS.sub(lambda found: _escaped(found.group()), text)


def _escaped(char: str) -> str:
    return repr(char)[1:-1]


def preview(items: list[str], limit: int = 6) -> str:
    """The first ``limit`` of ``items`` and how many more, for a message that names them in one line:
    ``a, b, c, ... 4 more``."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def _printable(name) -> str:
    text = os.fsdecode(name) if isinstance(name, bytes | os.PathLike) else str(name)
    return text if text.isprintable() else repr(text)  # a newline in a path would break the line


RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def refused_global(err: BaseException) -> str | None:
    """The global (``os.system``, ``numpy.dtype``...) that torch's weights_only unpickler refused to
    load, as its error names it ("GLOBAL os.system"); None when it names none (a damaged file)."""
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    return named.group(1) if named else None


def as_os_error(err: Exception, path=None) -> Exception:
    """``err`` as the ``OSError`` it reports (about ``path``, when known), when it is one in disguise:
    the Rust ``tokenizers`` library raises plain ``Exception("No space left on device (os error 28)")``,
    safetensors a ``SafetensorError`` with the same words. Else ``err``."""
    found = RUST_IO_ERROR.search(str(err))
    if isinstance(err, OSError) or found is None:
        return err
    code = int(found.group(1))
    return OSError(code, os.strerror(code), *([] if path is None else [os.fspath(path)]))


# How gloo and NCCL report, on the ranks still running, that another rank left mid-collective (it
# failed, or was killed), and that one stopped answering (frozen, or a node gone) until the timeout
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")
PEER_SILENT = ("Timed out waiting", "Watchdog caught collective operation timeout")


def several_ranks() -> bool:
    """Whether this process is a rank of a process group of several (never importing torch for it)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lost_rank_line(err: BaseException) -> str | None:
    """One line for a collective that failed because another rank left or froze, or None. That rank's
    own message says why; the traceback every other rank printed (gloo's "Connection closed by peer",
    40 lines each) buried it."""
    if not several_ranks():  # only a rank of several has other ranks to lose
        return None
    text = str(err)
    rank = os.environ.get("RANK")
    this = f"rank {rank}" if rank and rank.isascii() and rank.isdigit() else "this rank"
    if any(words in text for words in PEER_GONE):
        return f"{this} stops: another rank ended in the middle of a collective; its own error says why"
    if any(words in text for words in PEER_SILENT):
        return (
            f"{this} stops: another rank did not answer a collective within --dist_timeout (frozen, "
            "or its node is gone); its log says why"
        )
    return None


# What torch's CPU allocator says when the system refuses it memory (a RuntimeError, not torch's
# OutOfMemoryError, as of torch 2.13); the GPU's allocator raises ``torch.OutOfMemoryError``.
CPU_ALLOCATOR_REFUSAL = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+)")
# The figures that open torch's CUDA message; advice on the allocator's settings follows them
CUDA_OUT_OF_MEMORY = re.compile(
    r"CUDA out of memory\. Tried to allocate (\S+ \S+)\. GPU (\d+) has a total capacity of (\S+ \S+) "
    r"of which (\S+ \S+) is free\."
)
# A CUDA call outside torch's caching allocator that failed for memory (a library's workspace, a
# context): a plain RuntimeError
CUDA_DRIVER_OUT_OF_MEMORY = "CUDA error: out of memory"
MORE_MEMORY = "close what else holds memory there, or run on a machine with more"


def out_of_memory_line(err: BaseException, fixes: str = MORE_MEMORY) -> str | None:
    """One line for memory running out (torch's ``OutOfMemoryError`` on a GPU, the CUDA driver's
    "out of memory", torch's CPU allocator refused): where, how much was asked for and free, and
    ``fixes`` (the command's flags that need less). None for any other error."""
    if not isinstance(err, RuntimeError):  # torch.OutOfMemoryError is one
        return None
    text = str(err).strip()
    refused = CPU_ALLOCATOR_REFUSAL.search(text)
    if refused:
        where = f"on the CPU (asked for {int(refused.group(1)) / 2**30:,.2f} GiB more)"
    elif text.startswith(CUDA_DRIVER_OUT_OF_MEMORY):
        where = "on the GPU (the CUDA driver could not allocate)"
    elif type(err).__name__ == "OutOfMemoryError":
        figures = CUDA_OUT_OF_MEMORY.search(text)
        if figures:
            asked, gpu, total, free = figures.groups()
            where = f"on the GPU (asked for {asked} more with {free} of GPU {gpu}'s {total} free)"
        else:  # another wording: its first line, cut short
            where = f"on the GPU ({first_line(err)[:200]})"
    else:
        return None
    return f"out of memory {where}; {fixes}"


def native_panic_line(err: BaseException) -> str:
    """What to say when a library's native code panicked (the tokenizer is the usual suspect)."""
    return (
        f"a library's native code failed ({first_line(err) or 'a Rust panic'}); most often the "
        "tokenizer: a normalizer or pre-tokenizer regex that cannot run on this text (too much "
        "backtracking). Use another tokenizer, or simplify that regex in its tokenizer.json"
    )


def refusal_line(
    err: BaseException, output: str | None = None, memory_fixes: str = MORE_MEMORY
) -> str | None:
    """The one line a command ends in (exit 2) when ``err`` is something the user can mend, else None
    (a bug, which keeps its traceback; a signal; a lost rank). Mendable: a :class:`UserError`; a file
    operation the system refused (an ``OSError`` with an errno, or a library's in disguise, named by
    ``output`` when it names no file; a console write, :class:`ConsoleError`, by its stream); memory
    running out (``memory_fixes``: the command's flags that need less); a library's native panic. Both
    the command's end and rank 0's share of a collective section (``train.distributed.on_rank_zero``)
    ask this, so every rank agrees on the exit code."""
    if isinstance(err, UserError):
        return one_line(str(err))
    if isinstance(err, ConsoleError):
        return console_line(err)
    refused = as_os_error(err) if isinstance(err, Exception) else err
    if isinstance(refused, OSError):
        return os_error_line(refused, output) if refused.errno is not None else None
    line = out_of_memory_line(err, memory_fixes)
    if line is None and is_native_panic(err):
        line = native_panic_line(err)
    return None if line is None else one_line(line)
