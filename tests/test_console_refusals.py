"""A console that cannot be written (stdout on a full device, into a pipe whose reader left, on a
terminal that went away) ends a command in one line that names the console, never the output folder.

A write to stdout that the system refuses is an ``OSError`` naming no file; the command's one line
named its output folder instead ("writing to runs/x: No space left on device; free some space there"
with stdout on /dev/full and the disk half empty), or nothing ("Broken pipe; check the path and the
machine"), and a DeepSpeed log record on the same stdout printed a 20-line logging traceback first.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ds_sft.command import execute

# What the system answers a console write with: a full device, a quota, a file-size limit, a reader
# gone, a terminal gone, a descriptor closed under the process
REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE, errno.EIO, errno.EBADF)


class RefusedStream(io.StringIO):
    """A console stream whose every write and flush the system refuses with ``code``."""

    def __init__(self, code: int):
        super().__init__()
        self.code = code

    def write(self, text):
        raise OSError(self.code, os.strerror(self.code))

    def flush(self):
        raise OSError(self.code, os.strerror(self.code))


def run_printing(code: int, how: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of a command (its output folder named by ``--out``) whose stdout
    refuses every write, and which writes to it as ``how`` says."""
    logger = logging.getLogger("a_library")

    def run(args):
        if how == "print":
            print("step 1 done")
        elif how == "flush":
            sys.stdout.flush()
        elif how == "writelines":
            sys.stdout.writelines(["a\n", "b\n"])
        else:  # a library's log record, then the command's own line
            logger.warning("a library's warning")
            print("step 1 done")
        return 0

    module = types.SimpleNamespace(run=run, OUTPUT_FLAG="out")
    stderr = io.StringIO()
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(RefusedStream(code)), contextlib.redirect_stderr(stderr):
            handler.stream = sys.stdout  # as a library points its handler at stdout
            exit_code = execute("ds-sft test", module, types.SimpleNamespace(out="/data/runs/x"))
    finally:
        handler.stream = io.StringIO()
        logger.removeHandler(handler)
        handler.close()
    return exit_code, stderr.getvalue().splitlines()


@pytest.mark.parametrize("how", ["print", "flush", "writelines", "a log record"])
@pytest.mark.parametrize("code", REFUSALS, ids=[errno.errorcode[c] for c in REFUSALS])
def test_a_refused_stdout_is_one_line_naming_it(code, how):
    exit_code, lines = run_printing(code, how)
    assert exit_code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("ds-sft test: error: the standard output cannot be written"), lines
    assert os.strerror(code) in lines[0] and "/data/runs/x" not in lines[0]


def test_a_refused_stderr_ends_the_command_without_a_word_or_a_traceback():
    """Nowhere is left to say it: exit 2, and nothing raised."""

    def run(args):
        print("a warning", file=sys.stderr)

    with contextlib.redirect_stderr(RefusedStream(errno.EPIPE)):
        assert execute("ds-sft test", types.SimpleNamespace(run=run), None) == 2


def test_the_console_and_logging_are_as_they_were_after_the_command():
    saved = sys.stdout, sys.stderr, logging.raiseExceptions
    for run in (lambda args: 0, lambda args: print("x", file=sys.stdout) or 1 / 0):
        with contextlib.suppress(ZeroDivisionError):
            execute("ds-sft test", types.SimpleNamespace(run=run), None)
        assert (sys.stdout, sys.stderr, logging.raiseExceptions) == saved


def test_a_command_writing_to_a_working_console_prints_as_before(capsys):
    def run(args):
        print("one", end="")
        sys.stdout.writelines([" two", "\n"])
        print("three", file=sys.stderr, flush=True)
        return 3

    assert execute("ds-sft test", types.SimpleNamespace(run=run), None) == 3
    assert capsys.readouterr() == ("one two\n", "three\n")


@pytest.fixture(scope="module")
def prepare_inputs(tmp_path_factory, tiny_tokenizer_file_for_console):
    folder = tmp_path_factory.mktemp("console")
    rows = [f'{{"instruction": "say {i}", "input": "", "output": "word {i} said"}}' for i in range(40)]
    (folder / "rows.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer_file_for_console(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|endoftext|>": 1} | {chr(c): c - 30 for c in range(32, 127)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.add_special_tokens(["<|endoftext|>"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("console", ["/dev/full", "a pipe its reader closed"])
def test_prepare_with_a_refused_stdout_says_so_through_the_console_command(
    prepare_inputs, tiny_tokenizer_file_for_console, tmp_path, console
):
    """The real process: stdout a device or a pipe, as a shell hands it over."""
    if console == "/dev/full" and not Path("/dev/full").exists():
        pytest.skip("this system has no /dev/full")
    argv = [
        *(sys.executable, "-m", "ds_sft", "prepare", "--source", f"rows={prepare_inputs / 'rows.jsonl'}"),
        *("--tokenizer", str(tiny_tokenizer_file_for_console), "--seq_len", "256", "--min_val_rows", "2"),
        *("--decontam_threshold", "0", "--output_dir", str(tmp_path / "out")),
    ]
    env = {**os.environ, "DS_SFT_SHARED": str(tmp_path / "no_shared"), "PYTHONUNBUFFERED": "1"}
    if console == "/dev/full":
        with open("/dev/full", "w") as stdout:
            done = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
    else:
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True, env=env)
        finally:
            os.close(write)
    last = done.stderr.strip().replace("\r", "\n").splitlines()[-1]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-3000:]
    assert last.startswith("ds-sft prepare: error: the standard output cannot be written"), last
    assert str(tmp_path / "out") not in last
