"""``make demo`` runs again: the demo replaces the run it made itself, and only that one.

The stages are replaced by a recorder that does what ``ds-sft train`` does to its folder (it refuses
an existing run without ``--overwrite``), so the demo's own choice of flags is what is tested.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_sft import demo
from ds_sft.errors import UserError
from ds_sft.train.run_dir import MARKER
from tests.signals import as_from_a_terminal


@pytest.fixture
def stages(monkeypatch):
    calls: list[list[str]] = []

    def stage(title: str, argv: list[str]) -> float:
        calls.append(argv)
        if argv[0] == "train":
            run_dir = demo.Path(argv[argv.index("--out_dir") + 1])
            if (run_dir / "metrics.jsonl").exists() and "--overwrite" not in argv:
                raise SystemExit(f"ds-sft train: error: {run_dir} already holds a training run")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").write_text("{}\n")
            (run_dir / MARKER).write_text("{}\n")
        if argv[0] == "eval":
            eval_dir = demo.Path(argv[argv.index("--out") + 1])
            eval_dir.mkdir(parents=True, exist_ok=True)
            (eval_dir / "eval.json").write_text('{"models": []}')
        return 0.0

    monkeypatch.setattr(demo, "_stage", stage)
    return calls


def demo_args(out) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(["--out", str(out)])


def train_argv(calls: list[list[str]]) -> list[str]:
    return [argv for argv in calls if argv[0] == "train"][-1]


def test_the_demo_runs_again_over_its_own_run(tmp_path, stages):
    out = tmp_path / "demo"
    for _ in range(3):
        assert demo.run(demo_args(out)) == 0
    trains = [argv for argv in stages if argv[0] == "train"]
    assert ["--overwrite" in argv for argv in trains] == [False, True, True]


@pytest.mark.parametrize("made_by", ["the user", "an older demo"])
def test_a_run_the_demo_did_not_make_is_left_alone(tmp_path, stages, made_by):
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "metrics.jsonl").write_text(f"made by {made_by}\n")
    with pytest.raises(UserError, match="the demo did not make it.*DEMO_ARGS='--out"):
        demo.run(demo_args(out))
    assert stages == [], "refused before any stage ran"
    assert (out / "run" / "metrics.jsonl").read_text() == f"made by {made_by}\n"
    assert not (out / demo.DEMO_MARK).exists()


def test_an_older_ds_sfts_demo_folder_is_refused_with_what_to_do(tmp_path, stages):
    """Its run folder has no ownership marker, which train now requires: say so before any stage."""
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "metrics.jsonl").write_text("an older run\n")
    (out / demo.DEMO_MARK).write_text("made by an older demo\n")
    with pytest.raises(UserError, match="made by an older ds-sft.*rm -r .*DEMO_ARGS='--out"):
        demo.run(demo_args(out))
    assert stages == [] and (out / "run" / "metrics.jsonl").read_text() == "an older run\n"


def test_local_sources_reach_prepare_as_its_flags(tmp_path, stages):
    argv = ["--out", str(tmp_path / "demo"), "--source", "alpaca=my a=b.json", "--source", "dolly=d.jsonl"]
    assert demo.main(argv) == 0
    prepare = stages[0]
    assert prepare[: prepare.index("--base_model")] == [
        "prepare",
        "--alpaca",
        "my a=b.json",
        "--dolly",
        "d.jsonl",
    ]


def test_a_path_starting_with_a_dash_reaches_every_stage_as_a_path(tmp_path, stages, monkeypatch):
    """A source file named --force followed prepare's --alpaca (its value is optional): prepare read
    two flags and replaced its output with --force; -o as --out or base model was a stage's error."""
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--out=-o", "--base_model=-m", "--source=alpaca=--force"]) == 0
    words = [word for argv in stages for word in argv[1:]]
    assert {word for word in words if word.startswith("-")} <= {
        f"--{action.dest}" for argv in stages for action in subcommand_parser(argv[0])._actions
    }
    prepare = stages[0]
    assert prepare[1:3] == ["--alpaca", "./--force"] and "./-o/data" in prepare and "./-m" in prepare
    assert (tmp_path / "-o" / "run" / MARKER).exists()


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    from ds_sft.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_iters", "0"], "argument --max_iters: must be an integer from 1"),
        (["--gsm8k_limit", "-5"], "argument --gsm8k_limit: must be an integer from 1"),
        (["--seq_len", "4"], "argument --seq_len: must be an integer from 8"),
        (["--max_examples", "x"], "argument --max_examples: must be an integer"),
        (["--out", "FILE"], "--out FILE: FILE is a file"),
        # --source FLAG=PATH became prepare's --FLAG PATH, whatever FLAG was
        (["--source", "template=chatml"], "argument --source: must be FLAG=PATH with FLAG one of alpaca"),
        (["--source", "decontam_threshold=1"], "argument --source: must be FLAG=PATH"),
        (["--source", "force=x"], "argument --source: must be FLAG=PATH"),
        (["--source", "alpaca"], "argument --source: must be FLAG=PATH"),
        (["--source", "alpaca= "], "argument --source: must be FLAG=PATH"),
        (["--source", "=a.json"], "argument --source: must be FLAG=PATH"),
        (["--source", "alpaca=a.json", "--source", "alpaca=b.json"], "--source alpaca=... is given twice"),
    ],
)
def test_a_bad_demo_flag_is_one_line_before_any_stage(tmp_path, stages, capsys, monkeypatch, argv, message):
    """--max_iters 0 and --gsm8k_limit -5 were taken, and refused by train or eval only after the
    stages before them had run; an --out that is a file was a FileExistsError traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file")
    try:
        code = demo.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not stages  # no stage ran


# A stage that, told to stop, takes a while to finish cleanly (train saving its checkpoint).
SLOW_TO_STOP = """#!/usr/bin/env bash
trap 'sleep 1; echo saved > "$DIR/saved"; exit 0' INT TERM HUP
echo $$ > "$DIR/started"
while true; do sleep 0.1; done
"""
DEMO_WITH_A_SLOW_STAGE = """import sys
from ds_sft import demo
from ds_sft.command import execute

class OneStage:
    def run(args):
        demo._stage("train", ["train"])

sys.executable = sys.argv[1]  # what the stage runs: the slow-to-stop script
sys.exit(execute("ds-sft demo", OneStage, None))
"""


@pytest.mark.parametrize(
    ("signum", "to_group", "code"),
    [
        (signal.SIGINT, True, 130),  # Ctrl-C in a terminal: the demo's whole process group
        (signal.SIGINT, False, 130),
        (signal.SIGTERM, False, 143),  # kill, timeout make demo
        (signal.SIGHUP, False, 129),
    ],
    ids=["ctrl-c", "sigint", "sigterm", "sighup"],
)
def test_a_stopped_demo_lets_its_stage_finish_stopping(tmp_path, signum, to_group, code):
    """subprocess.call killed the stage 0.25 s after Ctrl-C, while train saved its checkpoint, and a
    SIGTERM or SIGHUP ended the demo alone: its stage trained on with nobody waiting for it."""
    stage = tmp_path / "stage.sh"
    stage.write_text(SLOW_TO_STOP)
    stage.chmod(0o755)
    env = {**os.environ, "DIR": str(tmp_path), "PYTHONPATH": str(Path(demo.__file__).parents[1])}
    driver = subprocess.Popen(
        [sys.executable, "-c", DEMO_WITH_A_SLOW_STAGE, str(stage)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("w"),
        preexec_fn=as_from_a_terminal(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "started").exists(), (tmp_path / "stderr").read_text()
        time.sleep(0.2)  # the stage's trap is set
        (os.killpg if to_group else os.kill)(driver.pid, signum)
        driver.wait(timeout=60)  # stderr in a file: an orphaned child would hold a pipe open
        err = (tmp_path / "stderr").read_text()
        assert (tmp_path / "saved").exists(), "the stage was not let finish stopping"
        assert driver.returncode == code and err.strip().splitlines() == [
            f"ds-sft demo: {'interrupted' if signum == signal.SIGINT else f'stopped by {signum.name}'}"
        ], err
    finally:
        with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
            os.kill(int((tmp_path / "started").read_text()), signal.SIGKILL)
        driver.kill()
        driver.wait()


@pytest.mark.parametrize("case", ["a run it did not make", "an older demo", "a stage failed"])
def test_the_demos_own_refusals_are_one_ds_sft_line_exit_2(tmp_path, monkeypatch, capsys, case):
    """They were SystemExit("demo: ..."): exit 1, in a form of their own (no `ds-sft demo: error:`)."""
    out = tmp_path / "demo"
    if case == "a stage failed":
        monkeypatch.setattr(sys, "executable", "/bin/false")  # the stage: `false -m ds_sft.cli prepare ...`
    else:
        (out / "run").mkdir(parents=True)
        if case == "an older demo":
            (out / demo.DEMO_MARK).write_text("made by an older demo\n")
    assert demo.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ds-sft demo: error: "), err


def test_a_run_trained_into_the_demos_folder_since_is_not_replaced(tmp_path, stages):
    """The mark said "run/ here is the demo's own" for the folder, not for a run: a run the user
    trained into OUT/run after the demo's (its own ds_sft_run.json) was deleted by the next demo."""
    out = tmp_path / "demo"
    assert demo.run(demo_args(out)) == 0
    shutil.rmtree(out / "run")
    (out / "run").mkdir()
    (out / "run" / MARKER).write_text('{"format": "ds-sft training run", "created": "later"}\n')
    (out / "run" / "metrics.jsonl").write_text("the user's own run\n")
    stages.clear()
    with pytest.raises(UserError, match="holds a run the demo did not train"):
        demo.run(demo_args(out))
    assert stages == [] and (out / "run" / "metrics.jsonl").read_text() == "the user's own run\n"


def test_a_run_stopped_in_training_is_still_the_demos_to_replace(tmp_path, stages, monkeypatch):
    """The demo records its run's marker even when stopped in the train stage (Ctrl-C, SIGTERM)."""
    out = tmp_path / "demo"
    recording_stage = demo._stage  # makes the run as train does; then the demo is stopped

    def stopped_in_train(title, argv):
        recording_stage(title, argv)
        if argv[0] == "train":
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_stage", stopped_in_train)
    with pytest.raises(KeyboardInterrupt):
        demo.run(demo_args(out))
    monkeypatch.setattr(demo, "_stage", recording_stage)
    assert demo.run(demo_args(out)) == 0
    assert "--overwrite" in train_argv(stages)
