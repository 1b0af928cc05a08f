"""What a benchmark script writes, and what it may write over.

A bench script's ``--out`` is a path the user types, and writing the result there replaced whatever
file had that name: ``bench/gpu_check.py gemm --out README.md`` put a GEMM's timing where the README
was. So every result names its writer (a JSON result's first key, ``"written_by": "ds-sft
bench/gpu_check.py"``; a Markdown page's first line, an HTML comment that renders as nothing), and
an existing file is written over only when it names one (a result of an earlier run), is empty, or lies
in ``bench/results/``, the benches' own folder (git ignores it; results from before the mark are there).
A JSON result also says what it was measured on (:func:`machine`), its second key.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.json_input import JsonRefused, parse_json_object
from ds_sft.locations import REPO_ROOT
from ds_sft.safe_write import check_result_path, write_result_file

RESULTS_DIR = REPO_ROOT / "bench" / "results"  # where every script writes by default

WRITER_KEY = "written_by"
PAGE_MARK = "<!-- written by ds-sft "
# A result is a few kilobytes of figures; a larger file is not read to look for the mark.
MAX_RESULT_BYTES = 64 << 20


def writer_name(script: str | Path) -> str:
    """``ds-sft bench/NAME.py`` for a script's ``__file__``; ``ds-sft bench`` for the command."""
    script = Path(script)
    return f"ds-sft bench/{script.name}" if script.suffix == ".py" else f"ds-sft {script}"


def written_by_a_bench(path: Path) -> bool:
    """Whether the regular file ``path`` is a result some ds-sft bench wrote."""
    with open(path, "rb") as file:
        head = file.read(MAX_RESULT_BYTES + 1)
    if len(head) > MAX_RESULT_BYTES:
        return False
    text = head.decode("utf-8", errors="replace")
    if text.startswith(PAGE_MARK):
        return True
    try:  # NaN is read: json.dumps writes a measured NaN as one
        value = parse_json_object(text, finite=False)
    except JsonRefused:  # not JSON, or JSON no bench writes (a repeated key, deep nesting)
        return False
    return str(value.get(WRITER_KEY, "")).startswith("ds-sft ")


def check_bench_out(path: str | Path) -> Path:
    """``path`` when a bench may write its result there: nothing yet, or an earlier result. Else one
    line, to say before the work whose result would go there."""
    path = check_result_path(path)
    ours = path.resolve().is_relative_to(RESULTS_DIR.resolve())
    if path.exists() and path.stat().st_size and not ours and not written_by_a_bench(path):
        raise UserError(
            f"{path} exists and is not a result a ds-sft bench wrote (it names no writer): ds-sft writes "
            "over its own results only; pass another --out, or move the file away"
        )
    return path


def processor_name() -> str:
    """The CPU's model name ("AMD EPYC 9454 48-Core Processor"), or what ``platform`` knows of it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    """What a result was measured on: the OS, the processor and its CPU count; torch's version, its
    threads and the GPU it used, where the bench used torch (None where not); and the 1-minute load
    average as the result is written (these machines are shared: a busy neighbour scales every
    absolute figure)."""
    torch = sys.modules.get("torch")  # not imported for it: a bench that never used torch has none
    return {
        "platform": platform.platform(),
        "processor": processor_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__ if torch else None,
        "threads": torch.get_num_threads() if torch else None,
        "gpu": torch.cuda.get_device_name() if torch and torch.cuda.is_initialized() else None,
        "load_average_1min": os.getloadavg()[0],
    }


def write_bench_json(path: str | Path, result: dict, script: str | Path, indent: int | None = 2) -> Path:
    """Write ``result`` as JSON at ``path``, its writer first and :func:`machine` second
    (:func:`check_bench_out` decides whether a file there may be replaced)."""
    text = json.dumps({WRITER_KEY: writer_name(script), "machine": machine(), **result}, indent=indent) + "\n"
    return write_result_file(check_bench_out(path), text)


def write_bench_page(path: str | Path, text: str, script: str | Path) -> Path:
    """Write the Markdown page ``text`` at ``path`` under a first line that names its writer."""
    return write_result_file(check_bench_out(path), f"<!-- written by {writer_name(script)} -->\n{text}")
