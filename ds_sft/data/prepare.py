"""ds-sft prepare: turn instruction files into packed, loss-masked token shards for training.

    ds-sft prepare --alpaca alpaca_data_cleaned.json --gsm8k train-00000-of-00001.parquet \\
        --dolly databricks-dolly-15k.jsonl --output_dir data_sft_enhanced --max_examples 80000

Stages, in order (every dropped row is counted by source and reason in manifest.json):
  load      json / jsonl (parsed here) / parquet, regular files only (or a hub id); any one source alone
            is a valid run
  clean     NFC + whitespace normalization; Alpaca "<noinput>"-style inputs emptied; GSM8K calculator
            annotations <<48/2=24>> stripped (the final "#### N" line is kept); empty rows dropped;
            rows spelling a special token of the tokenizer dropped
  bound     rows that certainly cannot fit --seq_len, found from their text's length alone
            (tokenize.LengthFloor), dropped as longer_than_seq_len, or with --truncate cut to what can
            be trained: the stages below never pay for text that cannot be trained (and such rows take
            no part in dedup or the val split)
  dedup     exact and case/spacing/final-period-folded duplicates, across all sources
  decontam  rows sharing >= --decontam_threshold of their 13-grams with the GSM8K test set dropped;
            then the val split is cut per source and train rows overlapping val rows are dropped
            (a 13-gram in more than 10 rows, or 10 test documents, is boilerplate and not counted)
  tokenize  prompt and response tokenized apart: the loss covers exactly response + EOS (this runs on
            a worker thread alongside dedup and decontam, and the rows they keep are then taken);
            a conversation trains every assistant turn (--train_on all) or its last (--train_on last);
            rows longer than --seq_len dropped (longer_than_seq_len; with --truncate cut, or dropped as
            prompt_fills_seq_len when the prompt leaves no room); rows whose answers encode to no
            token (a tokenizer without the characters, no unknown token, no byte fallback) dropped as
            answer_has_no_tokens, since they would train on the end-of-text token alone
  mix       --mix weights upsample sources by whole epochs plus a seeded fraction; --max_examples caps
            (data/mix.py, which also cuts the val split)
  pack      best-fit-decreasing into rows of --seq_len (or --no_pack: one padded row per example)
  write     DIR/train, DIR/val (memmap shards), DIR/tokenizer, DIR/manifest.json, DIR/lengths.png, built
            in a temporary sibling and swapped in atomically; of an old DIR only the files its manifest
            lists are deleted, and a DIR holding anything else is refused before any work (data/output.py)

With no source flag, the offline ../shared/data mix is used when present. Re-running with the same
inputs and flags reuses DIR (the manifest holds a hash of both, and the size and sha256 of every file,
checked before reuse); --force redoes it.
Generic sources: --source NAME=PATH reads instruction/input/output, Dolly, GSM8K, prompt/completion or
chat `messages` (OpenAI role/content) / `conversations` (ShareGPT from/value) columns, found
automatically, or mapped explicitly with
--field_map NAME:instruction=COL,input=COL,response=COL (or NAME:messages=COL).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ds_sft.data.mix import check_mix_fits, mix_indices, parse_mix, split_val
from ds_sft.errors import UserError, as_os_error, one_line
from ds_sft.locations import expand_user
from ds_sft.model_source import hub_offline
from ds_sft.options import (
    INT32_MAX,
    INT64_MAX,
    SEED,
    Choice,
    Float,
    Ignored,
    Int,
    StoreOnce,
    Weights,
    refuse_ignored,
)

if TYPE_CHECKING:
    from ds_sft.data.tokenize import Documents

# the output a refusal that names no file is about (command.execute): where a full disk ran out
OUTPUT_FLAG = "output_dir"

FORMAT_VERSION = 4  # bump when the output layout, a cleaning or tokenizing rule changes: old outputs redone

DROP_REASON_TOO_LONG = {1: "longer_than_seq_len", 2: "prompt_fills_seq_len"}
SHARED_FILES = {
    "alpaca": "alpaca/alpaca_cleaned_first5k.json",
    "gsm8k": "gsm8k/train.jsonl",
    "dolly": "dolly/dolly_5k_instruction_input_output.jsonl",
}
SHARED_GSM8K_TEST = "gsm8k/test.jsonl"
NOT_IN_CACHE_KEY = {"output_dir", "force", "alpaca", "gsm8k", "dolly", "source", "from_shared", "command"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """prepare's flags, in the groups --help shows, and the pairs of them where one does nothing."""
    add_source_flags(parser.add_argument_group("sources (any one alone is a valid run)"))
    add_tokenization_flags(parser.add_argument_group("tokenization"))
    add_mix_flags(parser.add_argument_group("mixing, split and packing"))
    add_output_flags(parser.add_argument_group("output"))
    refuse_ignored(
        parser,
        Ignored(
            "--min_val_rows",
            lambda a: a.val_fraction == 0,
            "with --val_fraction 0, which holds out no val rows: drop one of the two",
        ),
        Ignored(
            "--gsm8k_test",
            lambda a: a.decontam_threshold == 0,
            "with --decontam_threshold 0: the test set is read only to decontaminate against; drop one "
            "of the two",
        ),
    )


def add_source_flags(src) -> None:
    from ds_sft.data.sources import HUB_IDS

    for kind, (hub_id, _) in HUB_IDS.items():
        src.add_argument(
            f"--{kind}",
            action=StoreOnce,
            nargs="?",
            const=hub_id,
            metavar="PATH_OR_HUB_ID",
            help=f"{kind} data: a .json/.jsonl/.parquet file, or a hub id (bare flag: {hub_id})",
        )
    src.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another source (repeatable): its columns are detected (instruction/input/output, Dolly, "
        "question/answer, prompt/completion, chat messages or ShareGPT conversations) or mapped "
        "with --field_map",
    )
    src.add_argument(
        "--field_map",
        action="append",
        default=[],
        metavar="NAME:FIELD=COL,...",
        help="column mapping for --source NAME, e.g. mydata:instruction=q,input=ctx,response=a "
        "or mydata:messages=conversation (fields: instruction, input, response, category, messages); "
        "one per source, repeatable for several sources",
    )
    src.add_argument(
        "--from_shared",
        action="store_true",
        help="add the ../shared/data mix (Alpaca 5k, GSM8K train, Dolly 5k) for sources not given; "
        "the default when no source flag is passed",
    )
    src.add_argument(
        "--gsm8k_test",
        action=StoreOnce,
        metavar="PATH",
        help="the GSM8K test set to decontaminate against (default: ../shared/data/gsm8k/test.jsonl, "
        "a test file beside --gsm8k, or openai/gsm8k's test split when online)",
    )


def add_tokenization_flags(tok) -> None:
    tok.add_argument(
        "--tokenizer",
        action=StoreOnce,
        help="tokenizer.json, a tokenizer directory, a .gguf file, 'gpt2' or a model alias (default: gpt2)",
    )
    tok.add_argument(
        "--base_model",
        action=StoreOnce,
        help="use this model's tokenizer (a path, a Hugging Face id owner/name[@revision], or an "
        "alias, e.g. smollm2-135m-instruct); --seq_len may not exceed the model's positions",
    )
    tok.add_argument(
        "--template",
        default="auto",
        choices=["auto", "alpaca", "chat"],
        help="prompt format: alpaca, the tokenizer's chat template, or auto (chat if the tokenizer has one)",
    )
    tok.add_argument(
        "--seq_len", type=Int(8, 2**20), default=1024, help="tokens per packed row (default: 1024)"
    )
    tok.add_argument(
        "--train_on",
        type=Choice("all", "last"),
        default="all",
        help="which assistant turns of a conversation (messages) row are trained: all of them "
        "(default), or only the last one, the earlier turns being prompt",
    )
    tok.add_argument(
        "--truncate",
        action="store_true",
        help="cut examples longer than --seq_len at the end of their response instead of dropping them",
    )


def add_mix_flags(mix) -> None:
    mix.add_argument(
        "--mix",
        type=Weights(Float(0, 1000)),
        default="",
        metavar="NAME=W,...",
        help="per-source weights, e.g. alpaca=1,gsm8k=2,dolly=1 (whole epochs + a seeded share; default 1)",
    )
    mix.add_argument(
        "--max_examples",
        type=Int(1, INT64_MAX),
        help="cap on training examples after mixing; every source is scaled down by the same factor",
    )
    mix.add_argument(
        "--val_fraction",
        type=Float(0, 1, max_open=True),
        default=0.02,
        help="share of each source held out for validation (default: 0.02)",
    )
    mix.add_argument(
        "--min_val_rows",
        type=Int(0, INT32_MAX),
        default=20,
        help="hold out at least this many rows per source for val, never more than half of it; rows "
        "dropped later as too long leave fewer, which prepare warns of (default: 20)",
    )
    mix.add_argument("--seed", type=SEED, default=1234, help="seed of the split, the mix and its fractions")
    mix.add_argument("--no_pack", action="store_true", help="one example per row, padded (for comparison)")
    mix.add_argument(
        "--decontam_threshold",
        type=Float(0, 1),
        default=0.1,
        help="drop a row when this share of its 13-grams occurs in the GSM8K test set or in val rows; "
        "13-grams shared by more than 10 rows (a common preamble) are not counted "
        "(default: 0.1; 0 turns decontamination off)",
    )


def add_output_flags(out) -> None:
    out.add_argument(
        "--output_dir", default="data_sft", help="where to write the prepared data (default: data_sft)"
    )
    out.add_argument(
        "--force", action="store_true", help="redo the output even when inputs and flags are unchanged"
    )
    out.add_argument(
        "--skip_bad_rows",
        action="store_true",
        help="drop malformed JSON lines and lines over 64 MiB (counted in the manifest) instead of "
        "stopping at the first one",
    )


# --- sources ---------------------------------------------------------------------------------------


def collect_sources(args: argparse.Namespace) -> list:
    """The sources to read, in order: --alpaca, --gsm8k, --dolly, each --source, then shared ones."""
    from ds_sft.data.sources import HUB_IDS, SOURCE_NAME, SourceSpec, parse_field_map
    from ds_sft.locations import shared_dir
    from ds_sft.safe_read import require_regular_file

    field_maps: dict[str, dict[str, str]] = {}
    for text in args.field_map:
        name, mapping = parse_field_map(text)
        if name in field_maps:  # the later one silently replaced the earlier
            raise UserError(
                f"--field_map names {name!r} twice; give all of its fields in one, e.g. "
                f"{name}:instruction=question,response=answer"
            )
        field_maps[name] = mapping
    specs = [SourceSpec(kind, kind, getattr(args, kind)) for kind in HUB_IDS if getattr(args, kind)]
    for item in args.source:
        name, eq, location = item.partition("=")
        if not eq or not name or not location:
            raise UserError(f"--source {item!r}: expected NAME=PATH, e.g. --source mydata=rows.jsonl")
        if not SOURCE_NAME.fullmatch(name):
            raise UserError(
                f"--source {item!r}: NAME must be 1-64 ASCII letters, digits, '_', '.' or '-' "
                f"(not starting with '.' or '-'), e.g. --source mydata=rows.jsonl"
            )
        specs.append(SourceSpec(name, "generic", location, field_maps.pop(name, {})))
    if field_maps:
        raise UserError(f"--field_map given for {sorted(field_maps)} but no --source with that name")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise UserError(f"source names must be unique, got {names}")
    shared = shared_dir()
    if args.from_shared or not specs:
        if shared is None and args.from_shared:
            raise UserError(
                "--from_shared: ../shared/data is absent; pass --alpaca/--gsm8k/--dolly PATH instead"
            )
        if shared is not None:
            specs += [
                SourceSpec(kind, kind, str(shared / "data" / rel))
                for kind, rel in SHARED_FILES.items()
                if kind not in names
            ]
    for spec in specs:
        if spec.is_local:  # a FIFO, a device or a folder is refused here, before anything opens it
            require_regular_file(expand_user(spec.location), f"{spec.name} data")
    if not specs:
        if hub_offline():
            raise UserError(
                "no data source: pass --alpaca/--gsm8k/--dolly PATH or --source NAME=PATH "
                "(no shared data folder, ../shared or $DS_SFT_SHARED, and HF_HUB_OFFLINE rules out the hub)"
            )
        specs = [SourceSpec(kind, kind, hub_id) for kind, (hub_id, _) in HUB_IDS.items()]
    return specs


def gsm8k_test_reference(args: argparse.Namespace, specs: list) -> tuple[list[str], dict]:
    """GSM8K test texts (question + cleaned answer) to decontaminate against, and where they came from
    (none with --decontam_threshold 0)."""
    from ds_sft.data.clean import Drops, clean_records
    from ds_sft.data.sources import SourceSpec, load_source
    from ds_sft.locations import shared_dir
    from ds_sft.safe_read import require_regular_file

    if args.decontam_threshold == 0:
        return [], {}
    candidates = [args.gsm8k_test] if args.gsm8k_test else []
    if args.gsm8k_test:
        require_regular_file(expand_user(args.gsm8k_test), "--gsm8k_test")
    shared = shared_dir()
    if shared is not None:
        candidates.append(str(shared / "data" / SHARED_GSM8K_TEST))
    for spec in specs:
        if spec.kind == "gsm8k" and spec.is_local:
            folder = expand_user(spec.location).parent
            candidates += [str(folder / "test.jsonl"), str(folder / "test-00000-of-00001.parquet")]
    location = next((path for path in candidates if expand_user(path).is_file()), None)
    if args.gsm8k_test and location != args.gsm8k_test:
        raise UserError(f"--gsm8k_test {args.gsm8k_test}: no such file")
    if location is None:
        if hub_offline():
            return [], {"reference": None, "note": "no GSM8K test set found offline; pass --gsm8k_test PATH"}
        location = "openai/gsm8k"
    try:
        records, info = load_source(SourceSpec("gsm8k_test", "gsm8k", location), False, Drops(), split="test")
    except UserError as err:
        if args.gsm8k_test:
            raise UserError(f"--gsm8k_test: {err}") from None
        return [], {"reference": None, "note": f"GSM8K test set unavailable ({err}); pass --gsm8k_test PATH"}
    records = clean_records(records, Drops())
    return [f"{r['instruction']}\n{r['response']}" for r in records], {"reference": info}


# --- the command: the recipe, then its steps in order -----------------------------------------------


def run(args: argparse.Namespace) -> int:
    # The pipeline holds ~10^5 containers to its end (records, per-field word lists, token id lists)
    # and makes no reference cycles, so the cyclic GC's repeated scans of them find nothing: ~0.5 s
    # of CPU on the shared mix. Reference counting still frees everything; the GC is back on after.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return prepare(args)
    finally:
        if was_enabled:
            gc.enable()


def prepare(args: argparse.Namespace) -> int:
    """The command's work, step by step (the module docstring says what each stage does);
    :func:`run` calls it with the cyclic GC paused.

    Every flag is checked before a row is read, every row dropped is counted by source and reason in
    ``drops``, and the output folder is only touched at the end, built aside and swapped in whole."""
    from ds_sft.data.clean import NGRAM, Drops
    from ds_sft.data.model_match import tokenizer_identity
    from ds_sft.data.templates import resolve_template
    from ds_sft.data.tokenizer import load_tokenizer

    inputs = resolve_inputs(args)
    # read and clean the sources (a bad file fails here), then drop what the tokenizer can never train
    drops = Drops()
    records, read = load_records(inputs.specs, args.skip_bad_rows, drops, args.train_on)
    tokenizer = load_tokenizer(tokenizer_spec(args))
    template = resolve_template(args.template, tokenizer)
    records = drop_unfit_rows(records, tokenizer, template, args, drops)
    reference, reference_info = gsm8k_test_reference(args, inputs.specs)
    # an output made from the same inputs, flags and tokenizer is reused
    identity = tokenizer_identity(tokenizer)
    key = cache_key(args, inputs.specs, tokenizer, identity, reference_info)
    if output_is_current(args, inputs, key):
        return 0
    # dedup, decontaminate and split while the rows are tokenized; then drop what only tokens show
    docs, n_train = select_and_tokenize(records, inputs.names, reference, tokenizer, template, args, drops)
    chosen = drop_untrainable_documents(docs, n_train, inputs.names, tokenizer, template, args, drops)
    train_docs, max_examples = mix_training(chosen, inputs, args, drops)
    # write the output, and report what it holds and what was dropped
    counts = count_rows(chosen, train_docs, inputs, read, drops, args)
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "sources": inputs.names,
        "seq_len": args.seq_len,
        "template": template,
        "packing": "none (--no_pack)" if args.no_pack else "best-fit-decreasing",
        "tokenizer": describe_tokenizer(args, tokenizer, identity),
        "inputs": read,
        "decontamination": {"ngram": NGRAM, "threshold": args.decontam_threshold, **reference_info},
        "counts": counts,
        "token_lengths": {
            name: length_stats(lengths)
            for name, lengths in chosen.lengths_by_source(inputs.names, kept_only=True).items()
        },
        "max_examples": max_examples,
        "config": {k: v for k, v in sorted(vars(args).items()) if k != "command"},
        "warnings": source_warnings(counts, args),
    }
    splits = {"train": train_docs, "val": chosen.val_docs()}
    write_output(
        inputs, manifest, tokenizer, splits, chosen.lengths_by_source(inputs.names, kept_only=False), args
    )
    print_summary(manifest, Path(args.output_dir))
    return 0


@dataclass
class Inputs:
    """What the flags name, resolved and checked before any row is read."""

    specs: list  # the sources to read, in order (sources.SourceSpec)
    weights: dict[str, float]  # each source's --mix weight, by name
    output_dir: Path  # --output_dir, symlinks resolved
    previous: dict | None  # the manifest of the ds-sft output already there, if any

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]


def resolve_inputs(args: argparse.Namespace) -> Inputs:
    """Refuse what the flags get wrong before any file is read: both --tokenizer and --base_model, a
    --seq_len past the base model's positions, the sources (:func:`collect_sources`), --mix, and an
    output folder prepare may not replace (``output.check_output_dir``, which also refuses one
    holding an input)."""
    from ds_sft.data.model_match import model_positions, refuse_rows_past_positions
    from ds_sft.data.output import check_output_dir

    if args.tokenizer and args.base_model:
        raise UserError("pass --tokenizer or --base_model, not both")
    positions = model_positions(args.base_model) if args.base_model else None
    if positions is not None:  # rows the model cannot attend over were found only when train built it
        refuse_rows_past_positions("--seq_len asks for rows", args.seq_len, args.base_model, positions)
    specs = collect_sources(args)
    weights = parse_mix(args.mix, [spec.name for spec in specs])
    input_paths = [expand_user(spec.location) for spec in specs if spec.is_local]
    if args.gsm8k_test:
        input_paths.append(expand_user(args.gsm8k_test))
    output_dir, previous = check_output_dir(args.output_dir, input_paths)
    return Inputs(specs, weights, output_dir, previous)


def load_records(
    specs: list, skip_bad_rows: bool, drops, train_on: str = "all"
) -> tuple[list[dict], list[dict]]:
    """Read and clean every source -> (records in source order, input descriptions for the manifest)."""
    from ds_sft.data.clean import clean_records
    from ds_sft.data.sources import load_source

    records, inputs = [], []
    for spec in specs:
        loaded, info = load_source(spec, skip_bad_rows, drops)
        inputs.append(info)
        records += clean_records(loaded, drops, gsm8k=spec.kind == "gsm8k", every_turn=train_on == "all")
        del loaded  # the raw texts: not held while the next source is read
    return records, inputs


def tokenizer_spec(args: argparse.Namespace) -> str:
    """The tokenizer the flags name: --tokenizer, else --base_model's, else GPT-2's."""
    return args.tokenizer or args.base_model or "gpt2"


def drop_unfit_rows(records: list[dict], tokenizer, template: str, args, drops) -> list[dict]:
    """The rows left once those no tokenizing could train are dropped: rows spelling one of the
    tokenizer's special tokens, and rows certainly longer than --seq_len, or with --truncate those
    rows cut to what can be trained (``tokenize.bound_records``)."""
    from ds_sft.data.clean import drop_special_token_text
    from ds_sft.data.tokenize import bound_records
    from ds_sft.data.tokenizer import control_tokens

    records = drop_special_token_text(records, control_tokens(tokenizer), drops)
    # A row that cannot fit --seq_len leaves (or is cut) now: dedup, decontamination and the val split
    # would otherwise pay for all of its text (a 300 MB row once took 6 GB and two minutes to drop).
    records, too_long = bound_records(
        records, tokenizer, template, args.train_on, args.seq_len, args.truncate
    )
    for record in too_long:
        drops.add(record["source"], DROP_REASON_TOO_LONG[1])
    return records


def cache_key(args: argparse.Namespace, specs: list, tokenizer, identity: str, reference: dict) -> str:
    """A hash of everything the output is made from: the flags that shape it, each source's content
    (:func:`input_fingerprints`), the tokenizer and the GSM8K test set decontaminated against."""
    # source locations enter through their content hashes, not their paths
    config = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_CACHE_KEY}
    # the whole tokenizer: what its ids mean, and its text pipeline and chat template (which ids a row gets)
    tokenizer_parts = [identity, tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template]
    blob = json.dumps(
        [FORMAT_VERSION, config, input_fingerprints(specs), tokenizer_parts, reference],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def input_fingerprints(specs: list) -> list[dict]:
    """What each source is for the reuse key: its name, how it is read (its kind: --gsm8k F strips
    calculator annotations that --source NAME=F keeps) and its bytes, or its hub id."""
    from ds_sft.safe_read import sha256_file

    return [
        {"name": s.name, "kind": s.kind}
        | ({"sha256": sha256_file(expand_user(s.location))} if s.is_local else {"hub_id": s.location})
        for s in specs
    ]


def output_is_current(args: argparse.Namespace, inputs: Inputs, key: str) -> bool:
    """Whether the output already there is reused: it was made with the same ``key`` and still holds
    every file its manifest lists (``check_output_dir`` found the present ones intact), and no
    --force asks to redo it."""
    from ds_sft.written_files import missing_files

    previous = inputs.previous
    if previous is None or previous.get("key") != key or args.force:
        return False
    missing = missing_files(inputs.output_dir, previous["files"])
    if not missing:
        print(f"{args.output_dir}: up to date (same inputs and flags); reusing it. Pass --force to redo.")
        return True
    print(f"{args.output_dir}: {len(missing)} file(s) missing (first: {missing[0]}); redoing it")
    return False


def in_background(function, *args) -> Future:
    """``function(*args)`` on a daemon thread; its result (or what it raised) in the future returned.

    Not a ThreadPoolExecutor: leaving one joins its thread, so Ctrl-C or SIGTERM while the rows were
    being tokenized waited for all of them (minutes on a large mix) before prepare could stop. The
    work only computes in memory, so a stopped prepare may leave it unfinished."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as err:  # noqa: BLE001  (a Rust panic too) handed to whoever waits
            future.set_exception(err)

    threading.Thread(target=work, name=getattr(function, "__name__", "work"), daemon=True).start()
    return future


def select_and_tokenize(
    records: list[dict], names: list[str], reference: list[str], tokenizer, template: str, args, drops
) -> tuple[Documents, int]:
    """Choose the train and val rows (:func:`select_rows`) while every row is tokenized -> (the chosen
    rows' documents, train ones first, then val, each in record order; how many are train)."""
    from ds_sft.data.tokenize import tokenize_records

    source_index = {name: i for i, name in enumerate(names)}
    # Every cleaned row is tokenized on a worker thread while this one dedups and decontaminates: the
    # Rust encoder releases the GIL, so the two overlap (~0.3 s of ~4 on the shared mix, two cores).
    # The rows dropped meanwhile (<1%) are tokenized for nothing, which costs less than waiting.
    tokenized = in_background(
        tokenize_records,
        records,
        tokenizer,
        template,
        source_index,
        args.train_on,
        args.seq_len,
        args.truncate,
    )
    train_index, val_index = select_rows(records, names, reference, args, drops)
    return tokenized.result().select(np.concatenate([train_index, val_index])), len(train_index)


def select_rows(records: list[dict], names: list[str], reference: list[str], args, drops):
    """Dedup, decontaminate against the GSM8K test set, split val, decontaminate train against val.

    Every row's 13-grams are hashed once and queried against both references.
    Returns (train indices, val indices) into ``records``.
    """
    from ds_sft.data.clean import NgramSet, decontaminate, record_words, unique_rows

    unique = np.array(unique_rows(records, drops), dtype=np.int64)
    rows = [records[i] for i in unique.tolist()]  # the indices below are into these, until the return
    candidates = np.arange(len(rows))
    threshold = args.decontam_threshold
    if threshold > 0:
        grams = NgramSet.of_records(record_words(rows))
        test_grams = NgramSet.of_texts(reference)
        candidates = decontaminate(
            rows, grams, candidates, test_grams, threshold, "overlaps_gsm8k_test", drops
        )
    train_index, val_index = split_val(rows, candidates, names, args)
    if threshold > 0 and len(val_index):
        val_grams = grams.of(val_index)
        train_index = decontaminate(rows, grams, train_index, val_grams, threshold, "overlaps_val", drops)
    return unique[train_index], unique[val_index]


@dataclass
class Chosen:
    """The chosen rows as their tokens judge them: which are kept, and the documents of those.

    The per-row arrays follow the chosen rows that have a trainable answer: train rows first, then
    val, each in record order."""

    docs: Documents  # the kept rows' documents, in that order
    n_train: int  # the first ``n_train`` of ``docs`` are train documents, the rest val
    sources: np.ndarray  # per row: its source's index
    is_val: np.ndarray  # per row: held out for val
    kept: np.ndarray  # per row: it fits --seq_len (or was cut to it), so its document is in ``docs``
    full_lengths: np.ndarray  # per row: its tokens before any cut (for one too long to tokenize, a floor)

    def val_docs(self) -> Documents:
        return self.docs.select(np.arange(self.n_train, len(self.docs)))

    def lengths_by_source(self, names: list[str], kept_only: bool) -> dict[str, np.ndarray]:
        """Per source name, the full lengths of its rows (``kept_only``: of its kept rows)."""
        return {
            name: self.full_lengths[(self.sources == i) & (self.kept if kept_only else True)]
            for i, name in enumerate(names)
        }


def drop_untrainable_documents(
    docs: Documents, n_train: int, names: list[str], tokenizer, template: str, args, drops
) -> Chosen:
    """Drop what only tokens show: rows whose answers encode to no token, then rows longer than
    --seq_len (with --truncate: cut to it, and dropped only when the prompt alone fills it)."""
    from ds_sft.data.templates import answer_end_id
    from ds_sft.data.tokenize import answers_without_tokens, fit_to_length

    lost = answers_without_tokens(docs, answer_end_id(tokenizer, template), args.seq_len)
    count_drops(drops, names, docs.source_ids[lost], "answer_has_no_tokens")
    docs = docs.select(np.flatnonzero(~lost))
    n_train -= int(lost[:n_train].sum())
    sources, full_lengths = docs.source_ids, docs.full_lengths  # a row too long to tokenize: its fewest
    docs, reasons = fit_to_length(docs, args.seq_len, args.truncate)
    for code, reason in DROP_REASON_TOO_LONG.items():
        count_drops(drops, names, sources[reasons == code], reason)
    kept = reasons == 0
    is_val = np.arange(len(sources)) >= n_train
    return Chosen(docs, int(kept[:n_train].sum()), sources, is_val, kept, full_lengths)


def count_drops(drops, names: list[str], source_ids: np.ndarray, reason: str) -> None:
    """Count rows (given by their source ids) as dropped for ``reason``."""
    for name, n in zip(names, np.bincount(source_ids, minlength=len(names)).tolist(), strict=True):
        drops.add(name, reason, n)


def mix_training(chosen: Chosen, inputs: Inputs, args, drops) -> tuple[Documents, dict]:
    """The training documents as --mix weights them and --max_examples caps them (:func:`mix_indices`),
    and the manifest's ``max_examples`` record. Refused in one line when making the mix would not fit
    in memory (:func:`check_mix_fits`) or when it leaves no training example."""
    n_train, names, weights = chosen.n_train, inputs.names, inputs.weights
    lengths, source_ids = chosen.docs.lengths[:n_train], chosen.docs.source_ids[:n_train]
    check_mix_fits(lengths, source_ids, names, weights, args)
    mixed, n_mixed = mix_indices(source_ids, names, weights, args)  # indices into the train documents
    if n_train and not len(mixed):  # every source with rows weighted (near) 0
        raise UserError(
            f"--mix {args.mix!r} keeps none of the {n_train:,} training examples (a weight of 0, "
            "or one too small for a single row, takes none of a source): raise a weight"
        )
    train_docs = chosen.docs.select(mixed)  # the train documents come first in chosen.docs
    if not len(train_docs):
        raise UserError(f"no training examples left; rows dropped by reason: {drops.by_source()}")
    short_note = None
    if args.max_examples is not None and n_mixed < args.max_examples:
        short_note = (
            f"--max_examples {args.max_examples:,} is more than the {n_mixed:,} training examples left after "
            "cleaning, dedup, decontamination, the val split and --mix: all of them are used"
        )
        print(f"note: {short_note}", file=sys.stderr)
    record = {
        "requested": args.max_examples,
        "available": n_mixed,
        "used": len(train_docs),
        "note": short_note,
    }
    return train_docs, record


def count_rows(chosen: Chosen, train_docs: Documents, inputs: Inputs, read: list[dict], drops, args) -> dict:
    """The manifest's ``counts``: per source, its rows read, kept, in train and val, in the training mix,
    and dropped by reason (rows_in = kept + the sum of dropped), its conversations by how their turns
    were masked, and with --truncate the rows cut."""
    from ds_sft.data.tokenize import ROUTES

    rows_in = {info["name"]: info["rows"] for info in read}
    dropped = drops.by_source()
    kept, is_val = chosen.kept, chosen.is_val
    train_after_mix = np.bincount(train_docs.source_ids, minlength=len(inputs.names))
    kept_routes, kept_sources = chosen.docs.routes, chosen.sources[kept]  # docs: the kept rows, in order
    counts = {}
    for i, name in enumerate(inputs.names):
        mine = chosen.sources == i
        counts[name] = {
            "rows_in": rows_in[name],
            "kept": int((kept & mine).sum()),
            "train": int((kept & mine & ~is_val).sum()),
            "val": int((kept & mine & is_val).sum()),
            "train_after_mix": int(train_after_mix[i]),
            "weight": inputs.weights[name],
            "dropped": dropped.get(name, {}),
            # kept conversations trained on every turn, by how their turns were masked (tokenize.ROUTES)
            "turns_masked_by": {
                route: int((kept_routes[kept_sources == i] == code).sum())
                for code, route in enumerate(ROUTES)
                if code
            },
        }
        if args.truncate:  # kept rows cut to seq_len; tokens_cut is a floor for rows cut before tokenizing
            cut = kept & mine & (chosen.full_lengths > args.seq_len)
            counts[name]["truncated"] = {
                "rows": int(cut.sum()),
                "tokens_cut": int((chosen.full_lengths[cut] - args.seq_len).sum()),
            }
    return counts


def length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"count": 0}
    p50, p95 = np.percentile(lengths, [50, 95])
    return {
        "count": int(len(lengths)),
        "mean": round(float(lengths.mean()), 1),
        "p50": round(float(p50), 1),
        "p95": round(float(p95), 1),
        "max": int(lengths.max()),
    }


def describe_tokenizer(args: argparse.Namespace, tokenizer, identity: str) -> dict:
    """The manifest's ``tokenizer``: how it was named, what it is (``identity``), its id bound, and the
    ids train needs (padding is the EOS when the tokenizer has no pad token)."""
    from ds_sft.vocab import id_bound

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "spec": tokenizer_spec(args),
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "identity": identity,
        "vocab_size": id_bound(tokenizer),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_id,
    }


def write_output(
    inputs: Inputs, manifest: dict, tokenizer, splits: dict[str, Documents], lengths: dict, args
) -> None:
    """Build the output in a staging sibling and swap it in whole (``output.building_output``): each
    split's shards (:func:`write_documents`, recorded in ``manifest["splits"]``), the tokenizer, the
    histograms of ``lengths`` (per source, its rows' token counts) and the manifest, which lists every
    file written."""
    from ds_sft.data.output import MANIFEST, building_output
    from ds_sft.data.shards import plot_lengths

    names, vocab_size = manifest["sources"], manifest["tokenizer"]["vocab_size"]
    pad_id = manifest["tokenizer"]["pad_token_id"]
    old_files = inputs.previous["files"] if inputs.previous else {}
    with building_output(inputs.output_dir, old_files, "--output_dir", manifest, MANIFEST) as tmp:
        manifest["splits"] = {
            split: write_documents(tmp / split, split_docs, args, pad_id, vocab_size, names)
            for split, split_docs in splits.items()
        }
        try:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        except Exception as err:  # disk full: tokenizers says so in a plain Exception
            raise as_os_error(err, inputs.output_dir) from err
        plot_lengths(tmp / "lengths.png", lengths, args.seq_len)


def write_documents(directory: Path, docs, args, pad_id: int, vocab_size: int, names: list[str]) -> dict:
    """Pack (or pad, with --no_pack) one split's documents into rows, write its shards, describe it."""
    from ds_sft.data.pack import best_fit_decreasing, efficiency, one_per_row, pack_rows
    from ds_sft.data.shards import write_split

    layout = one_per_row(len(docs)) if args.no_pack else best_fit_decreasing(docs.lengths, args.seq_len)
    check_rows_fit(len(layout), args.seq_len, args.no_pack)
    write_split(directory, pack_rows(docs, layout, args.seq_len, pad_id), vocab_size)
    return {
        "rows": len(layout),
        "documents": len(docs),
        "tokens": int(docs.offsets[-1]),
        "trained_tokens": int(docs.trained.sum(dtype=np.int64)),
        "documents_per_source": {name: int((docs.source_ids == i).sum()) for i, name in enumerate(names)},
        "efficiency": efficiency(docs, len(layout), args.seq_len),
    }


def check_rows_fit(rows: int, seq_len: int, padded: bool) -> None:
    """One line, before the rows are laid out, when they cannot be held: ``rows x seq_len`` token
    ids and loss-mask bytes (:func:`~ds_sft.data.pack.pack_rows`). Packed rows are about as long as
    the data; padded ones (``--no_pack``) each take ``--seq_len`` however short the example, so 5,000
    examples at ``--seq_len 1048576`` asked numpy for 38 GiB and ended in its MemoryError."""
    from ds_sft.data.pack import BYTES_PER_POSITION
    from ds_sft.machine import available_memory

    need, available = rows * seq_len * BYTES_PER_POSITION, available_memory()
    if available is None or need <= available:
        return
    fix = "lower --seq_len, or pack (drop --no_pack)" if padded else "lower --seq_len or --max_examples"
    raise UserError(
        f"{rows:,} rows of --seq_len {seq_len:,} take {need / 2**30:,.1f} GiB to lay out, more than the "
        f"{available / 2**30:,.1f} GiB this machine has available: {fix}"
    )


def source_warnings(counts: dict, args: argparse.Namespace) -> list[str]:
    """What the summary table shows but a user skimming it misses: a source the mix wanted that kept no
    training example, and a val split left under ``--min_val_rows`` by the drops after the split (the
    split is cut before tokenizing; rows too long for ``--seq_len`` leave it later), whose val loss is
    then a figure of a few rows."""
    said = []
    for name, c in counts.items():
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in c["dropped"].items()) or "none dropped"
        too_long = any(reason in c["dropped"] for reason in DROP_REASON_TOO_LONG.values())
        fix = "raise --seq_len or pass --truncate" if too_long else "see the dropped column above"
        if c["rows_in"] and c["weight"] > 0 and not c["train_after_mix"]:
            said.append(f"{name}: no training example left of its {c['rows_in']:,} rows ({reasons}): {fix}")
        elif args.val_fraction > 0 and c["val"] < min(args.min_val_rows, c["kept"] // 2):  # not the cap
            said.append(
                f"{name}: {c['val']:,} val row(s), under --min_val_rows {args.min_val_rows} ({reasons}): "
                f"its val loss is a figure of few rows; {fix}"
            )
    return said


def print_summary(manifest: dict, output_dir: Path) -> None:
    print(f"prepared {output_dir}  (template {manifest['template']}, seq_len {manifest['seq_len']})")
    print(f"{'source':<12}{'rows in':>9}{'kept':>8}{'train':>8}{'val':>6}{'mixed':>8}  dropped")
    for name, c in manifest["counts"].items():
        dropped = ", ".join(f"{reason} {n}" for reason, n in c["dropped"].items()) or "-"
        if c.get("truncated", {}).get("rows"):
            dropped += f"; truncated {c['truncated']['rows']:,} ({c['truncated']['tokens_cut']:,} tokens cut)"
        print(
            f"{name:<12}{c['rows_in']:>9,}{c['kept']:>8,}{c['train']:>8,}{c['val']:>6,}"
            f"{c['train_after_mix']:>8,}  {dropped}"
        )
    for split, s in manifest["splits"].items():
        eff = s["efficiency"]
        print(
            f"{split}: {s['rows']:,} rows of {manifest['seq_len']}, {s['documents']:,} examples, "
            f"{s['tokens']:,} tokens; row fill {eff['real_tokens']:.2%} (trained {eff['trained_tokens']:.2%})"
        )
    if manifest["decontamination"].get("note"):
        print(f"note: {manifest['decontamination']['note']}", file=sys.stderr)
    for line in manifest.get("warnings", []):
        print(f"warning: {one_line(line)}", file=sys.stderr)


if __name__ == "__main__":
    from ds_sft.command import main_for

    sys.exit(main_for("prepare"))
