"""Write what an evaluation measured: ``eval.json`` (everything), ``eval.md`` (tables) and a bar chart.

One writer serves one model and ``--compare A B`` alike: every table has one column per model, in
the order given, so "base vs SFT" reads left to right. The result of one model is a plain dict::

    {"label": "base", "model": "smollm2-135m-instruct",
     "val": {"overall": {"loss", "perplexity", "token_accuracy", "tokens"}, "by_source": {name: {...}}},
     "gsm8k": {"accuracy", "correct", "total", "ci95": [low, high], "hit_max_new_tokens",
               "samples": [...]},                                       # or None when skipped
     "generations": [{"name", "category", "prompt", "completion", "hit_max_new_tokens"}, ...],
     "seconds": {...}}

Every accuracy is shown with its sample size and 95% Wilson interval; with two models on the same
GSM8K problems, ``meta["gsm8k_paired"]`` (:func:`ds_sft.eval.stats.paired_comparison`) says whether
their difference is significant. A model that ran out of ``max_new_tokens`` on more than
:data:`TRUNCATION_WARNING_SHARE` of its completions gets a one-line warning: its answers loop or
ramble, and a cut-off answer is scored by the last number it reached, right only by chance.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ds_sft.errors import UserError

CHART_NAME = "val_loss_by_source.png"
TRUNCATION_WARNING_SHARE = 0.2


def write_report(out_dir: Path, results: Sequence[dict], meta: dict) -> dict[str, Path]:
    """Write eval.json, eval.md and the chart (when there are val losses) under ``out_dir``, never over
    a file already there (``ds-sft eval`` writes into a fresh folder and swaps it in: eval/cli.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md"}
    taken = [path for path in (*paths.values(), out_dir / CHART_NAME) if os.path.lexists(path)]
    if taken:
        raise UserError(f"{taken[0]} exists: the eval report is written into a new or empty folder only")
    # default=str: a harness task's documents keep the values its data files decode to (a date
    # column becomes datetime objects, which ended the eval in a TypeError with nothing written)
    paths["json"].write_text(json.dumps({**meta, "models": list(results)}, indent=2, default=str) + "\n")
    chart = None
    if any(result.get("val") for result in results):
        chart = paths["chart"] = plot_val_loss(results, out_dir / CHART_NAME)
    paths["md"].write_text(render_markdown(results, meta, chart_name=chart.name if chart else None))
    return paths


def _source_rows(results: Sequence[dict]) -> list[str]:
    """Sources in first-seen order across models, then "overall"."""
    names: list[str] = []
    for result in results:
        for name in (result.get("val") or {}).get("by_source", {}):
            if name not in names:
                names.append(name)
    return [*names, "overall"]


def _val_metrics(result: dict, source: str) -> dict | None:
    val = result.get("val") or {}
    return val.get("overall") if source == "overall" else val.get("by_source", {}).get(source)


def _cell(metrics: dict | None, key: str, fmt: str) -> str:
    return "—" if metrics is None else format(metrics[key], fmt)


# Every value from outside (model paths and labels, data-dir paths, harness task names, answers)
# reaches eval.md through _text, _cell_text or _code: a path holding '|' shifted a table's cells
# under other headers (a loss read as a perplexity), a newline or backtick ended a line or a code
# span and began markdown of its own.


def _text(value) -> str:
    """``value`` on one line: characters that are not printable (newlines, tabs, escapes) as '?'."""
    return "".join(char if char.isprintable() else "?" for char in str(value))


def _cell_text(value) -> str:
    """``value`` as the text of one table cell: one line, its '|' escaped (GitHub's table syntax)."""
    return _text(value).replace("|", "\\|")


def _code(value) -> str:
    """``value`` as one inline code span, whatever backticks it holds (CommonMark: a longer fence)."""
    text = _text(value)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(map(_cell_text, header)) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    return lines + ["| " + " | ".join(map(_cell_text, row)) + " |" for row in rows]


def render_markdown(results: Sequence[dict], meta: dict, chart_name: str | None = None) -> str:
    labels = [result["label"] for result in results]
    lines = ["# Evaluation", ""]
    lines += [f"- {key}: {_code(value)}" for key, value in meta.items() if not isinstance(value, dict | list)]
    lines += [f"- {_text(result['label'])}: {_code(result['model'])}" for result in results]

    if any(result.get("val") for result in results):
        lines += ["", "## Validation loss, perplexity and next-token accuracy", ""]
        header = ["source", "tokens"]
        for metric in ("loss", "ppl", "acc"):
            header += [f"{metric} {label}" for label in labels]
        side_by_side = len(results) == 2  # base vs SFT: say how much the loss moved
        if side_by_side:
            header.append(f"loss change {labels[1]} - {labels[0]}")
        rows = []
        for source in _source_rows(results):
            per_model = [_val_metrics(result, source) for result in results]
            tokens = next((m["tokens"] for m in per_model if m), 0)
            row = [source, f"{tokens:,}"]
            row += [_cell(m, "loss", ".4f") for m in per_model]
            row += [_cell(m, "perplexity", ".2f") for m in per_model]
            row += [_cell(m, "token_accuracy", ".2%") for m in per_model]
            if side_by_side:
                both = all(per_model)
                row.append(f"{per_model[1]['loss'] - per_model[0]['loss']:+.4f}" if both else "—")
            rows.append(row)
        lines += _table(header, rows)
        if chart_name:
            lines += ["", f"![validation loss by source]({chart_name})"]

    if any(result.get("gsm8k") for result in results):
        lines += ["", "## GSM8K test accuracy (greedy, exact numeric match)", ""]
        rows = []
        for result in results:
            gsm8k = result.get("gsm8k")
            if gsm8k:
                low, high = gsm8k["ci95"]
                rows.append(
                    [
                        result["label"],
                        f"{gsm8k['accuracy']:.1%}",
                        f"{gsm8k['correct']}/{gsm8k['total']}",
                        f"{low:.1%} - {high:.1%}",
                        f"{gsm8k['hit_max_new_tokens']}/{gsm8k['total']}",
                    ]
                )
        lines += _table(["model", "accuracy", "correct", "95% CI (Wilson)", "hit max_new_tokens"], rows)
        if meta.get("gsm8k_paired"):
            lines += ["", f"Paired on the same problems: {_text(meta['gsm8k_paired']['summary'])}."]
        harness = meta.get("harness")
        if harness:
            lines += harness_lines(harness)
    warnings = truncation_warnings(results, meta.get("max_new_tokens"))
    if warnings:
        lines += ["", *(f"**Warning:** {_text(line)}" for line in warnings)]

    generated = [result for result in results if result.get("generations")]
    if generated:
        lines += ["", "## Generations for the fixed prompts (greedy)"]
        for index, first in enumerate(generated[0]["generations"]):
            lines += ["", f"### {first['name']} ({first['category']})", "", _quote(first["prompt"])]
            for result in generated:
                completion = result["generations"][index]["completion"]
                lines += ["", f"**{_text(result['label'])}**:", "", _quote(completion or "(empty)")]
    return "\n".join(lines) + "\n"


def truncation_warnings(results: Sequence[dict], max_new_tokens) -> list[str]:
    """One line per model whose completions ran out of tokens more often than the set share."""
    lines = []
    for result in results:
        completions = [
            *((result.get("gsm8k") or {}).get("samples") or []),
            *(result.get("generations") or []),
        ]
        cut = sum(bool(c.get("hit_max_new_tokens")) for c in completions)
        if completions and cut / len(completions) > TRUNCATION_WARNING_SHARE:
            lines.append(
                f"{result['label']}: {cut} of {len(completions)} completions hit max_new_tokens "
                f"({max_new_tokens}) before ending: answers that loop or ramble (try --repetition_penalty "
                "1.2, or a larger --max_new_tokens)"
            )
    return lines


def harness_lines(harness: dict) -> list[str]:
    """The lm-evaluation-harness section: its scores with intervals and the cross-check."""
    lines = ["", f"### lm-evaluation-harness {_text(harness['version'])} (same model, same problems)", ""]
    rows = []
    for row in harness["scores"]:
        low, high = row["ci95"]
        rows.append(
            [row["label"], row["task"], row["metric"], f"{row['accuracy']:.1%}",
             f"{row['correct']}/{row['total']}", f"{low:.1%} - {high:.1%}"]
        )  # fmt: skip
    lines += _table(["model", "task", "metric", "accuracy", "correct", "95% CI (Wilson)"], rows)
    for check in harness.get("cross_check", []):
        lines += ["", f"Cross-check ({_text(check['label'])}): {_text(check['summary'])}"]
        if check["differences"]:
            lines += [""] + _table(
                ["problem", "ds-sft", "harness", "why"],
                [[str(d["index"]), d["ds_sft"], d["harness"], d["why"]] for d in check["differences"]],
            )
    return lines


def _quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in text.strip().splitlines())


def _chart_text(value) -> str:
    """``value`` as matplotlib shows it literally: text between two '$' is mathtext to it (a label
    'a$\\frac{$b' ended the eval in a ValueError traceback after every measure, nothing written)."""
    return _text(value).replace("$", r"\$")


def plot_val_loss(results: Sequence[dict], path: Path) -> Path:
    """Grouped bars: validation loss per source (and overall), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = _source_rows(results)
    width = 0.8 / len(results)
    handles = []
    figure, axes = plt.subplots(figsize=(max(5.0, 1.3 * len(sources) + 2), 4.0))
    for offset, result in enumerate(results):
        xs = [i + (offset - (len(results) - 1) / 2) * width for i in range(len(sources))]
        losses = [(m["loss"] if (m := _val_metrics(result, s)) else float("nan")) for s in sources]
        bars = axes.bar(xs, losses, width)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
        handles.append(bars)
    axes.set_xticks(range(len(sources)), [_chart_text(source) for source in sources])
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_title("Validation loss by source")
    axes.margins(y=0.12)  # room for the value labels
    # handles and labels given together: a label passed with its bars and starting with '_' is one
    # matplotlib leaves out of the legend (a model in runs/_base had bars and no name)
    labels = [_chart_text(result["label"]) for result in results]
    axes.legend(
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(results), frameon=False
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
