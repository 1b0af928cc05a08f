"""How fast does ``ds-sft eval`` answer GSM8K? The current code next to an earlier revision.

    python bench/generate_speed.py                       # 16 problems, 160 new tokens, vs ff50485
    python bench/generate_speed.py --problems 48 --threads 1 --dtype float32
    python bench/generate_speed.py --baseline HEAD~3 --model smollm2-135m-instruct

Both contenders run the same entry point, ``ds_sft.eval.evaluate.evaluate_model`` with only GSM8K
switched on, on the same model, data dir and problems; each in its own process, importing ``ds_sft``
from its own source tree (the baseline's is ``git archive``'d into a temporary folder), one after
the other, the current code first: its checks read the model and data before the older code does.
Both run at ``--batch_size`` (the baseline's default; it had one batch size for everything) and at
``--generate_batch_size``, which separates the gain of the batch size from the rest. Greedy answers
should not change: the table counts the completions equal to the baseline's first row's.
In bf16 they do change with the *batch composition* (other rows, other padding widths round a
near-tie the other way), in the baseline as well: its second row measures that floor, so compare
"same text" in float32 (``--dtype float32``). Prints a table with the ratios and writes
``bench/results/generate_speed[.float32].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_BASELINE = "ff50485"  # the last commit before generation was reworked (issue 8)
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

from ds_sft.bench_result import check_bench_out, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.errors import UserError, process_ending  # noqa: E402
from ds_sft.options import COUNT, THREADS, Choice, Int, Text  # noqa: E402

BATCH = Int(1, 2**16)


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__)
    parser.add_argument(
        "--model", type=Text(), default="runs/demo/run", help="model spec (default: runs/demo/run)"
    )
    parser.add_argument(
        "--data_dir",
        type=Text(),
        default="runs/demo/data",
        help="prepared data dir (default: runs/demo/data)",
    )
    parser.add_argument(
        "--problems", type=COUNT, default=16, help="GSM8K test problems (seeded subset; default 16)"
    )
    parser.add_argument(
        "--max_new_tokens", type=Int(1, 2**20), default=160, help="longest answer (default: 160, the demo's)"
    )
    parser.add_argument("--batch_size", type=BATCH, default=8, help="the baseline's batch size (default: 8)")
    parser.add_argument(
        "--generate_batch_size", type=BATCH, default=32, help="the current code's batch size (default: 32)"
    )
    parser.add_argument(
        "--dtype",
        type=Choice("bfloat16", "float32"),
        default="bfloat16",
        help="bfloat16 or float32 (default: bfloat16)",
    )
    parser.add_argument(
        "--threads", type=THREADS, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--baseline",
        type=Text(),
        default=DEFAULT_BASELINE,
        help=f"git revision (default: {DEFAULT_BASELINE})",
    )
    return parser


# Times are kept to 0.1 s (evaluate_model rounds them, in the baseline too): below this a ratio is noise
SHORTEST_PASS_S = 2.0
WORKER = Path(__file__).with_name("_generate_speed_worker.py")


def time_tree(args: argparse.Namespace, name: str, tree: Path, batch: int) -> dict:
    """The GSM8K pass of ``tree``'s ds_sft (the contender ``name``) in a process of its own
    (:data:`WORKER`)."""
    print(f"timing {name}, batch {batch} ...", flush=True)
    settings = {flag: getattr(args, flag) for flag in ("model", "data_dir", "problems", "max_new_tokens",
                                                       "dtype", "threads")}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(WORKER)], input=json.dumps({**settings, "batch": batch}),
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        said = [line.removeprefix("ERROR ") for line in out.stdout.splitlines() if line.startswith("ERROR ")]
        if not said:  # killed (out of memory...) or ended without a word: its code, and its last line
            last = (out.stderr.strip().splitlines() or ["(none)"])[-1]
            said = [f"{process_ending(out.returncode)}; its last line: {last}"]
        raise UserError(f"{name}, batch {batch}: the GSM8K pass stopped: {said[-1]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if not Path(result["ds_sft"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the worker imported {result['ds_sft']}, not the tree under test {tree}")
    if result["seconds"] < SHORTEST_PASS_S:  # a ratio of rounded times, or a division by 0.0
        raise UserError(
            f"a GSM8K pass took {result['seconds']:.1f} s, under the {SHORTEST_PASS_S:.0f} s its 0.1 s "
            "timing can compare: raise --problems or --max_new_tokens"
        )
    return result


def run(args: argparse.Namespace) -> int:
    path = check_bench_out(
        RESULTS_DIR / f"generate_speed{'' if args.dtype == 'bfloat16' else '.' + args.dtype}.json"
    )
    if args.baseline.startswith("-"):  # git would read it as an option
        raise UserError(f"--baseline {args.baseline!r} is not a git revision")
    archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO_ROOT, capture_output=True)
    if archive.returncode != 0:
        why = archive.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(f"--baseline {args.baseline!r}: git archive failed ({(why or ['no reason'])[0]})")
    batches = (args.batch_size, args.generate_batch_size)
    # The current code first: its checks (remote code, templates in a sandbox, sizes) read the model and
    # data before the baseline's older code, which lacks the later ones, is given them.
    current = [{"name": "current", "batch": b, **time_tree(args, "current", REPO_ROOT, b)} for b in batches]
    with tempfile.TemporaryDirectory(prefix="generate_speed_") as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        name = f"baseline {args.baseline}"
        baseline = [{"name": name, "batch": b, **time_tree(args, name, Path(tmp), b)} for b in batches]
    rows = baseline + current  # each compared with the baseline's first row

    base = rows[0]
    print(
        f"\nGSM8K, {args.problems} problems, {args.max_new_tokens} new tokens max, {args.dtype}, "
        f"{rows[0]['threads']} threads, model {args.model}"
    )
    header = ("contender", "batch", "seconds", "problems/s", "speedup", "same text", "correct")
    print(("{:<20}" + " {:>10}" * 6).format(*header))
    for row in rows:
        row["speedup"] = base["seconds"] / row["seconds"]
        same = sum(a == b for a, b in zip(row["completions"], base["completions"], strict=True))
        row["same_completions"] = same
        cells = (row["batch"], f"{row['seconds']:.1f}", f"{args.problems / row['seconds']:.3f}")
        cells += (f"{row['speedup']:.2f}x", f"{same}/{args.problems}", row["correct"])
        print(("{:<20}" + " {:>10}" * 6).format(row["name"], *cells))
    config = vars(args)
    record = {
        "config": config,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "results": rows,
    }
    write_bench_json(path, record, __file__)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
