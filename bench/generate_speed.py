"""How fast does ``ds-sft eval`` answer GSM8K? The current code next to an earlier revision.

    python bench/generate_speed.py                       # 16 problems, 160 new tokens, vs ff50485
    python bench/generate_speed.py --problems 48 --threads 1 --dtype float32
    python bench/generate_speed.py --baseline HEAD~3 --model smollm2-135m-instruct

Both contenders run the same entry point, ``ds_sft.eval.evaluate.evaluate_model`` with only GSM8K
switched on, on the same model, data dir and problems; each in its own process, importing ``ds_sft``
from its own source tree (the baseline's is ``git archive``'d into a temporary folder), one after
the other. Both run at ``--batch_size`` (the baseline's default; it had one batch size for
everything) and at ``--generate_batch_size``, which separates the gain of the batch size from the
rest. Greedy answers should not change: the table counts the completions equal to the first row's.
In bf16 they do change with the *batch composition* (other rows, other padding widths round a
near-tie the other way), in the baseline as well: its second row measures that floor, so compare
"same text" in float32 (``--dtype float32``). Prints a table with the ratios and writes
``bench/results/generate_speed[.float32].json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_BASELINE = "ff50485"  # the last commit before generation was reworked (issue 8)
sys.path.insert(0, str(REPO_ROOT))  # the flags are this checkout's; the worker purges it (worker())

from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.errors import UserError  # noqa: E402
from ds_sft.options import COUNT, THREADS, Choice, Int, Text  # noqa: E402
from ds_sft.paths import write_result_file  # noqa: E402

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
    parser.add_argument(
        "--worker", type=Text(), default=None, help=argparse.SUPPRESS
    )  # internal: source tree to time
    parser.add_argument("--worker_batch", type=BATCH, default=None, help=argparse.SUPPRESS)
    return parser


def worker(args: argparse.Namespace) -> None:
    """Time ``evaluate_model``'s GSM8K pass with the ``ds_sft`` of ``args.worker``; print JSON."""
    for name in [name for name in sys.modules if name.partition(".")[0] == "ds_sft"]:
        del sys.modules[name]  # the flags were read with this checkout's ds_sft, not the tree's
    sys.path.insert(0, args.worker)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import ds_sft
    from ds_sft.eval import evaluate, gsm8k

    if not Path(ds_sft.__file__).resolve().is_relative_to(Path(args.worker).resolve()):
        raise SystemExit(f"imported {ds_sft.__file__}, not the tree under test {args.worker}")
    data = evaluate.EvalData.open(Path(args.data_dir), need_val=False)
    problems = gsm8k.select(gsm8k.load_test_set()[0], args.problems, seed=0)
    options = dict(batch_size=args.worker_batch, max_new_tokens=args.max_new_tokens, val_rows=None)
    if "generate_batch_size" in inspect.signature(evaluate.evaluate_model).parameters:
        options["generate_batch_size"] = args.worker_batch
    result = evaluate.evaluate_model(
        args.model,
        data,
        problems,
        device=torch.device("cpu"),
        dtype=getattr(torch, args.dtype),
        run_val=False,
        run_generations=False,
        **options,
    )
    score = result["gsm8k"]
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": result["seconds"]["gsm8k"],
                "correct": score["correct"],
                "completions": [s["completion"] for s in score["samples"]],
                "threads": torch.get_num_threads(),
            }
        )
    )


def time_tree(args: argparse.Namespace, tree: Path, batch: int) -> dict:
    command = [sys.executable, __file__, "--worker", str(tree), "--worker_batch", str(batch)]
    for flag in ("model", "data_dir", "problems", "max_new_tokens", "dtype", "threads"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"worker for {tree} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run(args: argparse.Namespace) -> int:
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="generate_speed_") as tmp:
        baseline_tree = Path(tmp)
        if args.baseline.startswith("-"):  # git would read it as an option
            raise UserError(f"--baseline {args.baseline!r} is not a git revision")
        archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO_ROOT, capture_output=True)
        if archive.returncode != 0:
            why = archive.stderr.decode(errors="replace").strip().splitlines()
            raise UserError(
                f"--baseline {args.baseline!r}: git archive failed ({why[0] if why else 'no reason'})"
            )
        subprocess.run(["tar", "-x", "-C", str(baseline_tree)], input=archive.stdout, check=True)
        contenders = [
            (f"baseline {args.baseline}", baseline_tree, args.batch_size),
            (f"baseline {args.baseline}", baseline_tree, args.generate_batch_size),
            ("current", REPO_ROOT, args.batch_size),
            ("current", REPO_ROOT, args.generate_batch_size),
        ]
        rows = []
        for name, tree, batch in contenders:
            print(f"timing {name}, batch {batch} ...", flush=True)
            rows.append({"name": name, "batch": batch, **time_tree(args, tree, batch)})

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
    path = RESULTS_DIR / f"generate_speed{'' if args.dtype == 'bfloat16' else '.' + args.dtype}.json"
    config = {k: v for k, v in vars(args).items() if not k.startswith("worker")}
    record = {
        "config": config,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "results": rows,
    }
    write_result_file(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
