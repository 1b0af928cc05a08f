"""``RUN/report.md`` and its plots, written by rank 0 from ``RUN/metrics.jsonl`` (all resumed segments)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ds_sft.json_input import JsonRefused, parse_json_object
from ds_sft.options import is_number
from ds_sft.run_layout import METRICS_FILE
from ds_sft.safe_write import replace_file, write_result_file

# Every plot :func:`plot` may write (run_dir.py removes the earlier run's at --overwrite).
PLOT_FILES = ("loss.png", "perplexity.png", "lr.png", "grad_norm.png", "tokens_per_s.png")


def plot(records: list[dict], run_dir: Path) -> list[str]:
    """One PNG per curve; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]

    def series(rows, key, transform=lambda v: v):
        points = [
            (r["step"], transform(r[key])) for r in rows if r.get(key) is not None and math.isfinite(r[key])
        ]
        return [p[0] for p in points], [p[1] for p in points]

    charts = {
        "loss.png": (
            "loss",
            [("train", series(train, "loss")), ("val", series(evals, "val_loss"))]
            + [
                (f"val {name}", ([r["step"] for r in evals], [r["per_source"][name]["loss"] for r in evals]))
                for name in (evals[-1]["per_source"] if evals else {})
                if all(name in r["per_source"] for r in evals)
            ],
        ),
        "perplexity.png": (
            "perplexity",
            [
                ("train", series(train, "loss", lambda v: math.exp(min(v, 50)))),
                ("val", series(evals, "val_ppl")),
            ],
        ),
        "lr.png": ("learning rate", [("lr", series(train, "lr"))]),
        "grad_norm.png": ("grad norm (pre-clip)", [("grad norm", series(train, "grad_norm"))]),
        "tokens_per_s.png": ("tokens/s", [("tokens/s", series(train, "tokens_per_s"))]),
    }
    written = []
    for filename, (ylabel, lines) in charts.items():  # keyed by PLOT_FILES
        if not any(xs for _, (xs, _) in lines):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, (xs, ys) in lines:
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        # savefig names its format: the temporary file's suffix is .tmp
        replace_file(
            run_dir / filename, lambda temporary, fig=fig: fig.savefig(temporary, format="png", dpi=100)
        )
        plt.close(fig)
        written.append(filename)
    return written


# What the report and the plots read of each record type: numbers (or null, "not measured"), and
# texts. Fields the trainer writes beside these are carried along unread.
NUMBER_FIELDS = {
    "train": ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"),
    "eval": ("val_loss", "val_ppl", "val_acc", "val_tokens"),
}
TEXT_FIELDS = {"alarm": ("message",), "change": ("message",)}
SOURCE_FIELDS = ("loss", "ppl", "acc", "tokens")  # each of an eval's per_source values


def parse_record(line: str) -> dict | None:
    """One line of ``metrics.jsonl`` as a record, or None when it is not one: a line cut off by a run
    killed mid-write, or edited, is a JSON error, a record without its ``type`` or ``step`` cannot
    be placed, and one whose fields the report reads hold the wrong kind of value (a loss of "n/a",
    an alarm without its message) cannot be shown. Each once ended the run in a traceback after all
    its training. The line is read by ds-sft's one JSON reader (:mod:`ds_sft.json_input`)."""
    try:  # NaN is read: the run writes a skipped step's loss as NaN
        record = parse_json_object(line, finite=False)
    except JsonRefused:  # cut off, a repeated key, nested past the recursion limit, a lone surrogate
        return None
    if not isinstance(record.get("type"), str):
        return None
    if not (isinstance(record.get("step"), int) and not isinstance(record["step"], bool)):
        return None
    kind = record["type"]
    numbers = NUMBER_FIELDS.get(kind, ())
    if not all(record.get(name) is None or is_number(record[name]) for name in numbers):
        return None
    if kind == "train" and record.get("tokens_per_s") is not None and not is_number(record.get("mfu")):
        return None  # a measured step has both
    if not all(isinstance(record.get(name), str) for name in TEXT_FIELDS.get(kind, ())):
        return None
    if "message" in record and not isinstance(record["message"], str):
        return None  # part of the key a redone step's record is found by
    if kind == "eval":
        sources = record.get("per_source")
        if not isinstance(sources, dict) or not all(
            isinstance(values, dict)
            and all(values.get(name) is None or is_number(values[name]) for name in SOURCE_FIELDS)
            for values in sources.values()
        ):
            return None
    return record


def read_records(run_dir: Path) -> tuple[list[dict], int]:
    """Every record of ``metrics.jsonl`` across resumed segments, and how many lines were not a record
    (:func:`parse_record`, skipped); a step redone after a crash keeps its last record. Each segment
    opens with a ``start`` record of the step it starts from: the records past that step that came
    before it are of a branch the run left (``--resume`` of an earlier checkpoint), and are dropped;
    kept, the report of a run branched at step 2 gave step 6's loss and MFU of the branch it left."""
    path = run_dir / METRICS_FILE
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    records = [record for record in map(parse_record, lines) if record is not None]
    latest: dict[tuple, dict] = {}
    for record in records:
        if record["type"] == "start":
            latest = {key: kept for key, kept in latest.items() if kept["step"] <= record["step"]}
        else:
            latest[(record["type"], record["step"], record.get("message"))] = record
    return sorted(latest.values(), key=lambda r: r["step"]), len(lines) - len(records)


def computed_in(identity: dict) -> str:
    """What the steps computed in, from the run's identity (``compatibility.run_identity``): ``--fp8
    auto`` and ``select: "auto"`` resolve by machine, so the flags alone do not say."""
    layout = identity.get("fp8_layout")
    fp8 = (
        f"{layout['layers']} projections in fp8 ({layout['mode']}, select {layout['recipe'].get('select')})"
        if layout
        else "no projection in fp8"
    )
    return f"Computed in {identity.get('precision')}, {fp8} (--fp8 {identity.get('fp8')})."


def write_report(run_dir: Path, effective_config: dict, summary: dict) -> Path:
    records, unreadable = read_records(run_dir)
    alarms = [r for r in records if r["type"] == "alarm"]
    train = [r for r in records if r["type"] == "train"]
    finite = [r for r in train if r.get("loss") is not None and math.isfinite(r["loss"])]
    images = plot(records, run_dir)
    lines = [
        f"# Training report: {run_dir.name}",
        "",
        f"Status: **{summary['status']}** at step {summary['step']}.",
        "",
    ]
    if summary.get("identity"):
        lines += [computed_in(summary["identity"]), ""]
    if unreadable:
        lines += [f"{unreadable} line(s) of metrics.jsonl are not readable records and were skipped.", ""]
    measured = [r for r in train if r.get("tokens_per_s") is not None]  # not a step without tokens
    if finite:
        lines += [
            "## Final metrics",
            "",
            "| metric | value |",
            "|---|---|",
            f"| train loss (last step) | {finite[-1]['loss']:.4f} |",
            f"| train loss (first step) | {finite[0]['loss']:.4f} |",
            f"| tokens/s (median) | {statistics.median(r['tokens_per_s'] for r in measured):,.0f} |",
            f"| MFU (step {measured[-1]['step']}; peak: {summary['peak_flops_source']}) | "
            f"{measured[-1]['mfu']:.1%} |",
            f"| time in train steps (all segments) | {summary['elapsed_s']:.0f} s |",
        ]
        if summary.get("best_val") is not None:
            lines.append(f"| best val loss | {summary['best_val']:.4f} ({summary['best_tag']}) |")
        lines.append("")
    last_eval = summary.get("last_eval")
    if last_eval:
        lines += [
            "## Validation (last eval)",
            "",
            "| source | loss | perplexity | token accuracy | tokens |",
            "|---|---|---|---|---|",
        ]
        for name, v in {
            **last_eval["per_source"],
            "**all**": {
                "loss": last_eval["val_loss"],
                "ppl": last_eval["val_ppl"],
                "acc": last_eval["val_acc"],
                "tokens": last_eval["val_tokens"],
            },
        }.items():
            lines.append(f"| {name} | {v['loss']:.4f} | {v['ppl']:.2f} | {v['acc']:.3f} | {v['tokens']:,} |")
        lines.append("")
    changes = [r for r in records if r["type"] == "change"]
    if changes:  # what resumes changed (compatibility.check_resume): resumable, or allowed by the user
        lines += ["## Changes at resume", ""]
        lines += [f"- step {c['step']}: {c['message']}" for c in changes] + [""]
    lines += ["## Alarms", ""]
    lines += [f"- step {a['step']}: {a['message']}" for a in alarms] or ["None."]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    lines += ["", "## Effective config", "", "```json", json.dumps(effective_config, indent=2), "```", ""]
    return write_result_file(run_dir / "report.md", "\n".join(lines))
