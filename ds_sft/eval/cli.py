"""``ds-sft eval``: how good is a checkpoint, and is it better than another one?

    ds-sft eval --model runs/sft --data_dir data_sft --gsm8k_limit 100
    ds-sft eval --compare smollm2-135m-instruct runs/sft --data_dir data_sft --out runs/sft-eval

For each model, in this order:

1. validation loss, perplexity and next-token accuracy per source and overall, on the val split
   that ``prepare`` wrote into ``--data_dir`` (the same tokens the trainer's evals saw);
2. GSM8K test accuracy: greedy chain-of-thought answers with the KV cache, scored by exact numeric
   match of the final number (``--gsm8k_limit N``: a seeded subset, the same for every model);
3. greedy answers to a fixed set of prompts (one per Dolly category, a math problem, an open
   question), printed side by side in the report;
4. with ``--harness gsm8k`` (or task config YAMLs): EleutherAI's lm-evaluation-harness on the same
   model and problems, offline, cross-checked against ds-sft's own GSM8K score (ds_sft.eval.harness).

Every accuracy comes with its sample size and 95% Wilson interval; ``--compare`` adds an exact
paired (McNemar) test on the problems both models answered: at n = 10, 1/10 against 0/10 is "not
significant" (ds_sft.eval.stats).

Prompts are rendered with the template recorded in the data dir's ``manifest.json`` and tokenized
with the data dir's tokenizer: the model is asked in exactly the format it was trained on. A ds-sft
run records the template of its data (``RUN/final/trained_on.json``): a data dir of the other one is
refused before any model loads, unless ``--allow_other_template``.

The results go to ``OUT/eval.json`` (everything, including every GSM8K completion), ``OUT/eval.md``
(tables) and ``OUT/val_loss_by_source.png``, listed with their size and sha256 in
``OUT/ds_sft_eval.json``. ``--out`` must be a new or empty folder or a previous eval's, of which only
those listed files are replaced (the new report is built beside it and swapped in); a folder holding
anything else, or one that is, holds or lies inside a model or the data dir, is refused before any
model loads (:mod:`ds_sft.data.output`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.locations import expand_user
from ds_sft.machine import hardware_bf16
from ds_sft.model_source import resolve_model_path
from ds_sft.options import Ignored, refuse_ignored

# the output a refusal that names no file is about (command.execute): where a full disk ran out
OUTPUT_FLAG = "out"

MANIFEST = "ds_sft_eval.json"
# When a forward runs out of memory (ds_sft.command.execute says so in one line): what needs less of it
OUT_OF_MEMORY_FIXES = "pass a smaller --batch_size (the val pass) or --generate_batch_size (the answers)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ds_sft.options import COUNT, INT64_MAX, REPETITION_PENALTY, SEED, THREADS, Device, Int, StoreOnce

    which = parser.add_argument_group("what to evaluate")
    models = which.add_mutually_exclusive_group(required=True)
    models.add_argument(
        "--model",
        action=StoreOnce,
        help="a training run dir, ds-sft/HF model dir, .safetensors/.pt/.gguf file, a Hugging Face id "
        "(owner/name[@revision]), or an alias (smollm2-135m-instruct)",
    )
    models.add_argument(
        "--compare",
        action=StoreOnce,
        nargs=2,
        metavar=("A", "B"),
        help="evaluate two models (same forms as --model) and put them side by side, e.g. base then SFT",
    )
    which.add_argument(
        "--data_dir",
        action=StoreOnce,
        required=True,
        help="a prepared data dir (ds-sft prepare): its val split, tokenizer and prompt template are used",
    )
    which.add_argument(
        "--allow_other_template",
        action="store_true",
        help="evaluate a ds-sft run on data whose prompt template (alpaca or chat) differs from the one "
        "it was fine-tuned on (refused otherwise: the scores would be of a format it never saw)",
    )
    which.add_argument(
        "--out",
        default="runs/eval",
        help="folder for eval.json, eval.md and the chart: a new or empty one, or a previous eval of the "
        "same model(s) and data (only the files eval wrote there are replaced); never inside a model or "
        "the data dir (default: runs/eval)",
    )
    which.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous eval in --out of other models or data (refused otherwise: its results "
        "would be lost without a word)",
    )

    val = parser.add_argument_group("validation loss")
    val.add_argument("--no_val", action="store_true", help="skip the validation loss / perplexity pass")
    val.add_argument(
        "--val_rows",
        type=Int(1, INT64_MAX),
        help="evaluate N packed val rows spread evenly over the split (default: all)",
    )

    gsm8k = parser.add_argument_group("GSM8K")
    gsm8k.add_argument("--no_gsm8k", action="store_true", help="skip GSM8K accuracy")
    gsm8k.add_argument(
        "--gsm8k_limit",
        type=COUNT,
        help="score a seeded subset of N test problems instead of all 1,319 (a 135M model on 2 busy CPU "
        "cores answers ~0.35 problems per second at --max_new_tokens 256)",
    )
    gsm8k.add_argument(
        "--gsm8k_test",
        action=StoreOnce,
        help="GSM8K test.jsonl (question/answer rows); default: ../shared/data/gsm8k/test.jsonl, "
        "else the hub's openai/gsm8k",
    )
    gsm8k.add_argument("--seed", type=SEED, default=0, help="seed of the GSM8K subset drawn by --gsm8k_limit")

    generation = parser.add_argument_group("generation")
    generation.add_argument(
        "--no_generate", action="store_true", help="skip the generations for the fixed prompt set"
    )
    generation.add_argument(
        "--max_new_tokens",
        type=Int(1, 2**20),
        default=256,
        help="longest greedy answer (GSM8K and fixed prompts)",
    )
    generation.add_argument(
        "--repetition_penalty",
        type=REPETITION_PENALTY,
        default=1.0,
        help="divide the logits of tokens already in the prompt or answer by this (1.0 = off; 1.2 breaks "
        "loops)",
    )

    harness = parser.add_argument_group("lm-evaluation-harness (pip install 'ds-sft[eval]')")
    harness.add_argument(
        "--harness",
        metavar="TASKS",
        help="comma-separated harness tasks run offline on the same model: gsm8k (the GSM8K test file "
        "above, same problems, cross-checked against ds-sft's score) or task config .yaml paths with "
        "local data",
    )

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--batch_size", type=Int(1, 2**16), default=8, help="packed rows per val forward")
    runtime.add_argument(
        "--generate_batch_size",
        type=Int(1, 2**16),
        default=32,
        help="prompts generated together (GSM8K, fixed prompts); a decode step costs about the same for "
        "8 rows as for 32, so larger batches answer faster until attention over the cache dominates",
    )
    runtime.add_argument(
        "--threads",
        type=THREADS,
        help="torch CPU threads (default: torch's choice); 1 is often fastest on a machine shared with "
        "other jobs, where multithreaded small ops wait on descheduled threads",
    )
    runtime.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="weights and activations dtype (logits are upcast to fp32 for the loss either way); auto: "
        "bfloat16 where the device computes in it (CUDA with bf16, a CPU with avx512_bf16 or AMX), else "
        "float32",
    )
    runtime.add_argument(
        "--device",
        type=Device(),
        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)",
    )
    refuse_ignored(parser, *IGNORED)


def _answers_nothing(args: argparse.Namespace) -> bool:
    return args.no_gsm8k and args.no_generate and not args.harness


_NO_VAL = "with --no_val, which skips the val pass: drop one of the two"
_NO_GSM8K = "with --no_gsm8k, which skips GSM8K: drop one of the two"
_NO_ANSWERS = "with --no_gsm8k and --no_generate and no --harness: nothing is generated; drop it"
# Each flag that a choice of another makes do nothing (ds_sft.options.Ignored).
IGNORED = (
    Ignored("--val_rows", lambda a: a.no_val, _NO_VAL),
    Ignored("--batch_size", lambda a: a.no_val, _NO_VAL + " (it sizes the val pass's forwards only)"),
    Ignored("--gsm8k_limit", lambda a: a.no_gsm8k, _NO_GSM8K),
    Ignored("--gsm8k_test", lambda a: a.no_gsm8k, _NO_GSM8K),
    Ignored("--seed", lambda a: a.no_gsm8k, _NO_GSM8K),
    Ignored(
        "--seed",
        lambda a: a.gsm8k_limit is None,
        "without --gsm8k_limit: it draws that subset, and without one every problem is scored",
    ),
    Ignored("--max_new_tokens", _answers_nothing, _NO_ANSWERS),
    Ignored("--generate_batch_size", _answers_nothing, _NO_ANSWERS),
    Ignored(
        "--repetition_penalty",
        lambda a: a.no_gsm8k and a.no_generate,
        "with --no_gsm8k and --no_generate: it applies to ds-sft's own answers only (the harness "
        "does not use it); drop it",
    ),
)


def _labels(specs: list[str]) -> list[str]:
    """Short column names: the spec's last path part ('final' reads as its run dir's name)."""
    names = []
    for spec in specs:
        path = Path(spec)
        names.append(path.parent.name if path.name == "final" else path.name or spec)
    if len(set(names)) < len(names):
        names = [f"{letter}:{name}" for letter, name in zip("ABCDEFGH", names, strict=False)]
    return names


def _check_args(args: argparse.Namespace, specs: list[str]) -> tuple[Path, dict | None]:
    """Refuse bad folders before any work; returns (--out resolved, the manifest of the previous eval
    there, if any)."""
    from ds_sft.data.output import check_output_dir, refuse_overlap
    from ds_sft.safe_write import writable_dir

    # numbers are checked by their declared domains in add_arguments (ds_sft/options.py)
    if args.no_val and _answers_nothing(args):
        raise UserError(
            "--no_val, --no_gsm8k and --no_generate leave nothing to evaluate: drop one of them (or add "
            "--harness TASKS)"
        )
    if not Path(args.data_dir).is_dir():
        what = "is not a folder" if os.path.lexists(args.data_dir) else "does not exist"
        raise UserError(f"--data_dir {args.data_dir} {what}: pass the folder `ds-sft prepare` wrote")
    writable_dir(args.out, "--out")
    inputs = {"the data dir": Path(args.data_dir)}
    names = ["the model"] if len(specs) == 1 else ["model A", "model B"]
    for name, spec in zip(names, specs, strict=True):  # a hub id or an alias lives in a cache, not here
        if expand_user(spec).exists():
            inputs[name] = expand_user(spec)
    refuse_overlap(args.out, "--out", inputs)
    return check_output_dir(args.out, [], "--out", "eval", MANIFEST)


def _refuse_another_eval(args: argparse.Namespace, previous: dict | None, subject: dict) -> None:
    """Refuse to replace the previous eval in --out when it is of other models or data
    (:func:`evaluated`), unless --overwrite."""
    if previous is None or args.overwrite:
        return
    before = {key: previous.get(key) for key in ("models", "data_dir")}
    if before != subject:
        models = before["models"] if isinstance(before["models"], list) else ["models it did not record"]
        data = before["data_dir"] if isinstance(before["data_dir"], str) else "data it did not record"
        raise UserError(
            f"--out {args.out} holds the eval of {', '.join(map(str, models))} on {data}: pass another "
            "--out (e.g. --out runs/eval-NAME), or --overwrite to replace it"
        )


def evaluated(args: argparse.Namespace, models: list[Path]) -> dict:
    """What an eval's output is of, as its manifest records it: the models and the data dir, each as
    the files read (``models``: the specs resolved, a hub id or an alias to its snapshot or file:
    ``owner/name`` and ``owner/name@main`` are one model, and a ``main`` that moved to another commit
    is another). A later eval replaces only an eval of the same."""

    def named(path: Path) -> str:
        return os.path.realpath(path / "final" if (path / "final").is_dir() else path)  # RUN is RUN/final

    return {"models": [named(path) for path in models], "data_dir": os.path.realpath(args.data_dir)}


def available_device(name: str | None):
    """``name`` (a ``ds_sft.options.Device`` value) as a torch device this machine has, else one
    line; None: CUDA when present, else the CPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name is None:
        return torch.device("cuda" if count else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and count == 0:
        raise UserError(f"--device {name}: torch sees no CUDA device on this machine; pass --device cpu")
    if device.type == "cuda" and (device.index or 0) >= count:
        raise UserError(
            f"--device {name}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
        )
    return device


def run(args: argparse.Namespace) -> int:
    import torch

    from ds_sft.data.model_match import check_template, check_tokenizer, final_behind
    from ds_sft.data.output import building_output
    from ds_sft.eval import evaluate, gsm8k
    from ds_sft.eval.report import write_report
    from ds_sft.eval.stats import paired_comparison

    specs = list(args.compare) if args.compare else [args.model]
    out, previous = _check_args(args, specs)
    device = available_device(args.device)
    dtype_name = args.dtype
    if dtype_name == "auto":  # emulated bf16 is slower than fp32 (machine.hardware_bf16)
        dtype_name = "bfloat16" if hardware_bf16(device)[0] else "float32"
    dtype = getattr(torch, dtype_name)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    data = evaluate.EvalData.open(Path(args.data_dir), need_val=not args.no_val)
    all_problems, problems, gsm8k_origin, doc_ids = [], [], None, []
    if not args.no_gsm8k:
        all_problems, gsm8k_origin = gsm8k.load_test_set(args.gsm8k_test)
        doc_ids = gsm8k.select_indices(len(all_problems), args.gsm8k_limit, args.seed)
        problems = [all_problems[i] for i in doc_ids]
    harness_configs = _harness_configs(args, gsm8k_origin)
    # each spec resolved once, after the checks of the flags, and its path passed along: each resolve
    # of a hub id asks the hub (online), and each of a folder or a file looks it up again
    models = [resolve_model_path(spec) for spec in specs]
    subject = evaluated(args, models)
    _refuse_another_eval(args, previous, subject)
    for spec, path in zip(specs, models, strict=True):  # before any weights load: one line for a model
        check_tokenizer(spec, args.data_dir, path)  # with another tokenizer
        said = final_behind(spec, path)
        if said:
            print(said)
        if not args.allow_other_template:
            check_template(spec, args.data_dir, path)
    # --compare: model B's refusals (its positions, vocabulary, the memory its answers need) came
    # after model A's whole eval, an hour at the default GSM8K; the first model is checked as it loads
    for spec, path in zip(specs[1:], models[1:], strict=True):
        evaluate.load_checked_model(
            spec, data, problems, device=device, dtype=dtype, generate_batch_size=args.generate_batch_size,
            max_new_tokens=args.max_new_tokens, run_generations=not args.no_generate,
            batch_size=args.batch_size, val_rows=args.val_rows, path=path,
        )  # fmt: skip

    results = []
    for spec, path, label in zip(specs, models, _labels(specs), strict=True):
        print(f"== {label}: {spec}", flush=True)
        result = evaluate.evaluate_model(
            spec,
            data,
            problems,
            path=path,
            device=device,
            dtype=dtype,
            batch_size=args.batch_size,
            generate_batch_size=args.generate_batch_size,
            max_new_tokens=args.max_new_tokens,
            val_rows=args.val_rows,
            run_val=not args.no_val,
            run_generations=not args.no_generate,
            repetition_penalty=args.repetition_penalty,
            harness={"label": label, "configs": harness_configs, "doc_ids": doc_ids}
            if harness_configs
            else None,
        )
        results.append({"label": label, "model": spec, **result})

    meta = {
        "data_dir": str(args.data_dir),
        "template": data.template,
        # what was measured, not what was asked: --val_rows 1000000 on a 12-row split, or
        # --gsm8k_limit 5000 of 1,319 problems, were reported as 1000000 rows and a 5000 subset
        "val_rows": results[0]["val"]["rows"] if results[0]["val"] else None,
        "gsm8k_test": gsm8k_origin,
        "gsm8k_seed": args.seed,
        "gsm8k_limit": len(problems) if problems and len(problems) < len(all_problems) else None,
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
        "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    graded = [result for result in results if result.get("gsm8k")]
    if len(graded) == 2:
        meta["gsm8k_paired"] = paired_comparison(
            *([s["correct"] for s in result["gsm8k"]["samples"]] for result in graded),
            labels=(graded[0]["label"], graded[1]["label"]),
        )
    if harness_configs:
        meta["harness"] = {
            "version": results[0]["harness"]["version"],
            "task_configs": harness_configs,
            "scores": [row for result in results for row in result["harness"]["scores"]],
            "cross_check": [check for result in results for check in result["harness"]["cross_check"]],
        }
    record = {"written_by": "ds-sft eval", **subject}
    old_files = previous["files"] if previous else {}
    with building_output(out, old_files, "--out", record, MANIFEST) as staging:
        written = write_report(staging, results, meta)
    _print_summary(results, meta)
    print("wrote " + ", ".join(str(Path(args.out) / path.name) for path in written.values()))
    return 0


def _harness_configs(args: argparse.Namespace, gsm8k_origin: str | None) -> list[dict]:
    """The ``--harness`` task configs; gsm8k must read the same local test file as ds-sft."""
    from ds_sft.eval import harness

    if not args.harness:
        return []
    tasks = [task.strip() for task in args.harness.split(",") if task.strip()]
    if not tasks:
        raise UserError(f"--harness {args.harness!r} names no task: pass gsm8k or task config .yaml paths")
    if "gsm8k" in tasks and (args.no_gsm8k or gsm8k_origin is None or gsm8k_origin.startswith("hub:")):
        raise UserError(
            "--harness gsm8k scores the same problems as ds-sft's GSM8K: drop --no_gsm8k and give the "
            "test set as a local file (--gsm8k_test PATH/test.jsonl)"
        )
    harness.version()  # a missing lm-eval is one line, before any model loads
    return harness.task_configs(tasks, gsm8k_origin, args.max_new_tokens)


def _print_summary(results: list[dict], meta: dict) -> None:
    from ds_sft.eval.report import truncation_warnings
    from ds_sft.eval.stats import format_accuracy

    for result in results:
        parts = [result["label"]]
        if result.get("val"):
            overall = result["val"]["overall"]
            loss, ppl, tokens = overall["loss"], overall["perplexity"], overall["tokens"]
            parts.append(f"val loss {loss:.4f} ppl {ppl:.2f} ({tokens:,} tokens)")
            parts += [f"{name} {m['loss']:.3f}" for name, m in result["val"]["by_source"].items()]
        if result.get("gsm8k"):
            parts.append(f"gsm8k {format_accuracy(result['gsm8k'])}")
        print(" | ".join(parts))
    if meta.get("gsm8k_paired"):
        print(f"gsm8k paired: {meta['gsm8k_paired']['summary']}")
    for check in (meta.get("harness") or {}).get("cross_check", []):
        print(f"cross-check {check['label']}: {check['summary']}")
    for line in truncation_warnings(results, meta.get("max_new_tokens")):
        print(f"WARNING: {line}")
