"""Hostile strings never drive the user's terminal: a name or a value that holds an escape sequence, a
newline, a C1 control or bytes that are not UTF-8 shows escaped in every line ds-sft prints.

Each payload goes in through one of the places a user's string enters (a data dir's source names,
a data file's path, a flag's value, a tokenizer, model or DeepSpeed config path, an output folder),
and the command runs in process through ``ds_sft.cli.main``. What it printed must hold no control
character but the newline and the carriage return its lines and progress bars use, and no line of
it may start with the payload's forged ``warning:``/``error:``.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest

from ds_sft.cli import main

from .conftest import word_tokenizer, write_tiny_data_dir

FORGED = "warning: forged"
PAYLOADS = {
    "OSC title": "\x1b]0;PWNED\x07",
    "CSI clear": "\x1b[2J\x1b[H",
    "carriage return": "\r" + FORGED,
    "newline": "\n" + FORGED,
    "newline error": "\nerror: forged",
    "C1 CSI": "\x9b2J",
    "DEL": "\x7f",
    "backspace": "\b\b\b" + FORGED,
    "not UTF-8": os.fsdecode(b"\xff\xfe"),  # surrogateescape: \udcff\udcfe
}


def assert_terminal_safe(printed: str) -> None:
    raw = sorted({c for c in printed if unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\r"})
    assert not raw, f"raw control characters {raw!r} in:\n{printed!r}"
    for line in printed.replace("\r", "\n").split("\n"):
        assert not line.startswith(("warning: forged", "error: forged")), f"a forged line in:\n{printed!r}"


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and all ds-sft printed; a bad flag ends the parser with SystemExit."""
    try:
        code = main(argv)
    except SystemExit as stopped:
        code = stopped.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data dir with a tokenizer, a tiny model folder) for train and eval."""
    from ds_sft.model.checkpoint import save_model
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    root = tmp_path_factory.mktemp("tiny")
    data = write_tiny_data_dir(root / "data", tokenizer=word_tokenizer(root / "tok", "w"))
    model = save_model(LlamaModel(ModelConfig.preset("tiny")), root / "model")
    return data, model


def data_named(tiny, tmp_path: Path, source: str) -> Path:
    """A copy of the tiny data dir whose manifest names its first source ``source``."""
    import shutil

    data = Path(shutil.copytree(tiny[0], tmp_path / "data"))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["sources"][0] = "alpaca" + source
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny", "--data_dir", str(data), "--out_dir", str(out), "--max_iters", "1",
            "--eval_interval", "1", "--eval_iters", "1", "--micro_batch_size", "2", "--grad_accum", "1",
            "--wandb_mode", "disabled", "--precision", "fp32", *extra]  # fmt: skip


def eval_argv(model: Path, data: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(model), "--data_dir", str(data), "--no_gsm8k", "--no_generate",
            "--val_rows", "2", "--out", str(out)]  # fmt: skip


def refused_name(printed: str) -> bool:
    """The manifest's name refused by the source-name rule, or, for a lone surrogate (the not-UTF-8
    payload as JSON holds it), by the JSON reader before any rule is asked."""
    return "source name 'alpaca" in printed or '"sources.0" holds a \\u escape of half' in printed


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_a_source_name_in_the_manifest_is_refused_escaped_by_train(payload, tiny, tmp_path, capsys):
    code, printed = run(train_argv(data_named(tiny, tmp_path, payload), tmp_path / "run"), capsys)
    assert_terminal_safe(printed)
    assert code == 2 and refused_name(printed)


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_a_source_name_in_the_manifest_is_refused_escaped_by_eval(payload, tiny, tmp_path, capsys):
    code, printed = run(eval_argv(tiny[1], data_named(tiny, tmp_path, payload), tmp_path / "eval"), capsys)
    assert_terminal_safe(printed)
    assert code == 2 and refused_name(printed)


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_an_existing_model_path_is_refused_escaped_by_eval(payload, tiny, tmp_path, capsys):
    """eval printed the model's path in a note, above its results ("== model: PATH") and in their
    line: a newline or a carriage return in it forged lines, an escape drove the terminal."""
    import shutil

    model = Path(shutil.copytree(tiny[1], tmp_path / f"model{payload}"))
    code, printed = run(eval_argv(model, tiny[0], tmp_path / "eval"), capsys)
    assert_terminal_safe(printed)
    assert code == 2, printed


# argparse's own refusals that quote what the user typed raw ("unrecognized arguments: ..."): they
# forged lines and drove the terminal until OneLineParser.error escaped its line
ARGPARSE_QUOTED = {
    "a flag ds-sft does not know": lambda payload: ["train", "--data_dir", "d", f"--unknown{payload}"],
    "a stray argument": lambda payload: ["prepare", f"stray{payload}"],
}


@pytest.mark.parametrize("entry", ARGPARSE_QUOTED)
@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_argparse_quotes_what_was_typed_escaped(payload, entry, capsys):
    code, printed = run(ARGPARSE_QUOTED[entry](payload), capsys)
    assert_terminal_safe(printed)
    assert code == 2, printed


def refusals(tiny, tmp_path: Path, payload: str) -> dict[str, list[str]]:
    """ds-sft's refusals of a flag's value, each quoting it (already escaped before the flag rule;
    these keep them so)."""
    data, model = tiny
    missing = str(tmp_path / f"missing{payload}")
    return {
        "a number flag's value": ["train", "--max_iters", f"1{payload}"],
        "a choice flag's value": ["train", "--precision", f"bf16{payload}"],
        "a data file's path": ["prepare", "--source", f"mine={missing}.jsonl", "--output_dir",
                               str(tmp_path / "prep")],
        "a --source name": ["prepare", "--source", f"mine{payload}=rows.jsonl", "--output_dir",
                            str(tmp_path / "prep")],
        "a --deepspeed_config path": train_argv(data, tmp_path / "run", "--deepspeed_config", missing),
        "a tokenizer path": ["prepare", "--tokenizer", missing, "--output_dir", str(tmp_path / "prep")],
        "a --base_model path": train_argv(data, tmp_path / "run", "--base_model", missing),
        "an --out_dir name": train_argv(data, tmp_path / f"run{payload}"),
        "an eval --out name": eval_argv(model, data, tmp_path / f"eval{payload}"),
    }  # fmt: skip


@pytest.mark.parametrize("entry", list(refusals((Path("d"), Path("m")), Path("t"), "")))
@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_a_refusal_quotes_the_users_value_escaped(payload, entry, tiny, tmp_path, capsys):
    code, printed = run(refusals(tiny, tmp_path, payload)[entry], capsys)
    assert_terminal_safe(printed)
    assert code == 2, printed
