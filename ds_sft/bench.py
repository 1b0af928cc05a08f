"""``ds-sft bench``: run the benchmark scripts in ``bench/`` and collect their tables.

    ds-sft bench --quick                 # every script in smoke-test sizes (what CI runs)
    ds-sft bench --only train_throughput # one script, full size

Each script in ``bench/`` stands alone (``python bench/<name>.py [--quick]``), measures its ratios
side by side in one process, prints a table and writes JSON under ``bench/results/``. This command
runs each in its own subprocess, so one script's threads, memory or DeepSpeed process group cannot
disturb the next, streams its output, and writes ``bench/results/summary[.quick].json``: per script,
the exit code, the wall time and the JSON files it wrote. It fails when any script fails. With
``--quick``, a script that has no ``--quick`` flag is skipped and listed as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from ds_sft.bench_result import RESULTS_DIR, check_bench_out, write_bench_json
from ds_sft.errors import UserError
from ds_sft.locations import REPO_ROOT

BENCH_DIR = REPO_ROOT / "bench"
# The order they run in: the cheap data and kernel figures first, the long training steps last;
# scripts not named here run in between, alphabetically.
FIRST = ("prepare_speed", "kernel_speed", "fp8")
LAST = ("train_throughput",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ds_sft.options import Float

    parser.add_argument("--quick", action="store_true", help="pass --quick to every script (tiny sizes, CI)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this script of bench/ (repeatable), e.g. train_throughput",
    )
    parser.add_argument(
        "--timeout",
        type=Float(0, 7 * 24 * 3600, min_open=True),
        default=None,
        help="seconds each script may run before it is stopped",
    )


def available_scripts(only: list[str]) -> list[Path]:
    """The scripts in ``bench/`` in running order; those named by ``--only`` must exist."""
    if not BENCH_DIR.is_dir():
        raise UserError(f"{BENCH_DIR} not found: ds-sft bench runs from a source checkout of ds-sft")
    found = {path.stem: path for path in BENCH_DIR.glob("*.py") if not path.name.startswith("_")}
    missing = sorted(set(only) - set(found))
    if missing:
        raise UserError(f"no benchmark {missing[0]!r} in {BENCH_DIR}; there are: {', '.join(sorted(found))}")

    def order(name: str) -> tuple:
        if name in FIRST:
            return (0, FIRST.index(name))
        return (2, LAST.index(name)) if name in LAST else (1, name)

    return [found[name] for name in sorted(found, key=order) if not only or name in only]


def has_quick_mode(script: Path) -> bool:
    return '"--quick"' in script.read_text()


def run_script(script: Path, quick: bool, timeout: float | None) -> dict:
    """Run one script, its output streaming through; report exit code, time and new JSON files."""
    command = [sys.executable, str(script), *(["--quick"] if quick else [])]
    print(f"\n=== {script.stem}: {' '.join(command[1:])}", flush=True)
    started = time.time()
    # a session of its own: a timeout (or Ctrl-C here) stops the script's workers with it, which a
    # kill of the script alone left running
    process = subprocess.Popen(command, cwd=REPO_ROOT, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
        print(f"=== {script.stem}: stopped after {timeout:g} s", flush=True)
    finally:
        if process.poll() is None or code is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    written = []
    for path in RESULTS_DIR.glob("*.json"):
        info = os.lstat(path)  # a link there (a stale one too) is not a result of this run
        if stat.S_ISREG(info.st_mode) and info.st_mtime >= started and not path.name.startswith("summary"):
            written.append(str(path))
    return {"returncode": code, "seconds": round(time.time() - started, 1), "results": sorted(written)}


def run(args: argparse.Namespace) -> int:
    path = check_bench_out(RESULTS_DIR / f"summary{'.quick' if args.quick else ''}.json")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    scripts = available_scripts(args.only)
    if not scripts:
        raise UserError(f"no benchmark scripts in {BENCH_DIR}")
    summary = {}
    for script in scripts:
        if args.quick and not has_quick_mode(script):
            print(f"\n=== {script.stem}: skipped (no --quick mode)", flush=True)
            summary[script.stem] = {
                "returncode": None,
                "skipped": "no --quick mode",
                "seconds": 0,
                "results": [],
            }
        else:
            summary[script.stem] = run_script(script, args.quick, args.timeout)

    write_bench_json(path, {"quick": args.quick, "scripts": summary}, "bench")
    print("\n=== ds-sft bench" + (" --quick" if args.quick else ""))
    for name, entry in summary.items():
        status = "ok" if entry["returncode"] == 0 else f"FAILED ({entry['returncode']})"
        status = "skipped" if entry.get("skipped") else status
        print(f"{name:<18} {status:<12} {entry['seconds']:>7.1f} s  {', '.join(entry['results']) or '-'}")
    print(f"wrote {path}")
    ran = [entry for entry in summary.values() if not entry.get("skipped")]
    return 0 if all(entry["returncode"] == 0 for entry in ran) else 1


if __name__ == "__main__":
    from ds_sft.command import main_for

    sys.exit(main_for("bench"))
