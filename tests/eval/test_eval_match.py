"""``ds-sft eval`` refuses a model that does not belong with ``--data_dir``, in one line: another
tokenizer of the same size (before any weights load), rows longer than the model's positions."""

from __future__ import annotations

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


@pytest.mark.parametrize("layout", ["folder", "root", "run"])
def test_a_model_with_another_tokenizer_is_refused_before_loading(parts, layout, tmp_path, capsys):
    model_b = parts.model_b[layout]
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
