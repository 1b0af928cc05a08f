"""``ds-sft eval`` refuses a model that does not belong with ``--data_dir``, in one line: another
tokenizer of the same size (before any weights load), rows longer than the model's positions."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from ds_sft.cli import main
from tests.data.match_helpers import prepare, tiny_model_dir, two_tokenizers


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_match")
    a, b = two_tokenizers(root / "tokenizers")
    return SimpleNamespace(
        data_a=prepare(root / "data_a", a),
        model_a=tiny_model_dir(root / "model_a", a, "run"),
        model_b={
            layout: tiny_model_dir(root / f"model_b_{layout}", b, layout)
            for layout in ("folder", "root", "run")
        },
        short=tiny_model_dir(root / "short", a, max_seq_len=32),
    )


def evaluate(data, out, *models: str) -> int:
    which = ["--model", models[0]] if len(models) == 1 else ["--compare", *models]
    flags = ["--data_dir", str(data), "--out", str(out), "--no_gsm8k", "--no_generate", "--dtype", "float32"]
    return main(["eval", *map(str, which), *flags])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ds-sft eval: error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("layout", ["folder", "root", "run", "run weights file", "folder weights file"])
def test_a_model_with_another_tokenizer_is_refused_before_loading(parts, layout, tmp_path, capsys):
    """Every spec of model B, down to its weights file (its config and tokenizer/ beside it), which
    was evaluated on data of another tokenizer with a note that it 'carries no tokenizer'."""
    model_b = {
        "run weights file": parts.model_b["run"] / "final" / "model.safetensors",
        "folder weights file": parts.model_b["folder"] / "model.safetensors",
    }.get(layout) or parts.model_b[layout]
    assert evaluate(parts.data_a, tmp_path / "out", parts.model_a, model_b) == 2
    line = one_line_error(capsys)
    assert f"{parts.data_a} was tokenized with" in line and f"but {model_b} uses another tokenizer" in line
    assert "== " not in capsys.readouterr().out and not (tmp_path / "out").exists()  # no model evaluated


def test_a_model_with_the_data_tokenizer_is_evaluated(parts, tmp_path, capsys):
    assert evaluate(parts.data_a, tmp_path / "out", parts.model_a) == 0
    assert (tmp_path / "out" / "eval.json").is_file()


def test_rows_longer_than_the_model_positions_are_refused(parts, tmp_path, capsys):
    assert evaluate(parts.data_a, tmp_path / "out", parts.short) == 2
    line = one_line_error(capsys)
    assert "rows of 256 tokens" in line and "32 positions" in line and "--seq_len 32" in line


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """One tokenizer (with a chat template), data prepared from it in each template, and a run
    finished on each, its final/ written as train writes it."""
    from ds_sft.data.shards import read_manifest
    from ds_sft.data.tokenizer import load_tokenizer
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel
    from ds_sft.train.final import read_tokenizer, write_final
    from tests.data.match_helpers import SEQ_LEN

    root = tmp_path_factory.mktemp("eval_template")
    a, _ = two_tokenizers(root / "tokenizers")
    tokenizer = load_tokenizer(str(a))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(root / "chat_tokenizer"))
    data, runs = {}, {}
    for template in ("alpaca", "chat"):
        data[template] = prepare(
            root / f"data_{template}", root / "chat_tokenizer", extra=("--template", template)
        )
        model = LlamaModel(ModelConfig.preset("tiny", vocab_size=512, max_seq_len=SEQ_LEN))
        runs[template] = root / f"run_{template}"
        tokenizer = read_tokenizer(data[template] / "tokenizer")
        write_final(model, runs[template] / "final", tokenizer, read_manifest(data[template]))
    return SimpleNamespace(data=data, runs=runs)


@pytest.mark.parametrize("where", ["", "final", "final/model.safetensors"])
@pytest.mark.parametrize(("trained", "asked"), [("alpaca", "chat"), ("chat", "alpaca")])
def test_a_run_asked_in_another_template_is_refused(templated, tmp_path, capsys, trained, asked, where):
    """A run fine-tuned on Alpaca prompts was evaluated with a chat-template data dir (or the
    reverse) without a word: the scores of a format it never saw. Every spec that loads the run's
    weights: the run, its final/, the weights file there."""
    run = templated.runs[trained] / where
    assert evaluate(templated.data[asked], tmp_path / "out", str(run)) == 2
    line = one_line_error(capsys)
    assert f"fine-tuned on '{trained}'-template prompts but" in line and f"renders '{asked}' ones" in line
    assert f"--template {trained}" in line and "--allow_other_template" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("trained", "asked"), [("alpaca", "chat"), ("chat", "alpaca")])
def test_allow_other_template_measures_it_anyway(templated, tmp_path, trained, asked):
    flags = ["--data_dir", str(templated.data[asked]), "--out", str(tmp_path / "out"), "--no_gsm8k"]
    flags += ["--no_generate", "--dtype", "float32", "--val_rows", "2", "--allow_other_template"]
    assert main(["eval", "--model", str(templated.runs[trained]), *flags]) == 0


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_run_asked_in_its_own_template_is_evaluated(templated, tmp_path, template):
    assert evaluate(templated.data[template], tmp_path / "out", str(templated.runs[template])) == 0


def test_compare_refuses_the_mismatched_model_before_either_is_loaded(
    templated, tmp_path, capsys, monkeypatch
):
    from ds_sft.eval import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "load_checked_model", lambda *a, **k: pytest.fail("a model loaded"))
    runs = templated.runs
    assert evaluate(templated.data["chat"], tmp_path / "out", str(runs["chat"]), str(runs["alpaca"])) == 2
    assert "fine-tuned on 'alpaca'-template prompts" in one_line_error(capsys)


def test_a_run_that_recorded_no_template_is_evaluated(templated, tmp_path):
    """A run of an older ds-sft, or a base model: nothing to compare."""
    older = tmp_path / "older"
    shutil.copytree(templated.runs["alpaca"], older)
    (older / "final" / "trained_on.json").unlink()
    assert evaluate(templated.data["chat"], tmp_path / "out", str(older)) == 0


@pytest.mark.parametrize(
    "content", ["{", "[]", '{"template": 3}', b"\xff\xfe", '{"template": "alpaca"}' + " " * (1 << 16)]
)
def test_a_damaged_template_record_is_one_line(templated, tmp_path, capsys, content):
    damaged = tmp_path / "damaged"
    shutil.copytree(templated.runs["alpaca"], damaged)
    record = damaged / "final" / "trained_on.json"
    record.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert evaluate(templated.data["chat"], tmp_path / "out", str(damaged)) == 2
    assert "trained_on.json is not as train writes it" in one_line_error(capsys)
