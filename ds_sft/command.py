"""How a subcommand is wired: one module per command exposing ``add_arguments`` and ``run``.

A command module (``ds_sft.data.prepare``, ``ds_sft.train.cli``, ...) defines::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int | None: ...

and keeps heavy imports (torch, deepspeed, datasets, transformers) inside ``run`` so that
``ds-sft --help`` answers instantly. The same module runs as ``python -m <module>`` through
:func:`main_for`, which is how the deepspeed launcher and torchrun start the trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from ds_sft.errors import MORE_MEMORY, ConsoleError, lost_rank_line, refusal_line, terminal_safe

# name -> (module, one-line summary). Modules are imported only when their command is used.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("ds_sft.data.prepare", "clean, dedup, decontaminate, tokenize, pack, split a mix"),
    "train": ("ds_sft.train.cli", "fine-tune with the DeepSpeed engine (1 process, launcher, torchrun)"),
    "eval": ("ds_sft.eval.cli", "val loss / perplexity per source, GSM8K accuracy, sample generations"),
    "export": ("ds_sft.export", "write a checkpoint as a Hugging Face LLaMA model"),
    "bench": ("ds_sft.bench", "run the side-by-side benchmarks in bench/ and print their ratios"),
}


def load_command(name: str):
    """Import the module implementing command ``name``."""
    return importlib.import_module(COMMANDS[name][0])


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is. A KeyboardInterrupt, so that every cleanup
    written for Ctrl-C runs for them too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# kill, a scheduler's timeout, a closed terminal: by default each ended the process on the spot, so
# no `finally` ran: a benchmark script in its own session ran on, a demo stage was left orphaned.
UNWINDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_unwind():
    """Inside the block, SIGTERM and SIGHUP raise :class:`Terminated`, as Ctrl-C raises
    KeyboardInterrupt. A signal the process was started with ignored stays ignored (``nohup``), and
    a handler already set is kept; the training loop sets its own (save a checkpoint, then stop)."""

    def unwind(signum, frame):
        raise Terminated(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in UNWINDING_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                previous[signum] = signal.signal(signum, unwind)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class NamedConsole:
    """``sys.stdout`` or ``sys.stderr`` while a command runs: the same stream, whose refused writes
    raise :class:`~ds_sft.errors.ConsoleError` naming it, and which shows the characters that drive a
    terminal escaped (:func:`~ds_sft.errors.terminal_safe`). Refused, a console write was an ``OSError``
    naming no file, which the command's one line blamed on its output folder ("writing to runs/x: No
    space left on device" with stdout on /dev/full and the disk half empty). Every line a command
    prints passes here, and many quote a name from the user's files (a data dir's source names, a
    model's path): one holding an escape sequence retitled or redrew the terminal."""

    def __init__(self, stream, name: str):
        self._stream = stream
        self._name = name

    def write(self, text):
        try:
            self._stream.write(terminal_safe(text))
        except OSError as err:
            raise ConsoleError(self._name, err) from None
        return len(text)  # all of the caller's text is written, some of it as escapes

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as err:
            raise ConsoleError(self._name, err) from None

    def isatty(self):
        """False, even on a terminal: libraries that colour or redraw their lines on one (wandb, click)
        then print them plain, where their escapes would show as ``\\x1b[34m``."""
        return False

    def __getattr__(self, attribute):  # fileno, encoding...: the stream's own
        return getattr(self._stream, attribute)


CONSOLE = (("stdout", "the standard output"), ("stderr", "the standard error"))


@contextlib.contextmanager
def console_named():
    """Inside the block, the console streams are :class:`NamedConsole` s, and a log record that cannot
    be written is dropped (``logging.raiseExceptions`` off): a handler on a refused stream printed a
    20-line traceback per record, while the command's own next write ends it in one line. A stdout
    found refused is pointed at /dev/null as the block ends, so that the interpreter's last flush of
    it does not print a traceback of its own."""
    import logging

    saved = {attribute: getattr(sys, attribute) for attribute, _ in CONSOLE}
    raising, logging.raiseExceptions = logging.raiseExceptions, False
    for attribute, name in CONSOLE:
        if saved[attribute] is not None:  # None: the process was started with it closed
            setattr(sys, attribute, NamedConsole(saved[attribute], name))
    try:
        yield
    except ConsoleError as err:
        if err.filename == "the standard output":
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), saved["stdout"].fileno())
        raise
    finally:
        for attribute, stream in saved.items():
            setattr(sys, attribute, stream)
        logging.raiseExceptions = raising


def interrupted(prog: str) -> int:
    """Say that Ctrl-C stopped ``prog``; the exit code a shell gives a process SIGINT ended."""
    print(f"{prog}: interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


@contextlib.contextmanager
def reading_the_command_line(prog: str):
    """Around building the parser and parsing: Ctrl-C there ends in one line, exit 130, as it does
    while the command runs. Building ``ds-sft``'s parser imports every command module (0.3 s of a
    0.4 s start), and a Ctrl-C in it was a KeyboardInterrupt traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(interrupted(prog)) from None


def execute(prog: str, module, args: argparse.Namespace) -> int:
    """Run ``module.run(args)``, turning a :class:`UserError`, an ``OSError`` the system raised
    for a path (permissions, disk full...), or memory running out (with the module's
    ``OUT_OF_MEMORY_FIXES``: the flags that need less) into one line on stderr and exit 2. Ctrl-C, SIGTERM and
    SIGHUP unwind the command (its cleanup runs) and end in one line, exit 128 + the signal, unless
    the module sets ``UNWINDS_ON_SIGTERM = False``: a Python handler runs only between bytecodes, so a
    process waiting in C code (a rank in its rendezvous) would outlive a SIGTERM until the wait ends."""
    unwinding = signals_unwind() if getattr(module, "UNWINDS_ON_SIGTERM", True) else contextlib.nullcontext()
    try:
        with console_named(), unwinding:
            code = module.run(args)
    except Terminated as err:
        print(f"{prog}: stopped by {signal.Signals(err.signum).name}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        return interrupted(prog)
    except BaseException as err:
        line = refusal_line(err, output_of(module, args), getattr(module, "OUT_OF_MEMORY_FIXES", MORE_MEMORY))
        if line is not None:
            with contextlib.suppress(OSError):  # a refused stderr is the refusal itself: nowhere to say it
                print(f"{prog}: error: {line}", file=sys.stderr)
            return 2
        lost = lost_rank_line(err)
        if lost is None:  # a bug to look at
            raise
        print(f"{prog}: error: {lost}", file=sys.stderr)  # not this rank's fault: exit 1, not 2
        return 1
    return int(code or 0)


def output_of(module, args: argparse.Namespace) -> str | None:
    """The folder the command writes to (its ``OUTPUT_FLAG``'s value), named in a refusal that names no
    file: "No space left on device" alone did not say where."""
    flag = getattr(module, "OUTPUT_FLAG", None)
    value = getattr(args, flag, None) if flag else None
    return str(value) if value is not None else None


def script_parser(file: str, description: str) -> argparse.ArgumentParser:
    """The parser of the script ``file`` in ``bench/``: one-line errors, named ``bench/<file>``."""
    from ds_sft.options import HelpFormatter, OneLineParser

    return OneLineParser(
        prog=f"bench/{Path(file).name}",
        description=description,
        formatter_class=HelpFormatter,
    )


def main_for_script(module, argv: Sequence[str] | None = None) -> int:
    """Entry point of a script in ``bench/``: parse ``module.build_parser()``'s flags, run
    ``module.run(args)``, and end a bad flag, a :class:`UserError` or a system error in one line."""
    with reading_the_command_line(f"bench/{Path(module.__file__).name}"):
        parser = module.build_parser()
        args = parser.parse_args(argv)
    return execute(parser.prog, module, args)


def main_for(name: str, argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m <command module>``: parse that command's flags and run it."""
    from ds_sft.options import HelpFormatter, OneLineParser

    with reading_the_command_line(f"ds-sft {name}"):
        module = load_command(name)
        parser = OneLineParser(
            prog=f"python -m {COMMANDS[name][0]}",
            description=module.__doc__,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(parser)
        args = parser.parse_args(argv)
    return execute(f"ds-sft {name}", module, args)
