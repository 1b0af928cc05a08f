"""A flag that another choice makes do nothing is refused in one line, naming it (ds_sft.options.Ignored).

`ds-sft eval --no_val --val_rows 5` measured no val rows and said nothing: the report read as the
5-row eval asked for. The matrix below gives every value flag of `eval` and `prepare` under every
combination of the switches that skip work, and compares the parser's answer with an oracle written
from what each stage reads (not from the rules): refused exactly when nothing reads the flag.
"""

from __future__ import annotations

import itertools

import pytest

from ds_sft.cli import build_parser
from ds_sft.options import Ignored, OneLineParser, refuse_ignored

EVAL_FLAGS = {
    "--val_rows": "5",
    "--batch_size": "4",
    "--gsm8k_limit": "3",
    "--gsm8k_test": "t.jsonl",
    "--seed": "1",
    "--max_new_tokens": "8",
    "--generate_batch_size": "2",
    "--repetition_penalty": "1.1",
    "--dtype": "float32",
    "--threads": "1",
    "--device": "cpu",
    "--out": "o",
}
EVAL_SWITCHES = {
    "no_val": ["--no_val"],
    "no_gsm8k": ["--no_gsm8k"],
    "no_generate": ["--no_generate"],
    "harness": ["--harness", "task.yaml"],
    "limit": ["--gsm8k_limit", "3"],
}


def eval_reads(flag: str, on: set[str]) -> bool:
    """Does some stage of `ds-sft eval` read ``flag`` with the switches ``on``?"""
    val = "no_val" not in on
    gsm8k = "no_gsm8k" not in on
    own_answers = gsm8k or "no_generate" not in on  # ds-sft's generate(): GSM8K, the fixed prompts
    reads = {
        "--val_rows": val,
        "--batch_size": val,
        "--gsm8k_limit": gsm8k,
        "--gsm8k_test": gsm8k,
        "--seed": gsm8k and "limit" in on,  # it draws the --gsm8k_limit subset
        "--max_new_tokens": own_answers or "harness" in on,
        "--generate_batch_size": own_answers or "harness" in on,
        "--repetition_penalty": own_answers,
    }
    return reads.get(flag, True)


def _subsets(names):
    return [set(c) for r in range(len(names) + 1) for c in itertools.combinations(sorted(names), r)]


EVAL_CASES = [
    (flag, on)
    for flag in EVAL_FLAGS
    for on in _subsets(EVAL_SWITCHES)
    # --gsm8k_limit is itself under test: as a switch only where it is read
    if not ("limit" in on and (flag == "--gsm8k_limit" or "no_gsm8k" in on))
]


def _error(argv: list[str], capsys) -> str | None:
    """The parser's error line for ``argv``, or None when it parses."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as stop:
        assert stop.code == 2
        return capsys.readouterr().err
    return None


@pytest.mark.parametrize(
    ("flag", "on"), EVAL_CASES, ids=[f"{f}-{'+'.join(sorted(o))}" for f, o in EVAL_CASES]
)
def test_an_eval_flag_nothing_reads_is_refused(flag, on, capsys):
    argv = ["eval", "--model", "m", "--data_dir", "d", flag, EVAL_FLAGS[flag]]
    argv += [word for name in sorted(on) for word in EVAL_SWITCHES[name]]
    _refused_unless_read(argv, flag, eval_reads(flag, on), capsys)


def _refused_unless_read(argv: list[str], flag: str, read: bool, capsys) -> None:
    """``argv`` parses when its command reads ``flag``; else it stops in one line naming the flag."""
    error = _error(argv, capsys)
    if read:
        assert error is None
    else:
        assert error is not None and error.count("\n") == 1, error
        assert error.startswith(f"ds-sft {argv[0]}: error: argument {flag}: has no effect ")


PREPARE_FLAGS = {"--min_val_rows": "3", "--gsm8k_test": "t.jsonl", "--seed": "2", "--seq_len": "64"}
PREPARE_SWITCHES = {"no_val": ["--val_fraction", "0"], "no_decontam": ["--decontam_threshold", "0"]}


def prepare_reads(flag: str, on: set[str]) -> bool:
    reads = {"--min_val_rows": "no_val" not in on, "--gsm8k_test": "no_decontam" not in on}
    return reads.get(flag, True)


PREPARE_CASES = [(flag, on) for flag in PREPARE_FLAGS for on in _subsets(PREPARE_SWITCHES)]


@pytest.mark.parametrize(
    ("flag", "on"), PREPARE_CASES, ids=[f"{f}-{'+'.join(sorted(o))}" for f, o in PREPARE_CASES]
)
def test_a_prepare_flag_nothing_reads_is_refused(flag, on, capsys):
    argv = ["prepare", "--alpaca", "a.json", flag, PREPARE_FLAGS[flag]]
    argv += [word for name in sorted(on) for word in PREPARE_SWITCHES[name]]
    _refused_unless_read(argv, flag, prepare_reads(flag, on), capsys)


@pytest.mark.parametrize("mode", ["offline", "online", "disabled", None])
def test_a_train_wandb_project_without_a_wandb_run_is_refused(mode, capsys):
    argv = ["train", "--model", "tiny", "--data_dir", "d", "--wandb_project", "p"]
    error = _error(argv + (["--wandb_mode", mode] if mode else []), capsys)
    if mode == "disabled":  # wandb starts no run: the project names nothing
        assert error is not None and error.count("\n") == 1
        assert error.startswith("ds-sft train: error: argument --wandb_project: has no effect ")
    else:
        assert error is None


@pytest.mark.parametrize(
    "argv",
    [
        [
            "eval",
            "--model",
            "m",
            "--data_dir",
            "d",
            "--no_val",
            "--no_gsm8k",
            "--no_generate",
            "--harness",
            "t",
        ],
        ["eval", "--model", "m", "--data_dir", "d", "--no_val", "--no_gsm8k"],
        ["prepare", "--alpaca", "a.json", "--val_fraction", "0", "--decontam_threshold", "0"],
    ],
)
def test_a_default_is_never_an_objection(argv, capsys):
    """Only a flag the user typed is refused: the defaults of --batch_size, --seed, --min_val_rows..."""
    assert _error(argv, capsys) is None


def test_a_rule_must_name_a_flag_of_its_parser():
    parser = OneLineParser(prog="p")
    parser.add_argument("--a")
    with pytest.raises(ValueError, match="--b is not a flag of p"):
        refuse_ignored(parser, Ignored("--b", lambda args: True, "never"))


def test_an_eval_that_measures_nothing_is_refused(tmp_path, capsys):
    """Every stage skipped: the model loaded and an empty report was written, exit 0."""
    from ds_sft.cli import main

    argv = ["eval", "--model", "m", "--data_dir", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main([*argv, "--no_val", "--no_gsm8k", "--no_generate"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "leave nothing to evaluate" in error
    assert not (tmp_path / "out").exists()
