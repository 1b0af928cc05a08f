"""eval.json / eval.md / chart writer: one column per model, nothing lost."""

from __future__ import annotations

import json
import re

import pytest

from ds_sft.errors import UserError
from ds_sft.eval.report import CHART_NAME, write_report
from ds_sft.eval.stats import accuracy_summary, paired_comparison


def _result(label, shift, gsm8k_correct, sources=("alpaca", "gsm8k"), cut=0):
    by_source = {
        name: {
            "loss": 1.0 + i + shift,
            "perplexity": 2.718 * (i + 1),
            "token_accuracy": 0.5,
            "tokens": 100 * (i + 1),
        }
        for i, name in enumerate(sources)
    }
    return {
        "label": label,
        "model": f"/models/{label}",
        "val": {
            "overall": {"loss": 1.5 + shift, "perplexity": 4.48, "token_accuracy": 0.5, "tokens": 300},
            "by_source": by_source,
        },
        "gsm8k": {
            **accuracy_summary(gsm8k_correct, 20),
            "hit_max_new_tokens": cut,
            "samples": [{"correct": i < gsm8k_correct, "hit_max_new_tokens": i < cut} for i in range(20)],
        },
        "generations": [
            {
                "name": "math",
                "category": "math",
                "prompt": "2+2?",
                "completion": f"{label} says 4",
                "hit_max_new_tokens": False,
            }
        ],
    }


def test_compare_report_has_a_column_per_model(tmp_path):
    results = [_result("base", 0.5, 3), _result("sft", 0.0, 7, sources=("alpaca", "gsm8k", "dolly"), cut=6)]
    paired = paired_comparison(
        *([x["correct"] for x in r["gsm8k"]["samples"]] for r in results), labels=("base", "sft")
    )
    meta = {"data_dir": "/data", "gsm8k_seed": 0, "max_new_tokens": 64, "gsm8k_paired": paired}
    paths = write_report(tmp_path, results, meta)

    stored = json.loads(paths["json"].read_text())
    assert stored["models"] == results and stored["data_dir"] == "/data"

    md = paths["md"].read_text()
    header = (
        "| source | tokens | loss base | loss sft | ppl base | ppl sft | acc base | acc sft "
        "| loss change sft - base |"
    )
    assert header in md
    assert "| alpaca | 100 | 1.5000 | 1.0000 |" in md and "| 50.00% | 50.00% | -0.5000 |" in md
    assert "| dolly | 300 | — | 3.0000 |" in md and md.count("| — |") == 4  # dolly: loss, ppl, acc, change
    assert "| overall | 300 | 2.0000 | 1.5000 |" in md
    # every accuracy with its n and Wilson interval; the paired test on the same problems
    assert "| base | 15.0% | 3/20 | 5.2% - 36.0% | 0/20 |" in md
    assert "| sft | 35.0% | 7/20 | 18.1% - 56.7% | 6/20 |" in md
    assert "sft right only: 4 of 20 problems; exact McNemar p = 0.125: not significant at 5%" in md
    # sft ran out of tokens on 6 of its 21 completions (> 20%): one warning line, none for base
    assert md.count("**Warning:**") == 1 and "sft: 6 of 21 completions hit max_new_tokens (64)" in md
    assert "> base says 4" in md and "> sft says 4" in md
    assert f"]({CHART_NAME})" in md

    png = paths["chart"].read_bytes()
    assert paths["chart"].name == CHART_NAME and png.startswith(b"\x89PNG")


def test_report_without_val_or_gsm8k_has_no_chart(tmp_path):
    result = {"label": "m", "model": "m", "val": None, "gsm8k": None, "generations": None}
    paths = write_report(tmp_path, [result], {})
    assert "chart" not in paths and not (tmp_path / CHART_NAME).exists()
    md = paths["md"].read_text()
    assert "Validation" not in md and "GSM8K" not in md


@pytest.mark.parametrize("name", ["eval.json", "eval.md", CHART_NAME])
def test_report_is_never_written_over_a_file(tmp_path, name):
    result = {"label": "m", "model": "m", "val": None, "gsm8k": None, "generations": None}
    (tmp_path / name).write_text("the user's\n")
    with pytest.raises(UserError, match=f"{name} exists"):
        write_report(tmp_path, [result], {})
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_text() == "the user's\n"


def test_values_json_cannot_hold_are_written_as_text(tmp_path):
    """A harness task's documents keep what datasets decoded: a date column's datetime values ended
    the eval in a TypeError after all its work, with nothing written."""
    import datetime
    from decimal import Decimal

    doc = {"question": "q", "added": datetime.datetime(2024, 5, 1), "price": Decimal("1.5")}
    result = {"label": "m", "model": "m", "val": None, "gsm8k": None, "generations": None,
              "harness": {"samples": {"mine": [{"doc": doc}]}}}  # fmt: skip
    paths = write_report(tmp_path, [result], {})
    written = json.loads(paths["json"].read_text())["models"][0]["harness"]["samples"]["mine"][0]["doc"]
    assert written == {"question": "q", "added": "2024-05-01 00:00:00", "price": "1.5"}


@pytest.mark.parametrize("odd", ["a|b", "x\ny", "t`ick", "``", "cr\rlf\r\n- injected\n# heading", "|\t|"])
def test_names_from_outside_cannot_reshape_the_markdown(odd):
    """A model path, a label, a source or a data dir holding '|' shifted a table's cells under other
    headers (a loss read as a perplexity); a newline began a list item or heading of its own, a
    backtick ended its code span early."""
    from ds_sft.eval.report import render_markdown

    first, second = _result(f"A:{odd}", 0.0, 5, sources=("alpaca", odd)), _result(f"B:{odd}", 0.5, 7)
    first["model"] = f"/models/{odd}"
    meta = {"data_dir": f"/data/{odd}", "gsm8k_test": odd, "max_new_tokens": 4}
    meta["gsm8k_paired"] = paired_comparison(
        [s["correct"] for s in first["gsm8k"]["samples"]],
        [s["correct"] for s in second["gsm8k"]["samples"]],
        labels=(first["label"], second["label"]),
    )
    lines = render_markdown([first, second], meta).splitlines()
    tables, table = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            tables, table = [*tables, table], []
    assert len(tables) == 2  # val, GSM8K
    for table in tables:  # every row has as many cells as its header: no '|' of a name splits one
        assert len({len(re.findall(r"(?<!\\)\|", line)) for line in table}) == 1, table
    listed = [line for line in lines if line.startswith("- ")]
    assert len(listed) == 5  # data_dir, gsm8k_test, max_new_tokens, and one line per model
    assert not any(line.startswith(("# heading", "- injected")) for line in lines)
    for line in listed:  # one code span per value: the same fence each side, not inside it
        value = line.split(": ", 1)[1]
        fence = re.match("`+", value).group()
        assert value.endswith(fence) and fence not in value[len(fence) : -len(fence)], line


@pytest.mark.parametrize("label", ["_base", "a$\\frac{$b", "x$y$"])
def test_the_chart_names_every_model_as_written(tmp_path, monkeypatch, label):
    """matplotlib reads its text: a label starting with '_' was left out of the legend (a model's
    bars with no name), and one with two '$' was mathtext ('a$\\frac{$b' a ValueError traceback
    after every measure, nothing written; 'x$y$' shown as math)."""
    from matplotlib.figure import Figure

    from ds_sft.eval.report import plot_val_loss

    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k))
    )
    plot_val_loss([_result(label, 0.0, 1), _result("sft", 0.5, 2)], tmp_path / CHART_NAME)
    (figure,) = figures
    shown = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert shown == [label.replace("$", "\\$"), "sft"] and (tmp_path / CHART_NAME).stat().st_size > 0
