"""What the system refuses (a name too long, no permission, a full disk) ends in one line, exit 2.

Any path a user hands over can meet such a refusal at its first ``exists()`` or ``open()``, deep in
any command; ``ds_sft.command.execute`` turns every ``OSError`` that carries an errno into one line
(:func:`ds_sft.errors.os_error_line`). The matrix below gives every path flag of every command a
name the kernel refuses; before that net, most of them ended in a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.command import execute, main_for
from ds_sft.errors import OS_ERROR_FIXES, as_os_error
from tests.train.helpers import REPO_ROOT, write_data_dir
from tests.unprivileged import unprivileged

TOO_LONG = "n" * 300  # one path component over NAME_MAX (255): ENAMETOOLONG at the first stat


def run_module(raise_this: BaseException) -> tuple[int, list[str]]:
    """Exit code and stderr lines of a command whose ``run`` raises ``raise_this``."""

    def run(args):
        raise raise_this

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = execute("ds-sft test", types.SimpleNamespace(run=run), None)
    return code, stderr.getvalue().splitlines()


@given(
    code=st.sampled_from(sorted(errno.errorcode)),
    names=st.lists(st.text(min_size=1, max_size=40), min_size=0, max_size=2),
)
def test_any_refused_file_operation_is_one_line_naming_the_paths(code, names):
    # OSError(errno, strerror, filename, winerror, filename2): rename's two paths, or one, or none
    args = (names[0], None, names[1]) if len(names) == 2 else tuple(names)
    exit_code, lines = run_module(OSError(code, os.strerror(code), *args))
    assert exit_code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("ds-sft test: error: ") and os.strerror(code) in lines[0]
    for name in names:
        assert (name if name.isprintable() else repr(name)) in lines[0]
    assert lines[0].endswith(OS_ERROR_FIXES.get(code, "check the path and the machine, then run again"))


def test_an_oserror_without_errno_is_a_bug_and_keeps_its_traceback():
    with pytest.raises(OSError, match="a library's own words"):
        run_module(OSError("a library's own words"))


def test_tokenizers_disguised_io_errors_become_oserrors():
    disguised = Exception("No space left on device (os error 28)")
    err = as_os_error(disguised, Path("/out/tokenizer"))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.filename == "/out/tokenizer"
    plain = ValueError("a bug")
    assert as_os_error(plain, "x") is plain


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data"))


# (command, flags): {long} is a path with a component the kernel refuses; {data} a prepared data dir.
PATH_FLAGS = [
    ("prepare", ["--alpaca", "{long}.json", "--output_dir", "{out}"]),
    ("prepare", ["--gsm8k", "{long}.jsonl", "--output_dir", "{out}"]),
    ("prepare", ["--dolly", "{long}.jsonl", "--output_dir", "{out}"]),
    ("prepare", ["--source", "mine={long}.jsonl", "--output_dir", "{out}"]),
    ("prepare", ["--alpaca", "{rows}", "--gsm8k_test", "{long}.jsonl", "--output_dir", "{out}"]),
    ("prepare", ["--alpaca", "{rows}", "--tokenizer", "{long}", "--output_dir", "{out}"]),
    ("prepare", ["--alpaca", "{rows}", "--base_model", "{long}", "--output_dir", "{out}"]),
    ("prepare", ["--alpaca", "{rows}", "--output_dir", "{long}"]),
    ("train", ["--data_dir", "{long}", "--model", "tiny", "--out_dir", "{out}"]),
    ("train", ["--data_dir", "{data}", "--base_model", "{long}", "--out_dir", "{out}"]),
    ("train", ["--data_dir", "{data}", "--model", "tiny", "--out_dir", "{long}"]),
    (
        "train",
        [
            "--data_dir",
            "{data}",
            "--model",
            "tiny",
            "--deepspeed_config",
            "{long}.json",
            "--out_dir",
            "{out}",
        ],
    ),
    ("train", ["--data_dir", "{data}", "--model", "tiny", "--out_dir", "{out}", "--resume", "{long}"]),
    ("eval", ["--model", "{long}", "--data_dir", "{data}", "--out", "{out}"]),
    ("eval", ["--model", "{run}", "--data_dir", "{long}", "--out", "{out}"]),
    ("eval", ["--model", "{run}", "--data_dir", "{data}", "--out", "{long}"]),
    ("eval", ["--model", "{run}", "--data_dir", "{data}", "--out", "{out}", "--gsm8k_test", "{long}.jsonl"]),
    ("export", ["--base_model", "{long}", "--hf", "{out}"]),
    ("export", ["--base_model", "{run}", "--hf", "{long}"]),
    ("export", ["--base_model", "{run}", "--hf", "{out}", "--tokenizer", "{long}"]),
]


def refused_flag(command: str, flags: list[str]) -> str:
    return (
        f"{command} {next(flag for flag, value in zip(flags, flags[1:], strict=False) if '{long}' in value)}"
    )


@pytest.mark.parametrize(("command", "flags"), PATH_FLAGS, ids=[refused_flag(*case) for case in PATH_FLAGS])
def test_every_path_flag_given_a_name_the_kernel_refuses_is_one_line(
    command, flags, data_dir, tmp_path, monkeypatch, capsys
):
    from tests.data.helpers import alpaca_rows, write_jsonl

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    rows = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(12))
    run = tmp_path / "run"  # a model folder to read: exists, so only the refused path can fail
    run.mkdir()
    values = {
        "long": str(tmp_path / TOO_LONG),
        "data": str(data_dir),
        "out": str(tmp_path / "out"),
        "rows": str(rows),
        "run": str(run),
    }
    argv = [flag.format(**values) for flag in flags]
    code = main_for(command, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"ds-sft {command}: error: "), err
    assert not (tmp_path / "out").exists()


def test_an_unreadable_input_file_is_one_line_through_the_console_command(tmp_path):
    from tests.data.helpers import alpaca_rows, write_jsonl

    rows = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(12))
    rows.chmod(0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [*unprivileged(), sys.executable, "-m", "ds_sft.cli", "prepare", "--alpaca", str(rows),
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr[-2000:]
    assert str(rows) in err[0] and "Permission denied" in err[0]
    assert not (tmp_path / "out").exists()


# What a command runs, under a 4 KiB file-size limit (the kernel refuses a write past it, EFBIG, as it
# refuses one to a full disk, ENOSPC): a library writer's refusal, and a write through an open handle.
LIMITED = """
import io, json, resource, signal, sys, types, contextlib
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
import torch
from ds_sft.command import execute
how, out = sys.argv[1], Path(sys.argv[2])

def run(args):
    if how == "safetensors":  # through replace_file, as final/ and export write their weights
        from ds_sft.model.checkpoint import save_weights
        save_weights({"w": torch.zeros(10_000)}, out / "model.safetensors")
    elif how == "tokenizers":  # a library's own save, as export's tokenizer
        from tokenizers import Tokenizer, models
        vocab = {chr(97 + i % 26) * (1 + i // 26): i for i in range(2000)}
        Tokenizer(models.BPE(vocab=vocab, merges=[])).save(str(out / "tokenizer.json"))
    else:  # a handle opened before the disk filled: metrics.jsonl, a report
        with open(out / "metrics.jsonl", "w") as handle:
            handle.write("x" * 10_000)
            handle.flush()

sys.exit(execute("ds-sft test", types.SimpleNamespace(run=run, OUTPUT_FLAG="out_dir"),
                 types.SimpleNamespace(out_dir=str(out))))
"""


@pytest.mark.parametrize("how", ["safetensors", "tokenizers", "open handle"])
def test_a_write_the_system_refuses_is_one_line_naming_the_file_or_the_output(tmp_path, how):
    """safetensors and tokenizers report a full disk in their own exception types ("(os error 28)"):
    final/'s weights and an export ended in a traceback. A write through an open handle names no file:
    the line said "No space left on device; free some space there", and not where."""
    out = tmp_path / "out"
    out.mkdir()
    said = subprocess.run([sys.executable, "-c", LIMITED, how, str(out)], capture_output=True, text=True,
                          cwd=REPO_ROOT, check=False)  # fmt: skip
    lines = said.stderr.strip().splitlines()
    assert (said.returncode, len(lines)) == (2, 1), said.stderr[-3000:]
    named = out / "model.safetensors" if how == "safetensors" else f"writing to {out}"
    fix = OS_ERROR_FIXES[errno.EFBIG]
    assert lines[0] == f"ds-sft test: error: {named}: {os.strerror(errno.EFBIG)}; {fix}"
    assert not list(out.glob(".*.tmp")), "replace_file's temporary file was left behind"
