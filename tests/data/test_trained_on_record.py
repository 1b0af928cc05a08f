"""A run's ``final/trained_on.json`` is read back by eval and export whatever its data dir's manifest
said: train writes a template only in the form its readers take.

train copied the manifest's ``template`` into the record as it found it, and the reader refused every
record whose template was not a string. A data dir that names no template (one made by hand, one of an
older prepare: ``read_manifest`` needs only ``sources``) gave a run that train finished and that
neither ``eval`` nor ``export`` would then read ("is not as train writes it"), until the user deleted
the record by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_sft.data.model_match import TRAINED_ON, trained_on, trained_record, trained_template

# What a data dir's manifest may hold as its template, from the honest to the forged
MANIFEST_TEMPLATES = {
    "absent": ...,
    "null": None,
    "alpaca": "alpaca",
    "chat": "chat",
    "the flag's auto": "auto",
    "a word": "evil",
    "a number": 3,
    "a list": ["alpaca"],
    "an object": {"template": "chat"},
    "true": True,
}


@pytest.mark.parametrize("value", MANIFEST_TEMPLATES.values(), ids=MANIFEST_TEMPLATES.keys())
def test_every_record_train_writes_is_read_back(tmp_path, value):
    manifest = {"sources": ["a"], "key": "k"} | ({} if value is ... else {"template": value})
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / TRAINED_ON).write_text(trained_on(manifest, step=7))
    path, fields = trained_record(str(tmp_path / "run"))
    assert path == final / TRAINED_ON
    assert fields["step"] == 7
    expected = value if value in ("alpaca", "chat") else None
    assert trained_template(str(tmp_path / "run")) == expected


@pytest.mark.parametrize("template", ["evil", "", 3, [], {"a": 1}, True])
def test_a_record_naming_no_template_train_writes_is_still_refused(tmp_path, template):
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / TRAINED_ON).write_text(json.dumps({"template": template, "data_key": None, "step": 1}))
    from ds_sft.errors import UserError

    with pytest.raises(UserError, match="is not as train writes it"):
        trained_record(str(tmp_path / "run"))


def test_a_run_on_a_data_dir_without_a_template_exports(tmp_path):
    """End to end through the console commands: train (the tiny preset, one step) on a data dir whose
    manifest names no template, then export the run."""
    from tests.train.helpers import write_data_dir

    data = write_data_dir(tmp_path / "data", train_rows=8, val_rows=4)
    assert "template" not in json.loads((data / "manifest.json").read_text())
    tokenizer = tmp_path / "tokenizer.json"
    _word_tokenizer(tokenizer)
    env = {**os.environ, "WANDB_MODE": "disabled", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    train = [
        *("train", "--data_dir", str(data), "--model", "tiny", "--out_dir", str(tmp_path / "run")),
        *("--max_iters", "1", "--warmup_iters", "0", "--micro_batch_size", "2", "--grad_accum", "1"),
        *("--eval_iters", "1", "--precision", "fp32", "--kernels", "torch"),
    ]
    export = ["export", "--base_model", str(tmp_path / "run"), "--tokenizer", str(tokenizer)]
    for argv in (train, [*export, "--hf", str(tmp_path / "hf")]):
        command = [sys.executable, "-m", "ds_sft", *argv]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _word_tokenizer(path: Path) -> None:
    """A word-level tokenizer of fewer ids than the tiny preset's 256 embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|endoftext|>": 1} | {f"w{i}": i + 2 for i in range(50)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
