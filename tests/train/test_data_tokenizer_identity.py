"""``train`` and ``eval`` judge a DATA dir's tokenizer by ``DATA/tokenizer`` itself, never by a hash read
from its manifest: a manifest from before the identity was recorded (``tokenizer.sha256``, another
hash) still trains and evaluates, and a tokenizer folder that is not the one the manifest records
is refused in one line before any model loads."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from ds_sft.cli import main
from tests.data.match_helpers import prepare, tiny_model_dir, two_tokenizers
from tests.train.test_compatibility import FLAGS


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    a, b = two_tokenizers(root / "tokenizers")
    data_a, data_b = prepare(root / "data_a", a), prepare(root / "data_b", b)

    old = shutil.copytree(data_a, root / "old_style")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "5" * 64  # what older ds-sft wrote: another hash, no identity
    del manifest["tokenizer"]["identity"]
    (old / "manifest.json").write_text(json.dumps(manifest))

    swapped = shutil.copytree(data_a, root / "swapped")  # DATA/tokenizer replaced after prepare
    shutil.rmtree(swapped / "tokenizer")
    shutil.copytree(data_b / "tokenizer", swapped / "tokenizer")
    return SimpleNamespace(
        old=old,
        swapped=swapped,
        model_a=tiny_model_dir(root / "model_a", a, "run"),
        model_b=tiny_model_dir(root / "model_b", b),
    )


def train(data, base, out) -> int:
    flags = ["--data_dir", str(data), "--base_model", str(base), "--out_dir", str(out), "--max_iters", "1"]
    return main(["train", *flags, *FLAGS])


def evaluate(data, model, out) -> int:
    flags = ["--data_dir", str(data), "--out", str(out), "--no_gsm8k", "--no_generate", "--dtype", "float32"]
    return main(["eval", "--model", str(model), *flags])


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"ds-sft {command}: error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def test_an_old_style_manifest_trains_and_evaluates(parts, tmp_path, dist_env):
    assert train(parts.old, parts.model_a, tmp_path / "run") == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert evaluate(parts.old, tmp_path / "run", tmp_path / "eval") == 0
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_an_old_style_manifest_still_refuses_another_tokenizer(parts, tmp_path, capsys, dist_env):
    assert train(parts.old, parts.model_b, tmp_path / "run") == 2
    assert f"but {parts.model_b} uses another tokenizer" in one_line_error(capsys, "train")
    assert evaluate(parts.old, parts.model_b, tmp_path / "eval") == 2
    assert f"but {parts.model_b} uses another tokenizer" in one_line_error(capsys, "eval")


@pytest.mark.parametrize("base", ["model_a", "model_b"])
def test_a_replaced_tokenizer_folder_is_refused(parts, base, tmp_path, capsys, dist_env):
    """Whichever tokenizer the model carries: the shards were made with A, the folder says B."""
    model = getattr(parts, base)
    assert train(parts.swapped, model, tmp_path / "run") == 2
    assert "is not the tokenizer" in one_line_error(capsys, "train")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert evaluate(parts.swapped, model, tmp_path / "eval") == 2
    assert "is not the tokenizer" in one_line_error(capsys, "eval")
    assert not (tmp_path / "eval").exists()


def test_a_run_records_its_template_and_eval_holds_it_to_it(tmp_path, dist_env, capsys):
    """train wrote nothing about the prompt format into final/: eval asked an Alpaca-trained run in
    the chat template without a word."""
    from ds_sft.data.tokenizer import load_tokenizer
    from tests.eval.test_eval_match import CHATML

    a, _ = two_tokenizers(tmp_path / "tokenizers")
    tokenizer = load_tokenizer(str(a))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(tmp_path / "chat_tokenizer"))
    data = {
        template: prepare(
            tmp_path / f"data_{template}", tmp_path / "chat_tokenizer", extra=("--template", template)
        )
        for template in ("alpaca", "chat")
    }
    base = tiny_model_dir(tmp_path / "base", tmp_path / "chat_tokenizer", "run")
    assert train(data["alpaca"], base, tmp_path / "run") == 0
    record = json.loads((tmp_path / "run" / "final" / "trained_on.json").read_text())
    manifest = json.loads((data["alpaca"] / "manifest.json").read_text())
    last = int((tmp_path / "run" / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert record == {"template": "alpaca", "data_key": manifest["key"], "step": last}
    assert evaluate(data["chat"], tmp_path / "run", tmp_path / "eval_chat") == 2
    assert "fine-tuned on 'alpaca'-template prompts" in one_line_error(capsys, "eval")
    assert evaluate(data["alpaca"], tmp_path / "run", tmp_path / "eval_alpaca") == 0
