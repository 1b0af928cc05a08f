"""How long `ds-sft prepare` takes on the shared mix, against TRL's own dataset preparation.

    python bench/prepare_speed.py                 # 1x, 2x, 4x the mix; TRL on 1x; best of 3 runs
    python bench/prepare_speed.py --copies 1 --trl_copies 1 2 --repeat 5

What is timed (imports excluded, all in this one process, one after the other):
- ds-sft: the whole `prepare` command (load, clean, dedup, 13-gram decontamination against the GSM8K
  test set and val, tokenization, BFD packing, shards, manifest, tokenizer, histogram) on the shared
  mix (Alpaca 5k + GSM8K train + Dolly 5k = 17,473 rows), GPT-2 tokenizer, seq 1024; then on the mix
  replicated 2x and 4x (each copy's instructions are tagged so dedup keeps them): time should grow
  linearly.
- TRL: `SFTTrainer._prepare_dataset` on the same rows as prompt/completion pairs (the prompt rendered
  with the same Alpaca template), packing with its BFD at max_length 1024: what `SFTTrainer(...)`
  runs before training. Needs `pip install -e .[bench]`; without TRL the bench says so and keeps the
  next line.
- plain: `encode_batch_fast` of prompts and responses + ds-sft's numpy BFD, nothing else: the floor.

Each pipeline runs ``--repeat`` times, interleaved (ds-sft, plain, TRL, ds-sft, ...), and the best
run of each counts: on a shared machine the fastest run is the one least slowed by other jobs. Wall
and CPU seconds are both reported (wall stretches with other people's jobs, CPU time much less), with
the load average. Every ds-sft run is cold: fresh input files and an empty ``datasets`` cache, so no
Arrow file of an earlier run (not even of the GSM8K test set) is reused. Compare ratios from the same
run only. Results go to bench/results/prepare_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

from ds_sft.bench_result import check_bench_out, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.errors import UserError  # noqa: E402
from ds_sft.options import COUNT, Int  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
COPIES = Int(1, 1024)  # replications of the shared mix (~75k rows each)
SEQ_LEN = 1024


class Clock:
    """Wall seconds and CPU seconds of this process (all its threads) over a ``with`` block.

    CPU seconds matter on a shared machine: when other jobs hold the cores, wall time stretches for
    reasons unrelated to the code under test, while the CPU work each pipeline needs stays put.
    """

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def result(self, efficiency: float) -> dict:
        return {"seconds": self.wall, "cpu_seconds": self.cpu, "efficiency": float(efficiency)}


def shared_mix_rows(shared: Path) -> dict[str, list[dict]]:
    def jsonl(path):
        return [json.loads(line) for line in path.open()]

    data = shared / "data"
    return {
        "alpaca": json.loads((data / "alpaca/alpaca_cleaned_first5k.json").read_text()),
        "gsm8k": jsonl(data / "gsm8k/train.jsonl"),
        "dolly": jsonl(data / "dolly/dolly_5k_instruction_input_output.jsonl"),
    }


def replicate(rows: dict[str, list[dict]], copies: int) -> dict[str, list[dict]]:
    """``copies`` versions of every row; copy k > 0 tags its instruction so dedup keeps it."""
    key = {"alpaca": "instruction", "gsm8k": "question", "dolly": "instruction"}
    return {
        name: [
            {**row, key[name]: row[key[name]] + (f" (variant {k})" if k else "")}
            for k in range(copies)
            for row in source_rows
        ]
        for name, source_rows in rows.items()
    }


def prompt_completion_pairs(rows: dict[str, list[dict]]) -> list[tuple[str, str]]:
    from ds_sft.data.templates import render_prompt

    pairs = []
    for row in rows["alpaca"] + rows["dolly"]:
        pairs.append(
            (
                render_prompt({"instruction": row["instruction"], "input": row["input"]}, "alpaca"),
                row["output"],
            )
        )
    for row in rows["gsm8k"]:
        pairs.append((render_prompt({"instruction": row["question"], "input": ""}, "alpaca"), row["answer"]))
    return pairs


def time_ds_sft(rows: dict[str, list[dict]], shared: Path, workdir: Path) -> dict:
    import datasets.config

    from ds_sft.command import main_for

    datasets.config.HF_DATASETS_CACHE = workdir / "hf_datasets_cache"  # empty: a cold run

    args = []
    for name, source_rows in rows.items():
        path = workdir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in source_rows))
        args += [f"--{name}", str(path)]
    out = workdir / "prepared"
    argv = [
        *args,
        "--gsm8k_test",
        str(shared / "data/gsm8k/test.jsonl"),
        "--tokenizer",
        "gpt2",
        "--output_dir",
        str(out),
    ]
    with Clock() as clock:
        code = main_for("prepare", [*argv, "--force", "--seq_len", str(SEQ_LEN)])
    if code != 0:  # prepare has said why in its own line above; no timing of a failed run
        raise UserError(f"the timed `ds-sft prepare` failed (exit {code}; its error is above): fix it, rerun")
    manifest = json.loads((out / "manifest.json").read_text())
    return clock.result(manifest["splits"]["train"]["efficiency"]["real_tokens"])


def time_trl(pairs: list[tuple[str, str]], tokenizer_dir: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    dataset = datasets.Dataset.from_dict(
        {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}
    )
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_length=SEQ_LEN,
        packing=True,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    # What SFTTrainer.__init__ sets before it prepares the dataset; no model needed for this part.
    trainer_state = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=True)
    with Clock() as clock:
        packed = SFTTrainer._prepare_dataset(trainer_state, dataset, tokenizer, config, True, None, "train")
    tokens = sum(map(len, packed["input_ids"]))
    return clock.result(tokens / (len(packed) * SEQ_LEN))


def time_plain(pairs: list[tuple[str, str]], tokenizer_dir: Path) -> dict:
    from tokenizers import Tokenizer

    from ds_sft.data.pack import best_fit_decreasing

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    with Clock() as clock:
        prompts = tokenizer.encode_batch_fast([p for p, _ in pairs], add_special_tokens=False)
        answers = tokenizer.encode_batch_fast([c for _, c in pairs], add_special_tokens=False)
        lengths = np.array([len(p.ids) + len(a.ids) + 1 for p, a in zip(prompts, answers, strict=True)])
        lengths = lengths[lengths <= SEQ_LEN]
        rows = best_fit_decreasing(lengths, SEQ_LEN)
    return clock.result(lengths.sum() / (len(rows) * SEQ_LEN))


def best_of(runs: list[dict]) -> dict:
    """The fastest wall time and the least CPU time over ``runs`` (each run's figures kept too)."""
    return {
        "seconds": min(r["seconds"] for r in runs),
        "cpu_seconds": min(r["cpu_seconds"] for r in runs),
        "efficiency": runs[0]["efficiency"],  # the same output every run
        "runs": runs,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__)
    parser.add_argument(
        "--copies", type=COPIES, nargs="+", default=[1, 2, 4], help="mix replications for ds-sft"
    )
    parser.add_argument(
        "--trl_copies", type=COPIES, nargs="*", default=[1], help="replications to run TRL on"
    )
    parser.add_argument(
        "--repeat", type=COUNT, default=3, help="runs of each pipeline, interleaved; the best one counts"
    )
    return parser


def run(args: argparse.Namespace) -> None:
    out = check_bench_out(RESULTS / "prepare_speed.json")
    # Imports are excluded from every timing, including the lazy ones each pipeline triggers.
    import datasets
    import datasets.packaged_modules.json  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    from ds_sft.locations import shared_dir

    datasets.disable_progress_bars()
    shared = shared_dir()
    if shared is None:
        raise UserError("bench/prepare_speed.py needs ../shared (the real data and GPT-2 tokenizer)")
    tokenizer_dir = shared / "tokenizers" / "gpt2"
    try:
        import trl  # noqa: F401

        trl_note = None
    except ImportError:
        trl_note = "TRL is not installed (pip install -e .[bench]); compared with the plain baseline only"
        print(trl_note)
    base = shared_mix_rows(shared)
    results = []
    load_before = os.getloadavg()
    for copies in sorted(set(args.copies) | set(args.trl_copies)):
        rows = replicate(base, copies)
        pairs = prompt_completion_pairs(rows)
        runs: dict[str, list[dict]] = {"ds_sft": [], "trl": [], "plain": []}
        for _ in range(args.repeat):
            if copies in args.copies:
                with tempfile.TemporaryDirectory() as workdir:
                    runs["ds_sft"].append(time_ds_sft(rows, shared, Path(workdir)))
            runs["plain"].append(time_plain(pairs, tokenizer_dir))
            if copies in args.trl_copies and trl_note is None:
                runs["trl"].append(time_trl(pairs, tokenizer_dir))
        entry = {"copies": copies, "rows": len(pairs)}
        entry.update({name: best_of(timed) for name, timed in runs.items() if timed})
        results.append(entry)
    load = {"before": load_before, "after": os.getloadavg()}

    columns = {"ds_sft": "ds-sft", "trl": "TRL", "plain": "plain"}
    print(f"\n{'':>14}" + "".join(f"{name:>26}" for name in columns.values()))
    print(f"{'copies':>6}{'rows':>8}" + f"{'wall s':>10}{'cpu s':>8}{'fill':>8}" * len(columns))
    for e in results:
        line = f"{e['copies']:>6}{e['rows']:>8,}"
        for key in columns:
            r = e.get(key)
            line += (
                f"{r['seconds']:>10.2f}{r['cpu_seconds']:>8.2f}{r['efficiency']:>8.2%}" if r else f"{'-':>26}"
            )
        print(line)
        if "ds_sft" in e and "trl" in e:
            wall = e["trl"]["seconds"] / e["ds_sft"]["seconds"]
            cpu = e["trl"]["cpu_seconds"] / e["ds_sft"]["cpu_seconds"]
            print(f"{'':>14}TRL / ds-sft: {wall:.2f}x wall, {cpu:.2f}x CPU")
    timed = [e for e in results if "ds_sft" in e]
    if len(timed) > 1:
        print("ds-sft microseconds per row (flat = linear cost):")
        for kind, key in (("wall", "seconds"), ("CPU", "cpu_seconds")):
            per_row = ", ".join(f"{e['copies']}x {e['ds_sft'][key] / e['rows'] * 1e6:.0f}" for e in timed)
            print(f"  {kind:<5}{per_row}")
    print(
        f"best of {args.repeat} runs each; ds-sft runs cold (fresh files, empty datasets cache); "
        f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after (1 min)"
    )
    summary = {"seq_len": SEQ_LEN, "repeat": args.repeat, "load_average": load, "note": trl_note}
    write_bench_json(out, {**summary, "results": results}, __file__)
    print(f"wrote {RESULTS / 'prepare_speed.json'}")


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
