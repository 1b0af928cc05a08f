"""A finished run resumed to train on: until it ends again, its ``final/`` holds the weights of the
first end. eval, export and ``train --base_model`` of the run folder read those without a word; they
now say which step they read and where the checkpoints are."""

from __future__ import annotations

import pytest

from ds_sft.cli import main

from .conftest import single_rank_env, word_tokenizer, write_tiny_data_dir
from .runs import launch, run, train_flags


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """(data, run): finished at step 2 (final/), resumed to 6 and killed in step 5 (checkpoint 4)."""
    root = tmp_path_factory.mktemp("behind")
    data = write_tiny_data_dir(root / "data", tokenizer=word_tokenizer(root / "tok", "w"))
    out = root / "run"
    done = run(train_flags(data, out, 2, "--save_interval", "2", "--warmup_iters", "1"), single_rank_env())
    assert done.returncode == 0, done.stderr[-3000:]
    proc = launch(
        train_flags(data, out, 6, "--save_interval", "2", "--warmup_iters", "1"),
        single_rank_env(),
        fault="step@5",
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, err[-3000:]  # the fault's SIGKILL
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    return data, out


NOTE = "holds the weights of step 2, but the run's checkpoints reach step 4"


@pytest.mark.parametrize("where", ["", "final", "final/model.safetensors"])
def test_eval_and_export_of_a_run_resumed_since_its_final_say_so(resumed_run, tmp_path, capsys, where):
    data, out = resumed_run
    model = str(out / where) if where else str(out)
    assert main(["export", "--base_model", model, "--hf", str(tmp_path / "hf")]) == 0
    assert NOTE in capsys.readouterr().out
    evaluated = ["eval", "--model", model, "--data_dir", str(data), "--no_gsm8k", "--no_generate",
                 "--out", str(tmp_path / "eval")]  # fmt: skip
    assert main(evaluated) == 0
    assert NOTE in capsys.readouterr().out


def test_a_run_whose_final_is_its_last_checkpoint_gets_no_note(tmp_path, capsys):
    from ds_sft.data.model_match import final_behind

    data = write_tiny_data_dir(tmp_path / "data", tokenizer=word_tokenizer(tmp_path / "tok", "w"))
    done = run(
        train_flags(data, tmp_path / "run", 2, "--save_interval", "2", "--warmup_iters", "1"),
        single_rank_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert final_behind(str(tmp_path / "run")) is None
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"


@pytest.mark.parametrize("named", ["checkpoints/step_000004", "checkpoints", "checkpoints/latest"])
def test_a_training_checkpoint_given_as_a_model_names_the_command_that_writes_its_weights(
    resumed_run, tmp_path, capsys, named
):
    """eval/export/--base_model of RUN/checkpoints/step_N said it was "neither a ds-sft checkpoint nor a
    Hugging Face model", and no way to evaluate a checkpoint (the best one, a stopped run's) was named.
    The command the line names is run here as written, and its final/ is then evaluated."""
    import shlex

    data, out = resumed_run
    assert main(["export", "--base_model", str(out / named), "--hf", str(tmp_path / "hf")]) == 2
    line = capsys.readouterr().err.strip()
    assert f"{out / 'checkpoints' / 'step_000004'} is a training checkpoint" in line, line
    command = shlex.split(line.split("`")[1].replace("DATA", str(data)).replace("NEW", str(tmp_path / "new")))
    assert command[:2] == ["ds-sft", "train"]
    done = run([*command[2:], "--wandb_mode", "disabled"], single_rank_env())
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = ["eval", "--model", str(tmp_path / "new"), "--data_dir", str(data), "--no_gsm8k",
                 "--no_generate", "--out", str(tmp_path / "eval")]  # fmt: skip
    assert main(evaluated) == 0
