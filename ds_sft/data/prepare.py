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

# (The docstring above is the epilog of `ds-sft prepare --help`, so the map of this command's parts is
# here.) This module is the command: its flags (the groups in prepare_flags.py) and the recipe, which
# calls the steps in order: prepare_inputs.py (the sources, every flag checked before a row is read),
# prepare_reuse.py (an output already made from the same inputs is kept), prepare_selection.py (which
# rows train and which validate), prepare_write.py (the shards, built aside and swapped in) and
# prepare_report.py (the manifest's counts and the summary printed).

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from ds_sft.data.prepare_flags import (
    add_mix_flags,
    add_output_flags,
    add_source_flags,
    add_tokenization_flags,
)
from ds_sft.data.prepare_inputs import gsm8k_test_reference, load_records, resolve_inputs, tokenizer_spec
from ds_sft.data.prepare_report import (
    count_rows,
    describe_tokenizer,
    length_stats,
    print_summary,
    source_warnings,
)
from ds_sft.data.prepare_reuse import FORMAT_VERSION, cache_key, output_is_current
from ds_sft.data.prepare_selection import (
    drop_unfit_rows,
    drop_untrainable_documents,
    mix_training,
    select_and_tokenize,
)
from ds_sft.data.prepare_write import write_output
from ds_sft.options import Ignored, refuse_ignored

# the output a refusal that names no file is about (command.execute): where a full disk ran out
OUTPUT_FLAG = "output_dir"


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


if __name__ == "__main__":
    from ds_sft.command import main_for

    sys.exit(main_for("prepare"))
