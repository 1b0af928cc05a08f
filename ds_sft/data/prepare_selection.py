"""Which rows become training and val documents, in the order prepare decides it:

1. before any token (:func:`drop_unfit_rows`): rows spelling a special token of the tokenizer, and
   rows whose text alone shows they cannot fit --seq_len (or, with --truncate, cut to what can);
2. while a worker thread tokenizes every row (:func:`select_and_tokenize`): dedup, decontamination
   against the GSM8K test set, the val split, and train rows overlapping val (:func:`select_rows`);
3. what only tokens show (:func:`drop_untrainable_documents`): answers that encode to no token, rows
   longer than --seq_len;
4. the training mix (:func:`mix_training`, over ``data/mix.py``): --mix weights, --max_examples.

Every row dropped is counted in ``drops`` by source and reason.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ds_sft.data.mix import check_mix_fits, mix_indices, split_val
from ds_sft.errors import UserError

if TYPE_CHECKING:
    from ds_sft.data.prepare_inputs import Inputs
    from ds_sft.data.tokenize import Documents

# tokenize.fit_to_length's codes -> the reasons counted (1 is also bound_records' drop, before tokens)
DROP_REASON_TOO_LONG = {1: "longer_than_seq_len", 2: "prompt_fills_seq_len"}


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
